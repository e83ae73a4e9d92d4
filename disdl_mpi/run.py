"""The main job: ``mpirun -n N python -m disdl_mpi.run [options]``.

Every rank trains on its own private partition; gradients are allreduced every step; each
requested normalization scheme is trained in turn from the same initial weights and measured.
"""
from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from . import __version__
from .atomic import atomic_path
from .checkpoint import Checkpointer, jsonable, parse_every, rng_state
from .collective_check import CheckedComm, CollectiveChecker
from .comm import UserError, agree_or_raise, install_abort_handler, mpi_library, rank_info, world
from .config import RunConfig, build_parser
from .guards import SignalWatch, StepGuard
from .device import describe_device, select_device, seed_everything, set_threads
from .models import MODELS as MODEL_NAMES
from .norms import available_norms
from .partition_io import load_partition
from .progress import make_progress
from .results import format_table, write_metrics, write_summary
from .report_machine import cpu_model
from .timeline import TraceRecorder
from .timing import detail_requested, timing_fields
from .trainer import RankData, TrainContext, phase_summary, train_scheme


def parse_args(argv: list[str] | None, rank: int) -> RunConfig:
    """Parse on every rank (same argv), but let only rank 0 print usage, help or errors."""
    parser = build_parser()
    sink = io.StringIO()
    quiet = contextlib.redirect_stdout(sink) if rank else contextlib.nullcontext()
    quiet_err = contextlib.redirect_stderr(sink) if rank else contextlib.nullcontext()
    with quiet, quiet_err:
        ns = parser.parse_args(argv)
    return RunConfig(**vars(ns))


def config_errors(cfg: RunConfig, world_size: int) -> list[str]:
    """Problems every rank can see alike from the configuration alone."""
    errors = []
    known = available_norms()
    for name in cfg.norms(known):
        if name not in known:
            errors.append(f"--norm: unknown scheme {name!r}; known: {', '.join(known)}, all")
    if not cfg.norms(known):
        errors.append("--norm: no scheme given")
    if cfg.model != "auto" and cfg.model not in MODEL_NAMES:
        errors.append(f"--model: unknown model {cfg.model!r}; known: auto, "
                      f"{', '.join(MODEL_NAMES)}")
    if not cfg.lr > 0:
        errors.append(f"--lr must be positive, got {cfg.lr}")
    if cfg.momentum < 0 or cfg.weight_decay < 0:
        errors.append("--momentum and --weight-decay must not be negative")
    if cfg.global_batch_size < world_size:
        errors.append(f"--global-batch-size {cfg.global_batch_size} is smaller than the "
                      f"{world_size} ranks: every rank needs at least one sample per step")
    if cfg.steps is None and cfg.epochs <= 0:
        errors.append(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.steps is not None and cfg.steps <= 0:
        errors.append(f"--steps must be positive, got {cfg.steps}")
    if cfg.bucket_mb < 0:
        errors.append(f"--bucket-mb must be >= 0, got {cfg.bucket_mb}")
    try:
        parse_every(cfg.checkpoint_every)
    except ValueError as exc:
        errors.append(str(exc))
    if cfg.resume is not None and not cfg.resume.strip():
        errors.append("--resume must be 'auto' or a checkpoint folder")
    return errors


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


def ensure_partition(cfg: RunConfig, comm: MPI.Comm, data_dir: Path) -> None:
    """Rank 0 builds the partition when the folder is missing; the others wait for it."""
    error = None
    if comm.Get_rank() == 0 and not (data_dir / "partition.json").exists() \
            and not any(data_dir.glob("rank_*.h5")):
        try:
            from data_prep.partition import build_partitions
            print(f"building partition {data_dir} ({cfg.dataset}, {cfg.partition}, "
                  f"{comm.Get_size()} ranks, seed {cfg.seed})", flush=True)
            build_partitions(cfg.dataset, comm.Get_size(), cfg.partition, cfg.seed, data_dir,
                             source_dir=cfg.source_dir, min_per_rank=cfg.min_per_rank)
        except Exception as exc:  # reported on every rank below, never a hang
            error = f"building partition {data_dir} on rank 0 failed: {exc}"
    error = comm.bcast(error, root=0)
    if error:
        raise UserError(error, collective=True)


def standardize(x_train: np.ndarray, x_test: np.ndarray, comm: MPI.Comm,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (images) or per-feature (flat) standardization from allreduced sums.

    No rank needs anyone else's samples: only counts, sums and sums of squares travel.
    """
    axes = (0,) + tuple(range(2, x_train.ndim))
    xt = torch.from_numpy(np.ascontiguousarray(x_train)).to(device, torch.float32)
    xs = torch.from_numpy(np.ascontiguousarray(x_test)).to(device, torch.float32)
    per_value = int(np.prod([x_train.shape[a] for a in axes[1:]], dtype=np.int64))
    stats = np.concatenate([
        [x_train.shape[0] * per_value],
        xt.double().sum(dim=axes).cpu().numpy(),
        (xt.double() ** 2).sum(dim=axes).cpu().numpy(),
    ])
    comm.Allreduce(MPI.IN_PLACE, stats, op=MPI.SUM)
    c = (stats.size - 1) // 2
    count = max(1.0, stats[0])
    mean = stats[1:1 + c] / count
    var = np.maximum(stats[1 + c:] / count - mean ** 2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0  # constant features (e.g. blank digit borders) stay as they are
    shape = (1, c) + (1,) * (x_train.ndim - 2)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
    return (xt - m) / s, (xs - m) / s


def machine_info(comm: MPI.Comm, info, device: torch.device, threads: int) -> dict:
    return {
        "world_size": info.world_size, "ranks_per_node": info.local_size,
        "nodes": len(set(comm.allgather(info.hostname))), "hostname": info.hostname,
        "cpu": platform.processor() or platform.machine(), "cores_per_node": os.cpu_count(),
        "cpu_model": cpu_model(),
        "device": describe_device(device), "mpi_library": mpi_library(),
        "mpi4py": __import__("mpi4py").__version__, "torch": torch.__version__,
        "python": platform.python_version(), "threads_per_rank": threads,
        "disdl_mpi": __version__,
    }


def main(argv: list[str] | None = None) -> int:
    comm = world()
    install_abort_handler(comm)
    # SIGTERM/SIGUSR1 only set a flag; the step loop checkpoints and stops at a step boundary.
    watch = SignalWatch().install()
    rank = comm.Get_rank()
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)

    cfg = parse_args(argv, rank)
    if cfg.check_collectives:  # debug mode: every collective below is compared across ranks
        comm = CheckedComm(comm, CollectiveChecker(comm))
    errors = config_errors(cfg, comm.Get_size())
    out = cfg.resolved_out()
    if rank == 0 and not errors:
        err = check_output_dir(out)
        errors += [err] if err else []
    agree_or_raise(comm, "\n".join(errors) if errors else None)
    norms = cfg.norms(available_norms())

    info = rank_info(comm)
    device = select_device(cfg.device, info)
    threads = set_threads(cfg.threads, info)
    seed_everything(cfg.seed)
    data_dir = cfg.resolved_data_dir(info.world_size)
    ensure_partition(cfg, comm, data_dir)
    local = load_partition(comm, data_dir)
    dataset = local.manifest.get("dataset", cfg.dataset)
    args = sys.argv[1:] if argv is None else argv
    explicit_dataset = any(a == "--dataset" or a.startswith("--dataset=") for a in args)
    if explicit_dataset and dataset != cfg.dataset:
        raise UserError(f"{data_dir / 'partition.json'}: field 'dataset' is {dataset!r}, but "
                        f"--dataset {cfg.dataset} was asked for", collective=True)
    x_train, x_test = standardize(local.x_train, local.x_test, comm, device)
    data = RankData(
        x_train=x_train, y_train=torch.as_tensor(local.y_train, dtype=torch.long, device=device),
        x_test=x_test, y_test=torch.as_tensor(local.y_test, dtype=torch.long, device=device),
        sizes=list(local.sizes), num_classes=int(local.num_classes),
        sample_shape=tuple(local.sample_shape))
    model_name = cfg.model if cfg.model != "auto" else ("cnn" if len(data.sample_shape) == 3
                                                         else "mlp")
    machine = machine_info(comm, info, device, threads)
    log(f"disdl-mpi {__version__}: {info.world_size} ranks on {machine['nodes']} node(s), "
        f"{machine['mpi_library']}, torch {torch.__version__}, device {machine['device']}, "
        f"{threads} thread(s) per rank")
    log(f"data {data_dir}: {sum(data.sizes)} training samples over {info.world_size} ranks "
        f"(min {min(data.sizes)}, max {max(data.sizes)}), {data.x_test.shape[0]} test samples, "
        f"model {model_name}, schemes: {', '.join(norms)}")

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
    ctx = TrainContext(cfg=cfg, comm=comm, norm_comm=comm.Dup(), info=info, device=device,
                       data=data, model_name=model_name, log=log,
                       progress=make_progress(cfg.progress, rank),
                       wait_comm=comm.Dup() if detail_requested(cfg.timeline) else None,
                       trace=TraceRecorder(comm) if cfg.timeline else None,
                       guard=StepGuard(comm, watch), checkpointer=ckpt,
                       checkpoint_every=parse_every(cfg.checkpoint_every))
    for index, name in enumerate(norms):
        if index < first_scheme:
            continue
        ctx.run_state = lambda: {"scheme_index": index, "records": records}
        ctx.resume = loaded if (loaded is not None and index == first_scheme
                                and "model" in loaded.shared) else None
        start = time.perf_counter()
        res = train_scheme(ctx, name)
        wall = time.perf_counter() - start
        phases = phase_summary(comm, res.phases)
        record = {
            "world_size": info.world_size, "norm": name, "model": model_name,
            "dataset": dataset, "partition": local.manifest.get("scheme", cfg.partition),
            "data_dir": str(data_dir), "epochs": res.epochs, "steps": res.steps,
            "test_accuracy": res.test_accuracy,
            "samples_per_s": res.samples / max(1e-9, res.train_s),
            "phases": {k: v["mean"] for k, v in phases.items()},
            "phases_detail": phases, "device": machine["device"],
            "mpi_library": machine["mpi_library"], "allreduce_path": res.allreduce_path,
            "threads_per_rank": threads, "wall_s": wall, "train_s": res.train_s,
            "global_batch_size": cfg.global_batch_size, "batching": cfg.batching,
            "per_rank_accuracy": res.per_rank_accuracy, "epochs_log": res.epochs_log,
            "grad_bytes": sum(p.numel() * p.element_size() for p in res.model.parameters()
                              if p.requires_grad),
            "skipped_steps": res.skipped_steps,
        }
        record.update(timing_fields(phases, measured_wait=ctx.wait_comm is not None,
                                    cuda=device.type == "cuda"))
        records.append(record)
        scheme_dir = out / name
        if rank == 0:
            write_metrics(scheme_dir / "metrics.csv", res.epochs_log)
            log(f"{name}: test accuracy {res.test_accuracy:.4f}, "
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
    if watch.received is not None:
        log(f"note: signal {watch.received} arrived after the last training step; the run is complete")
    if ctx.trace is not None:
        ctx.trace.write(comm, cfg.timeline, metadata=machine)
        log(f"timeline: {cfg.timeline} (chrome://tracing or ui.perfetto.dev)")
    comm.Barrier()
    log("\n" + format_table(records))
    log(f"\nresults: {out}")
    return 0


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
