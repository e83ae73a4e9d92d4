"""The main job: ``mpirun -n N python -m disdl_mpi.run [options]``.

Every rank trains on its own private partition; gradients are allreduced every step; each
requested normalization scheme is trained in turn from the same initial weights and measured.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from mpi4py import MPI

from disdl_mpi import __version__
from disdl_mpi.comm.collective_check import CheckedComm, CollectiveChecker
from disdl_mpi.comm.cuda_aware import detect as detect_cuda_aware
from disdl_mpi.comm.world import (UserError, agree_or_raise, install_abort_handler, rank_info,
                                  world)
from disdl_mpi.config import RunConfig, build_parser, config_errors
from disdl_mpi.data.budget import agreed_budget
from disdl_mpi.data.layout import shard_bounds
from disdl_mpi.data.partition_io import load_partition
from disdl_mpi.data.standardize import standardize
from disdl_mpi.device import select_device, seed_everything, set_threads
from disdl_mpi.files import atomic_path, jsonable
from disdl_mpi.machine import machine_info, peak_rss_bytes
from disdl_mpi.norms import SCHEMES
from disdl_mpi.observe.profiler import StepProfiler, parse_profile_steps, profile_path
from disdl_mpi.observe.progress import Progress
from disdl_mpi.observe.results import format_table, write_metrics, write_summary
from disdl_mpi.observe.timeline import TraceRecorder
from disdl_mpi.observe.timing import detail_requested, phase_summary, timing_fields
from disdl_mpi.reliability.checkpoint import Checkpointer, Loaded, parse_every, rng_state
from disdl_mpi.reliability import outlock
from disdl_mpi.reliability.guards import SignalWatch, StepGuard
from disdl_mpi.reliability.watchdog import StallWatchdog
from disdl_mpi.train_context import RankData, SchemeResult, TrainContext, TrainHooks
from disdl_mpi.trainer import train_scheme


def parse_args(argv: list[str] | None, rank: int) -> RunConfig:
    """Parse on every rank (same argv), but let only rank 0 print usage, help or errors."""
    parser = build_parser()
    sink = io.StringIO()
    quiet = contextlib.redirect_stdout(sink) if rank else contextlib.nullcontext()
    quiet_err = contextlib.redirect_stderr(sink) if rank else contextlib.nullcontext()
    with quiet, quiet_err:
        ns = parser.parse_args(argv)
    return RunConfig(**vars(ns))


def check_output_dir(out: Path) -> str | None:
    """Rank 0 proves the results folder is writable before any training starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return f"--out {out}: results folder is not writable ({exc.strerror or exc})"
    return None


def ensure_data(cfg: RunConfig, comm: MPI.Comm, data_dir: Path) -> None:
    """Rank 0 builds a missing partition (and checks the default folder's); the others wait.

    The default folder (no --data-dir) is named after every setting that shapes the
    partition and is checked against its manifest, so it is never reused with other settings.
    """
    error = None
    if comm.Get_rank() == 0:
        missing = not (data_dir / "partition.json").exists() and \
            not any(data_dir.glob("rank_*.h5"))
        try:
            from data_prep.ensure import ensure_partition
            if missing:
                print(f"building partition {data_dir} ({cfg.dataset}, {cfg.partition}, "
                      f"{comm.Get_size()} ranks, seed {cfg.seed})", flush=True)
            if missing or cfg.data_dir is None:
                ensure_partition(data_dir, cfg.dataset, comm.Get_size(), cfg.partition,
                                 cfg.seed, source_dir=cfg.source_dir,
                                 min_per_rank=cfg.min_per_rank)
        except Exception as exc:  # reported on every rank below, never a hang
            error = (f"building partition {data_dir} on rank 0 failed: {exc}" if missing
                     else str(exc))
    error = comm.bcast(error, root=0)
    if error:
        raise UserError(error, collective=True)


def explicit_mismatch(cfg: RunConfig, manifest: dict, argv: list[str],
                      data_dir: Path) -> Optional[str]:
    """An explicit --dataset or --partition that the partition on disk was not built with."""
    from data_prep.partition_spec import parse_partition

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    where = data_dir / "partition.json"
    if given("--dataset") and manifest.get("dataset") != cfg.dataset:
        return (f"{where}: field 'dataset' is {manifest.get('dataset')!r}, but --dataset "
                f"{cfg.dataset} was asked for")
    if given("--partition") and manifest.get("scheme") != parse_partition(cfg.partition).name:
        return (f"{where}: field 'scheme' is {manifest.get('scheme')!r}, but --partition "
                f"{cfg.partition} was asked for")
    return None


def scheme_record(cfg: RunConfig, res: SchemeResult, phases: dict, *, info, machine: dict,
                  model_name: str, dataset: str, partition: str, data_dir: Path,
                  wall: float, measured_wait: bool, cuda: bool, startup_s: float,
                  peak_rss: list[int]) -> dict:
    """One scheme's entry of summary.json (docs/CONTRACTS.md)."""
    record = {
        "world_size": info.world_size, "norm": res.norm, "model": model_name,
        "dataset": dataset, "partition": partition, "data_dir": str(data_dir),
        "epochs": res.epochs, "steps": res.steps, "test_accuracy": res.test_accuracy,
        "samples_per_s": res.samples / max(1e-9, res.train_s),
        "phases": {k: v["mean"] for k, v in phases.items()},
        "phases_detail": phases, "device": machine["device"],
        "mpi_library": machine["mpi_library"], "allreduce_path": res.allreduce_path,
        "cuda_aware": res.cuda_awareness,
        "threads_per_rank": machine["threads_per_rank"], "wall_s": wall,
        "train_s": res.train_s, "global_batch_size": cfg.global_batch_size,
        "batching": cfg.batching, "per_rank_accuracy": res.per_rank_accuracy,
        "domain_accuracy": res.domain_accuracy,
        "domain_accuracy_mean": (sum(res.domain_accuracy) / len(res.domain_accuracy)
                                 if res.domain_accuracy else None),
        "epochs_log": res.epochs_log,
        "grad_bytes": sum(p.numel() * p.element_size() for p in res.model.parameters()
                          if p.requires_grad),
        "skipped_steps": res.skipped_steps, "lr_schedule": cfg.lr_schedule,
        "warmup_epochs": cfg.warmup_epochs, "time_to_accuracy": res.time_to_accuracy,
        "startup_s": startup_s, "peak_rss_bytes": peak_rss,
    }
    record.update(timing_fields(phases, measured_wait=measured_wait, cuda=cuda))
    return record


def main(argv: list[str] | None = None, hooks: Optional[TrainHooks] = None) -> int:
    """The whole job on this rank; ``hooks`` are the training loop's seams (tests use them)."""
    started = time.perf_counter()
    comm = world()
    install_abort_handler(comm)
    # SIGTERM/SIGUSR1 only set a flag; the step loop checkpoints and stops at a step boundary.
    watch = SignalWatch().install()
    rank = comm.Get_rank()
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    args = sys.argv[1:] if argv is None else argv

    # 1. configuration, checked alike on every rank and reported once
    cfg = parse_args(argv, rank)
    if cfg.check_collectives:  # debug mode: every collective below is compared across ranks
        comm = CheckedComm(comm, CollectiveChecker(comm))
    errors = config_errors(cfg, comm.Get_size())
    out = cfg.resolved_out()
    lock_note = None
    if rank == 0 and not errors:
        err = check_output_dir(out)
        if err is None:
            err, lock_note = outlock.acquire(out)
            if err is None:  # held until this process ends, however it ends
                atexit.register(outlock.release, out)
        errors += [err] if err else []
    agree_or_raise(comm, "\n".join(errors) if errors else None)
    if lock_note:
        log(lock_note)
    norms = cfg.schemes()

    # 2. this rank: device, threads, seeds; 3. its private partition
    info = rank_info(comm)
    device = select_device(cfg.device, info)
    threads = set_threads(cfg.threads, info)
    seed_everything(cfg.seed)
    data_dir = cfg.resolved_data_dir(info.world_size)
    ensure_data(cfg, comm, data_dir)
    # Only a scheme that scores each rank's own model on the whole test set (fedbn) needs it
    # all on every rank; otherwise a rank holds the shard it scores.
    whole_test = any(SCHEMES[n].per_rank_eval for n in norms)
    local = load_partition(comm, data_dir, budget=agreed_budget(
        comm, device, info.hostnames, cfg.memory_budget), test_shard=not whole_test,
        residency=cfg.data_residency)
    mismatch = explicit_mismatch(cfg, local.manifest, args, data_dir)
    if mismatch:
        raise UserError(mismatch, collective=True)
    dataset = local.manifest.get("dataset", cfg.dataset)
    domain = local.x_domain_test is not None
    x_train, tests = standardize(local.x_train, [local.x_test] + (
        [local.x_domain_test] if domain else []), comm, device, local.residency,
        local.train_path, local.train_sums)
    labels = lambda y: torch.as_tensor(y, dtype=torch.long, device=device)  # noqa: E731
    x_test, y_test = tests[0], labels(local.y_test)
    lo, hi = shard_bounds(local.test_total, info.rank, info.world_size)
    data = RankData(
        x_train=x_train, y_train=labels(local.y_train),
        x_test=x_test.rows(lo, hi) if whole_test else x_test,
        y_test=y_test[lo:hi] if whole_test else y_test, sizes=list(local.sizes),
        num_classes=int(local.num_classes), sample_shape=tuple(local.sample_shape),
        x_domain=tests[1] if domain else None,
        y_domain=labels(local.y_domain_test) if domain else None,
        x_test_all=x_test if whole_test else None, y_test_all=y_test if whole_test else None)
    # Reading, checking and standardizing, on the slowest rank (Python's start is before this).
    startup_s = comm.allreduce(time.perf_counter() - started, op=MPI.MAX)
    model_name = cfg.model if cfg.model != "auto" else ("cnn" if len(data.sample_shape) == 3
                                                         else "mlp")
    machine = machine_info(info, device, threads, detect_cuda_aware(cfg.cuda_aware).reason)
    log(f"disdl-mpi {__version__}: {info.world_size} ranks on {machine['nodes']} node(s), "
        f"{machine['mpi_library']}, torch {torch.__version__}, device {machine['device']}, "
        f"{threads} thread(s) per rank")
    placement: dict[str, list[int]] = {}
    for r, host in enumerate(info.hostnames):
        placement.setdefault(host, []).append(r)
    log("ranks by node: " + "; ".join(f"{host}: {','.join(map(str, rs))}"
                                      for host, rs in placement.items()))
    log(f"data {data_dir}: {sum(data.sizes)} training samples over {info.world_size} ranks "
        f"(min {min(data.sizes)}, max {max(data.sizes)}), {local.test_total} test samples, "
        f"model {model_name}, schemes: {', '.join(norms)}")
    log(f"data residency: {local.residency}" + (
        f" (--data-residency {cfg.data_residency}: the resident data would not fit the budget)"
        if local.residency == "stream" and local.budget_refusal else "")
        + f"; data ready in {startup_s:.1f} s")

    # 4. checkpoints: where to resume, if anywhere
    ckpt = Checkpointer(out / "checkpoints", comm, config=cfg.to_dict(),
                        world_size=info.world_size, manifest_sha256=local.manifest_sha256,
                        norms=norms)
    loaded = ckpt.load(cfg.resume.strip(), log) if cfg.resume else None
    records: list[dict] = []
    first_scheme = 0
    if loaded is not None:
        records = list(loaded.shared["run"].get("records", []))
        first_scheme = int(loaded.shared["position"]["scheme_index"])
        pos = loaded.shared["position"]
        log(f"resuming from {loaded.path}: " + (f"scheme {pos['norm']} at step {pos['step']}"
            if "model" in loaded.shared else f"{first_scheme} of {len(norms)} scheme(s) done"))
    hooks = hooks or TrainHooks()
    progress = Progress(0, mode=cfg.progress, quiet=rank != 0)
    ctx = TrainContext(cfg=cfg, comm=comm, norm_comm=comm.Dup(), info=info, device=device,
                       data=data, model_name=model_name, log=log,
                       epoch_lines=rank == 0 and not progress.is_bar and not progress.quiet,
                       hooks=_with_progress(hooks, progress),
                       wait_comm=comm.Dup() if detail_requested(cfg.timeline) else None,
                       trace=TraceRecorder(comm) if cfg.timeline else None,
                       guard=StepGuard(comm, watch), checkpointer=ckpt,
                       checkpoint_every=parse_every(cfg.checkpoint_every),
                       watchdog=(StallWatchdog(comm, cfg.stall_timeout)
                                 if cfg.stall_timeout else None),
                       profiler=(StepProfiler(
                           parse_profile_steps(cfg.profile_steps), device,
                           lambda scheme: profile_path(out, cfg.timeline, scheme, rank))
                           if cfg.profile_steps else None))

    # 5. every scheme in turn, results written after each
    for index, name in enumerate(norms):
        if index < first_scheme:
            continue
        ctx.scheme_index, ctx.run_records = index, records
        ctx.resume = _resume_point(loaded, index, first_scheme)
        start = time.perf_counter()
        res = train_scheme(ctx, name)
        wall = time.perf_counter() - start
        record = scheme_record(
            cfg, res, phase_summary(comm, res.phases), info=info, machine=machine,
            model_name=model_name, dataset=dataset,
            partition=local.manifest.get("scheme", cfg.partition), data_dir=data_dir,
            wall=wall, measured_wait=ctx.wait_comm is not None, cuda=device.type == "cuda",
            startup_s=startup_s, peak_rss=comm.allgather(peak_rss_bytes()))  # every rank's
        records.append(record)
        scheme_dir = out / name
        if rank == 0:
            write_metrics(scheme_dir / "metrics.csv", res.epochs_log)
            progress.line(f"{name}: test accuracy {res.test_accuracy:.4f}, "
                          f"{record['samples_per_s']:.0f} samples/s, {wall:.1f} s")
        if cfg.save_model:
            _save_model(res.model, scheme_dir, rank, per_rank=res.per_rank_accuracy is not None)
        if rank == 0:  # written after every scheme, so an interrupted run keeps what finished
            write_summary(out, records, cfg.to_dict(), machine)
        if ctx.checkpoint_every and index + 1 < len(norms):
            # A scheme boundary: a resumed multi-scheme run skips the schemes already done.
            ckpt.save({"position": {"scheme_index": index + 1, "norm": None, "epoch": 0,
                                    "batch": 0, "step": 0},
                       "run": jsonable({"scheme_index": index + 1, "records": records})},
                      {"rng": rng_state()}, label=f"after scheme {name}")
    progress.close()
    if ctx.watchdog is not None:
        ctx.watchdog.enter(-1, "writing results")

    # 6. the end: timeline, final table
    if watch.received is not None:
        log(f"note: signal {watch.received} arrived after the last training step; the run is complete")
    if ctx.trace is not None:
        ctx.trace.write(comm, cfg.timeline, metadata=machine)
        log(f"timeline: {cfg.timeline} (chrome://tracing or ui.perfetto.dev)")
    if ctx.profiler is not None and ctx.profiler.written:
        log(f"profiles (one per rank and scheme, chrome://tracing or tensorboard): "
            f"{ctx.profiler.written[0].parent}")
    comm.Barrier()
    if ctx.watchdog is not None:
        ctx.watchdog.close()
    log("\n" + format_table(records))
    if local.residency == "stream":  # rank 0's view of how well the reads were hidden
        log(f"stream: {data.x_train.prefetched} batches read ahead by the prefetcher; "
            f"training waited {data.x_train.read_s:.2f} s for batches in all")
        data.x_train.close()
    log(f"\nresults: {out}")
    return 0


def _resume_point(loaded: Optional[Loaded], index: int, first_scheme: int) -> Optional[Loaded]:
    """The checkpoint to continue scheme ``index`` from, if it stopped inside that scheme."""
    if loaded is not None and index == first_scheme and "model" in loaded.shared:
        return loaded
    return None


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


def _save_model(model: torch.nn.Module, scheme_dir: Path, rank: int, *, per_rank: bool) -> None:
    """Rank 0's state_dict as model.pt; with rank-local state (fedbn) every rank's copy too."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    targets = []
    if rank == 0:
        targets.append(scheme_dir / "model.pt")
    if per_rank:
        targets.append(scheme_dir / f"model_rank{rank:05d}.pt")
    for target in targets:
        with atomic_path(target) as tmp:
            torch.save(state, tmp)


if __name__ == "__main__":
    sys.exit(main())
