"""What the job's steps share and build once per run: the :class:`Job` record, this rank's
standardized data, the opening lines, and the training context (used by :mod:`disdl_mpi.run`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from mpi4py import MPI

from disdl_mpi import __version__
from disdl_mpi.comm.cuda_aware import detect as detect_cuda_aware
from disdl_mpi.comm.world import RankInfo
from disdl_mpi.config import RunConfig
from disdl_mpi.data.layout import shard_bounds
from disdl_mpi.data.local_data import LocalData
from disdl_mpi.data.standardize import standardize
from disdl_mpi.machine import machine_info
from disdl_mpi.norms import SCHEMES
from disdl_mpi.observe.profiler import StepProfiler, parse_profile_steps, profile_path
from disdl_mpi.observe.progress import Progress
from disdl_mpi.observe.timeline import TraceRecorder
from disdl_mpi.observe.timing import detail_requested
from disdl_mpi.reliability.checkpoint import Checkpointer, Loaded, parse_every
from disdl_mpi.reliability.guards import SignalWatch, StepGuard
from disdl_mpi.reliability.watchdog import make_watchdog
from disdl_mpi.scheme_output import RunFacts
from disdl_mpi.train_context import RankData, TrainContext, TrainHooks


@dataclass
class Job:
    """What every step of the run shares on this rank."""

    comm: MPI.Comm
    cfg: RunConfig
    argv: list[str]
    out: Path
    norms: list[str]
    watch: SignalWatch
    log: Callable[[str], None]
    started: float

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def whole_test(self) -> bool:
        """Whether every rank needs the whole test set: a scheme scores each rank's own model
        on all of it (fedbn); otherwise a rank holds only the shard it scores."""
        return any(SCHEMES[n].per_rank_eval for n in self.norms)


def rank_data(job: Job, local: LocalData, device: torch.device, info: RankInfo) -> RankData:
    """Standardized inputs and device labels: what training and evaluation index."""
    domain = local.domain_test
    x_train, tests = standardize(
        local.train, [local.test.x] + ([domain.x] if domain else []), job.comm, device
    )

    def labels(y):
        return torch.as_tensor(y, dtype=torch.long, device=device)

    x_test, y_test = tests[0], labels(local.test.y)
    whole_test = job.whole_test  # loaded whole: cut out the shard this rank scores as well
    lo, hi = shard_bounds(local.test.total, info.rank, info.world_size)  # per process
    return RankData(
        x_train=x_train,
        y_train=labels(local.train.y),
        x_test=x_test.rows(lo, hi) if whole_test else x_test,
        y_test=y_test[lo:hi] if whole_test else y_test,
        sizes=list(local.sizes),
        num_classes=int(local.num_classes),
        sample_shape=tuple(local.sample_shape),
        x_domain=tests[1] if domain else None,
        y_domain=labels(domain.y) if domain else None,
        x_test_all=x_test if whole_test else None,
        y_test_all=y_test if whole_test else None,
    )


def announce(
    job: Job,
    info: RankInfo,
    device: torch.device,
    threads: int,
    data: RankData,
    local: LocalData,
    data_dir: Path,
    startup_s: float,
) -> RunFacts:
    """Rank 0 says what runs where, on which data; returns what every scheme's record shares."""
    cfg, log = job.cfg, job.log
    model_name = cfg.model if cfg.model != "auto" else ("cnn" if len(data.sample_shape) == 3 else "mlp")
    machine = machine_info(info, device, threads, detect_cuda_aware(cfg.cuda_aware).reason)
    k = cfg.virtual_ranks
    ranks = (
        f"{info.world_size} ranks"
        if k == 1
        else (f"{info.world_size * k} isolated ranks as {info.world_size} process(es) x {k} virtual ranks")
    )
    log(
        f"disdl-mpi {__version__}: {ranks} on {machine['nodes']} node(s), "
        f"{machine['mpi_library']}, torch {torch.__version__}, device {machine['device']}, "
        f"{threads} thread(s) per rank"
    )
    placement: dict[str, list[int]] = {}
    for r, host in enumerate(info.hostnames):
        placement.setdefault(host, []).append(r)
    log("ranks by node: " + "; ".join(f"{host}: {','.join(map(str, rs))}" for host, rs in placement.items()))
    log(
        f"data {data_dir}: {sum(data.sizes)} training samples over {len(data.sizes)} ranks "
        f"(min {min(data.sizes)}, max {max(data.sizes)}), {local.test.total} test samples, "
        f"model {model_name}, schemes: {', '.join(job.norms)}"
    )
    train = local.train
    log(
        f"data residency: {train.residency}"
        + (
            f" (--data-residency {cfg.data_residency}: the resident data would not fit the budget)"
            if train.residency == "stream" and train.budget_refusal
            else ""
        )
        + f"; data ready in {startup_s:.1f} s"
    )
    return RunFacts(
        info=info,
        machine=machine,
        model_name=model_name,
        dataset=local.manifest.get("dataset", cfg.dataset),
        partition=local.manifest.get("scheme", cfg.partition),
        data_dir=data_dir,
        startup_s=startup_s,
        measured_wait=detail_requested(cfg.timeline),
        cuda=device.type == "cuda",
    )


def build_context(
    job: Job,
    info: RankInfo,
    device: torch.device,
    data: RankData,
    facts: RunFacts,
    local: LocalData,
    hooks: Optional[TrainHooks],
) -> tuple[TrainContext, Progress, Optional[Loaded]]:
    """Everything a scheme's training needs that does not change between schemes; where to
    resume, if anywhere."""
    cfg, comm, out, rank = job.cfg, job.comm, job.out, job.rank
    ckpt = Checkpointer(
        out / "checkpoints",
        comm,
        config=cfg.to_dict(),
        world_size=info.world_size,
        manifest_sha256=local.manifest_sha256,
        norms=job.norms,
    )
    loaded = ckpt.load(cfg.resume.strip(), job.log) if cfg.resume else None
    if loaded is not None:
        pos = loaded.shared["position"]
        done = int(pos["scheme_index"])
        job.log(
            f"resuming from {loaded.path}: "
            + (
                f"scheme {pos['norm']} at step {pos['step']}"
                if "model" in loaded.shared
                else f"{done} of {len(job.norms)} scheme(s) done"
            )
        )
    progress = Progress(0, mode=cfg.progress, quiet=rank != 0)
    ctx = TrainContext(
        cfg=cfg,
        comm=comm,
        norm_comm=comm.Dup(),
        info=info,
        device=device,
        data=data,
        model_name=facts.model_name,
        log=job.log,
        epoch_lines=rank == 0 and not progress.is_bar and not progress.quiet,
        hooks=_with_progress(hooks or TrainHooks(), progress),
        wait_comm=comm.Dup() if facts.measured_wait else None,
        trace=TraceRecorder(comm) if cfg.timeline else None,
        guard=StepGuard(comm, job.watch),
        checkpointer=ckpt,
        checkpoint_every=parse_every(cfg.checkpoint_every),
        watchdog=make_watchdog(comm, cfg.stall_timeout, job.log, info.hostnames, cfg.virtual_ranks),
        profiler=(
            StepProfiler(
                parse_profile_steps(cfg.profile_steps),
                device,
                lambda scheme: profile_path(out, cfg.timeline, scheme, rank),
            )
            if cfg.profile_steps
            else None
        ),
    )
    return ctx, progress, loaded


def _with_progress(hooks: TrainHooks, progress: Progress) -> TrainHooks:
    """The caller's hooks, with the progress bar (when there is one) advanced every step."""
    if not progress.is_bar:
        return hooks
    user = hooks.on_step

    def on_step(step: int, total: int, label: str) -> None:
        if progress.total != total or step == 1:
            progress.reset(total)
        progress.advance(1, label)
        if user is not None:
            user(step, total, label)

    return TrainHooks(loss_fn=hooks.loss_fn, evaluate=hooks.evaluate, on_step=on_step)
