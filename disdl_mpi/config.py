"""The run configuration: one dataclass, filled by the command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from disdl_mpi.comm.torch_group import COMM_PATHS
from disdl_mpi.data.layout import partition_dir
from disdl_mpi.models import MODELS as MODEL_NAMES
from disdl_mpi.norms import resolve_schemes, scheme_config_errors
from disdl_mpi.observe.profiler import parse_profile_steps
from disdl_mpi.options import (
    DefaultsHelpFormatter,
    add_dataset,
    add_norm,
    add_partition,
    add_progress,
    positive_int,
)
from disdl_mpi.reliability.checkpoint import parse_every
from disdl_mpi.schedule import SCHEDULES
from disdl_mpi.units import parse_size


@dataclass
class RunConfig:
    """Every setting of one ``python -m disdl_mpi.run`` job (all ranks hold the same copy)."""

    # data
    dataset: str = "digits"
    partition: str = "dirichlet:0.1"
    data_dir: Optional[str] = None
    source_dir: Optional[str] = None
    min_per_rank: int = 1
    virtual_ranks: int = 1  # isolated ranks per MPI process (disdl_mpi.virtual_ranks)
    # model and normalization
    norm: str = "all"
    model: str = "auto"
    gn_groups: int = 8
    fix_at: Optional[int] = None  # bn-fix: the step T* where statistics freeze
    fix_ramp: Optional[int] = None  # bn-fix: steps over which the switch is ramped in (None: auto)
    carry_grad: str = "local"  # bn-carry's gradient path: local, exact, none or carried
    carry_eval: str = "running"  # bn-carry's evaluation statistics: running (the ablation's best) or last
    # optimisation
    epochs: int = 12
    steps: Optional[int] = None
    global_batch_size: int = 128
    batching: str = "proportional"
    lr: float = 0.05
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    target_accuracy: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    # communication
    comm: str = "auto"  # the data path: mpi, gloo or nccl (auto: mpi on CPU, the doctor's on GPU)
    bucket_mb: float = 1.0
    overlap: bool = True
    compress: str = "none"
    cuda_aware: str = "auto"
    device: str = "auto"
    threads: Optional[int] = None
    # output and observability
    out: Optional[str] = None
    save_model: bool = False
    timeline: Optional[str] = None
    eval_every: int = 1
    progress: str = "auto"
    # reliability
    check_collectives: bool = False
    checkpoint_every: Optional[str] = None
    resume: Optional[str] = None
    on_nan: str = "stop"
    stall_timeout: Optional[float] = None
    memory_budget: Optional[str] = None
    data_residency: str = "auto"
    profile_steps: Optional[str] = None

    def schemes(self) -> list[str]:
        """The schemes to train, in order (ValueError naming an unknown one)."""
        return resolve_schemes(self.norm)

    def isolated_ranks(self, processes: int) -> int:
        """The world of isolated ranks (partitions) that ``processes`` MPI processes train."""
        return processes * self.virtual_ranks

    def resolved_data_dir(self, world_size: int) -> Path:
        """Where the partition lives; by default data_prep's one naming rule under data/."""
        if self.data_dir:
            return Path(self.data_dir)
        return partition_dir("data", self.dataset, self.partition, world_size, self.seed)

    def resolved_out(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("results") / time.strftime("run-%Y%m%d-%H%M%S")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def option(group: argparse._ActionsContainer, flag: str, **kwargs: Any) -> None:
    """One option of the run: its ``dest`` is the RunConfig field it fills (from the flag unless
    given), its default that field's default -- written once, in the dataclass."""
    dest = kwargs.setdefault("dest", flag[2:].replace("-", "_"))
    group.add_argument(flag, default=getattr(RunConfig, dest), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every option maps one-to-one to a RunConfig field."""
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog="python -m disdl_mpi.run",
        description="Data-isolated synchronous SGD over MPI: every rank trains on its own "
        "private partition, gradients are allreduced each step, and each "
        "normalization scheme is trained and measured in turn. "
        "Launch with: mpirun -n N python -m disdl_mpi.run [options]",
        formatter_class=DefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    add_dataset(g, default=d.dataset, when="source to partition when --data-dir is missing")
    add_partition(g, d.partition, when="used when the partition must be built")
    option(
        g,
        "--data-dir",
        help="folder of per-rank partitions (rank_00000.h5 ...); built by rank 0 if "
        "missing (default: data/<dataset>-<partition>-n<N>-s<seed>)",
    )
    option(g, "--source-dir", help="where the raw files of mnist/cifar/npz sources are")
    option(
        g,
        "--min-per-rank",
        type=int,
        help="minimum training samples per rank when building a partition (0 allows empty ranks)",
    )
    option(
        g,
        "--virtual-ranks",
        type=int,
        help="isolated ranks per MPI process: P processes train a partition of P x K ranks, each "
        "process its K rank files, with the same result as P x K MPI ranks (per-phase times are "
        "per process)",
    )
    g = p.add_argument_group("model and normalization")
    add_norm(g, d.norm)
    option(g, "--model", help="cnn, resnet20, mlp, or auto")
    option(g, "--gn-groups", type=positive_int, help="groups for GroupNorm (capped by the channel count)")
    option(
        g,
        "--fix-at",
        type=int,
        help="bn-fix: optimizer step at which the BN statistics are recalibrated "
        "over all ranks and frozen (default: half of the training steps)",
    )
    option(
        g,
        "--fix-ramp",
        type=int,
        help="bn-fix: steps after T* over which normalization moves from the batch's statistics to "
        "the frozen ones (Batch Renorm's clipping relaxed to r_max 5, d_max 5, where it stays); "
        "0: frozen at once and unclipped, as FixBN (default: a fifth of the steps left)",
    )
    option(
        g,
        "--carry-grad",
        choices=["local", "exact", "none", "carried"],
        help="bn-carry's gradient: through this rank's batch statistics (local), through its "
        "current moments pooled with the other ranks' previous ones (exact), none, or BN's "
        "backward with the previous step's global means of dy and dy*xhat (carried)",
    )
    option(g, "--carry-eval", choices=["last", "running"], help="bn-carry's evaluation statistics")
    g = p.add_argument_group("optimisation")
    option(g, "--epochs", type=int)
    option(g, "--steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    option(g, "--global-batch-size", type=int, help="samples per step summed over all ranks")
    option(
        g,
        "--batching",
        choices=["proportional", "equal"],
        help="proportional: the global batch is split in proportion to partition "
        "sizes, so all ranks finish an epoch together; equal: every rank takes "
        "B/N per step and a rank that runs out joins with empty batches",
    )
    option(g, "--lr", type=float)
    option(
        g,
        "--lr-schedule",
        choices=SCHEDULES,
        help="constant, cosine (to 0 over the run) or step (x0.1 at 50 and 75 %%)",
    )
    option(g, "--warmup-epochs", type=float, help="linear learning-rate warm-up over this many epochs")
    option(
        g,
        "--target-accuracy",
        type=float,
        help="record the first epoch and training time at which the test accuracy reaches this (0..1)",
    )
    option(g, "--momentum", type=float)
    option(g, "--weight-decay", type=float)
    option(g, "--seed", type=int)
    g = p.add_argument_group("communication")
    option(
        g,
        "--comm",
        choices=["auto", *COMM_PATHS],
        help="the data path of gradients and syncbn's statistics: MPI, or a torch.distributed group "
        "started from MPI (auto: mpi on CPU; on GPU nccl where NCCL admits the ranks, else mpi)",
    )
    option(g, "--bucket-mb", type=float, help="gradient fusion bucket size in MiB; 0 = one buffer per tensor")
    option(
        g,
        "--overlap",
        dest="overlap",
        action="store_true",
        help="start bucket allreduces from the gradient hooks during backward",
    )
    option(g, "--no-overlap", dest="overlap", action="store_false")
    option(g, "--compress", choices=["none", "fp16"], help="wire format of gradients")
    option(
        g,
        "--cuda-aware",
        choices=["auto", "yes", "no"],
        help="pass GPU buffers to MPI directly (auto: detect)",
    )
    option(g, "--device", help="auto, cpu or cuda")
    option(g, "--threads", type=int, help="torch threads per rank (default: cores on the node / local ranks)")
    g = p.add_argument_group("output")
    option(g, "--out", help="results folder (default: results/run-<timestamp>)")
    option(g, "--save-model", action="store_true", help="write OUT/<norm>/model.pt")
    option(g, "--timeline", help="write a Chrome trace (chrome://tracing, Perfetto) to this file")
    option(
        g, "--eval-every", type=int, help="evaluate on the test set every N epochs (and always at the end)"
    )
    add_progress(g, d.progress)
    g = p.add_argument_group("reliability")
    option(
        g,
        "--check-collectives",
        action="store_true",
        help="debug: all ranks compare each collective's signature before it runs",
    )
    option(g, "--checkpoint-every", help="checkpoint every N steps, or every Ne epochs (e.g. 50 or 2e)")
    option(g, "--resume", help="auto, or a checkpoint path")
    option(
        g,
        "--on-nan",
        choices=["stop", "skip"],
        help="what to do when the loss or a gradient is NaN/Inf on any rank",
    )
    option(
        g,
        "--stall-timeout",
        type=float,
        metavar="SECONDS",
        help="when a rank has been stuck this long (e.g. in a collective), name the "
        "ranks that have not arrived and where the others wait, then end the "
        "job with exit code 5; 0 turns the watchdog off (default: on, reporting after 60 s, "
        "ending when a rank is silent for 120 s or nothing moves for 600 s)",
    )
    option(
        g,
        "--profile-steps",
        metavar="A:B",
        help="record steps A to B (from 1) of each scheme with torch.profiler on "
        "every rank, our phases as named ranges; one trace per rank next to "
        "--timeline, else in OUT/profile/",
    )
    option(
        g,
        "--memory-budget",
        metavar="SIZE",
        help="most memory a rank may use for its resident data (e.g. 2G); a "
        "partition over it is refused before loading (default: 70%% of the "
        "node's, or the GPU's, available memory over the ranks sharing it)",
    )
    option(
        g,
        "--data-residency",
        choices=["auto", "device", "host", "stream"],
        help="training inputs resident on the device, in host memory, or streamed "
        "from the rank's file by a prefetching thread; auto: device when the "
        "partition fits --memory-budget, else stream (same model either way)",
    )
    return p


def config_errors(cfg: RunConfig, world_size: int) -> list[str]:
    """Problems every rank can see alike from the configuration alone."""
    errors = []
    try:
        schemes = cfg.schemes()
    except ValueError as exc:
        errors.append(str(exc))
        schemes = []
    if cfg.model != "auto" and cfg.model not in MODEL_NAMES:
        errors.append(f"--model: unknown model {cfg.model!r}; known: auto, {', '.join(MODEL_NAMES)}")
    if not cfg.lr > 0:
        errors.append(f"--lr must be positive, got {cfg.lr}")
    if cfg.momentum < 0 or cfg.weight_decay < 0:
        errors.append("--momentum and --weight-decay must not be negative")
    if cfg.virtual_ranks < 1:
        errors.append(f"--virtual-ranks must be >= 1, got {cfg.virtual_ranks}")
    ranks = world_size * max(1, cfg.virtual_ranks)
    if cfg.global_batch_size < ranks:
        errors.append(
            f"--global-batch-size {cfg.global_batch_size} is smaller than the "
            f"{ranks} ranks: every rank needs at least one sample per step"
        )
    if cfg.virtual_ranks > 1 and cfg.data_residency == "stream":
        errors.append("--virtual-ranks > 1 cannot stream training data (--data-residency stream)")
    if cfg.steps is None and cfg.epochs <= 0:
        errors.append(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.steps is not None and cfg.steps <= 0:
        errors.append(f"--steps must be positive, got {cfg.steps}")
    if cfg.warmup_epochs < 0:
        errors.append(f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    if cfg.target_accuracy is not None and not 0 < cfg.target_accuracy <= 1:
        errors.append(f"--target-accuracy must be in (0, 1], got {cfg.target_accuracy}")
    if cfg.comm == "nccl" and cfg.device == "cpu":
        errors.append("--comm nccl needs --device cuda (or auto on a GPU node); on CPU use mpi or gloo")
    if cfg.fix_ramp is not None and cfg.fix_ramp < 0:
        errors.append(f"--fix-ramp must be >= 0, got {cfg.fix_ramp}")
    if cfg.fix_at is not None and cfg.fix_at < 0:
        errors.append(f"--fix-at must be >= 0, got {cfg.fix_at}")
    errors += scheme_config_errors(schemes, cfg)
    if cfg.stall_timeout is not None and not cfg.stall_timeout >= 0:
        errors.append(f"--stall-timeout must be >= 0 (0 = off), got {cfg.stall_timeout}")
    if cfg.profile_steps is not None:
        try:
            parse_profile_steps(cfg.profile_steps)
        except ValueError as exc:
            errors.append(str(exc))
    if cfg.memory_budget is not None:
        try:
            parse_size(cfg.memory_budget, "--memory-budget")
        except ValueError as exc:
            errors.append(str(exc))
    if cfg.bucket_mb < 0:
        errors.append(f"--bucket-mb must be >= 0, got {cfg.bucket_mb}")
    try:
        parse_every(cfg.checkpoint_every)
    except ValueError as exc:
        errors.append(str(exc))
    if cfg.resume is not None and not cfg.resume.strip():
        errors.append("--resume must be 'auto' or a checkpoint folder")
    return errors


def parse_config(argv: list[str] | None, rank: int) -> RunConfig:
    """Parse on every rank (same argv), but let only rank 0 print usage, help or errors."""
    parser = build_parser()
    sink = io.StringIO()
    quiet = contextlib.redirect_stdout(sink) if rank else contextlib.nullcontext()
    quiet_err = contextlib.redirect_stderr(sink) if rank else contextlib.nullcontext()
    with quiet, quiet_err:
        ns = parser.parse_args(argv)
    return RunConfig(**vars(ns))
