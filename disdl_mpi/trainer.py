"""Synchronous data-isolated SGD for one normalization scheme."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from .allreducer import GradientAllreducer
from .batching import BatchPlan
from .config import RunConfig
from .comm import RankInfo
from .device import seed_everything
from .evaluate import evaluate_per_rank, evaluate_sharded
from .model_sync import broadcast_module_
from .models import build_model
from .norms import get_norm, is_norm_layer
from .timeline import bucket_records
from .timing import PhaseTimer


@dataclass
class RankData:
    """This rank's resident tensors: its own training partition and the global test set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    sizes: list[int]
    num_classes: int
    sample_shape: tuple[int, ...]


@dataclass
class TrainContext:
    """Everything a scheme's training needs that does not change between schemes."""

    cfg: RunConfig
    comm: MPI.Comm          # gradients, evaluation, control
    norm_comm: MPI.Comm     # the schemes' own collectives (syncbn, bn-recal)
    info: RankInfo
    device: torch.device
    data: RankData
    model_name: str
    log: Callable[[str], None] = print
    progress: Optional[Callable[[int, int, str], None]] = None
    # timing detail: a dedicated comm for the imbalance probe, and the timeline recorder
    wait_comm: Optional[MPI.Comm] = None
    trace: Optional[Any] = None


@dataclass
class SchemeResult:
    """What one scheme's training produced on this rank (rank 0's copy is reported)."""

    norm: str
    model: torch.nn.Module
    test_accuracy: float
    per_rank_accuracy: Optional[list[float]]
    epochs: int
    steps: int
    samples: int
    train_s: float
    phases: dict[str, float]
    allreduce_path: str
    epochs_log: list[dict] = field(default_factory=list)


def _norm_state_ids(model: torch.nn.Module) -> set[int]:
    """Ids of the parameters and buffers that belong to normalization layers."""
    ids: set[int] = set()
    for m in model.modules():
        if is_norm_layer(m):
            ids.update(id(t) for t in m.parameters(recurse=False))
            ids.update(id(t) for t in m.buffers(recurse=False))
    return ids


def _aggregate(comm: MPI.Comm, values: dict[str, float]) -> dict[str, dict[str, float]]:
    """min/mean/max of each phase across ranks (every rank holds the same keys)."""
    keys = sorted(values)
    local = np.array([values[k] for k in keys], dtype=np.float64)
    lo, hi, total = local.copy(), local.copy(), local.copy()
    comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
    comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
    comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    n = comm.Get_size()
    return {k: {"min": float(lo[i]), "mean": float(total[i] / n), "max": float(hi[i])}
            for i, k in enumerate(keys)}


def total_steps(cfg: RunConfig, plan: BatchPlan) -> tuple[int, int]:
    """(epochs, steps) actually run: --steps overrides --epochs."""
    if cfg.steps is not None:
        return max(1, -(-cfg.steps // plan.steps_per_epoch)), cfg.steps
    return cfg.epochs, cfg.epochs * plan.steps_per_epoch


def train_scheme(ctx: TrainContext, norm_name: str) -> SchemeResult:
    """Train one scheme from the shared initial weights and evaluate it."""
    cfg, comm, data = ctx.cfg, ctx.comm, ctx.data
    rank = comm.Get_rank()
    scheme = get_norm(norm_name, comm=ctx.norm_comm, gn_groups=cfg.gn_groups)
    # Same seed before every build: every scheme starts from the same initial weights.
    seed_everything(cfg.seed)
    model = build_model(ctx.model_name, data.sample_shape, data.num_classes, scheme.layer)
    model = model.to(ctx.device)
    local_ids = _norm_state_ids(model) if scheme.local_params else set()
    broadcast_module_(model, comm, exclude=local_ids)

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    reducer = GradientAllreducer(
        model, comm, bucket_mb=cfg.bucket_mb, overlap=cfg.overlap, compress=cfg.compress,
        cuda_aware=cfg.cuda_aware, skip=lambda name, p: id(p) in local_ids)
    plan = BatchPlan(data.sizes, rank, cfg.global_batch_size, cfg.batching)
    epochs, max_steps = total_steps(cfg, plan)
    # syncbn must join its forward collectives even with an empty local batch.
    collective_forward = bool(getattr(scheme, "collective_forward", norm_name == "syncbn"))
    timer = PhaseTimer(ctx.device, wait_comm=ctx.wait_comm, trace=ctx.trace)
    if ctx.trace is not None:
        ctx.trace.args = {"scheme": norm_name}
    scheme_start = time.perf_counter()
    norm_comm_start = scheme.comm_seconds()
    result_log: list[dict] = []
    step = samples = 0
    train_s = 0.0
    acc, per_rank = 0.0, None

    def run_eval(epoch: int) -> tuple[float, Optional[list[float]]]:
        with timer.phase("eval"):
            if scheme.recalibrate is not None:
                scheme.recalibrate(model, data.x_train, cfg.global_batch_size)
            if scheme.per_rank_eval:
                return evaluate_per_rank(model, data.x_test, data.y_test, comm)
            # Like DDP's broadcast_buffers: running statistics come from rank 0.
            broadcast_module_(model, comm, buffers_only=True, exclude=local_ids)
            return evaluate_sharded(model, data.x_test, data.y_test, comm), None

    for epoch in range(epochs):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = np.zeros(2, dtype=np.float64)  # [sum of sample losses, samples]
        for i, idx in enumerate(plan.epoch_indices(epoch, cfg.seed)):
            if step >= max_steps:
                break
            n_global = plan.global_count(i)
            if n_global == 0:
                continue  # every rank knows this step is empty everywhere
            scheme.on_step(step)
            timer.begin_step(step)
            with timer.phase("data"):
                index = torch.as_tensor(idx, device=ctx.device, dtype=torch.long)
                xb, yb = data.x_train[index], data.y_train[index]
            with timer.phase("optimizer"):
                optimizer.zero_grad(set_to_none=False)
            reducer.begin_step(len(idx) / n_global)
            if len(idx) > 0 or collective_forward:
                with timer.phase("forward"):
                    logits = model(xb)
                    loss_total = F.cross_entropy(logits, yb, reduction="sum")
                    # The local mean; its gradient, weighted by n_local/n_global and summed
                    # over ranks, is the exact gradient of the global-batch mean.
                    loss = loss_total / max(1, len(idx))
                with timer.phase("backward"):
                    loss.backward()
                loss_sum += (float(loss_total.detach()), len(idx))
            timer.wait_for_peers()
            with timer.phase("allreduce"):
                stats = reducer.finish_step()
            timer.add("allreduce_total", stats.get("total_s", 0.0))
            if ctx.trace is not None:
                ctx.trace.buckets(bucket_records(reducer))
            with timer.phase("optimizer"):
                optimizer.step()
            timer.end_step()
            step += 1
            samples += n_global
            if ctx.progress:
                ctx.progress(step, max_steps, f"{norm_name} epoch {epoch + 1}/{epochs}")
        train_s += time.perf_counter() - epoch_start
        comm.Allreduce(MPI.IN_PLACE, loss_sum, op=MPI.SUM)
        last = epoch == epochs - 1 or step >= max_steps
        if last or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0):
            acc, per_rank = run_eval(epoch)
        result_log.append({"epoch": epoch + 1, "step": step,
                           "train_loss": loss_sum[0] / max(1.0, loss_sum[1]),
                           "test_accuracy": acc, "wall_s": train_s})
        if rank == 0 and ctx.progress is None:
            ctx.log(f"  {norm_name:>9} epoch {epoch + 1:3d}/{epochs}  loss "
                    f"{result_log[-1]['train_loss']:.4f}  test acc {acc:.4f}")
        if step >= max_steps:
            break

    timer.add("norm_comm", scheme.comm_seconds() - norm_comm_start)
    if ctx.trace is not None:
        ctx.trace.complete(f"scheme {norm_name}", scheme_start,
                           time.perf_counter() - scheme_start, cat="scheme")
    return SchemeResult(
        norm=norm_name, model=model, test_accuracy=acc, per_rank_accuracy=per_rank,
        epochs=len(result_log), steps=step, samples=samples, train_s=train_s,
        phases=timer.totals(), allreduce_path=reducer.path, epochs_log=result_log)


def phase_summary(comm: MPI.Comm, phases: dict[str, float]) -> dict[str, dict[str, float]]:
    """Collective: each phase as min/mean/max over ranks."""
    return _aggregate(comm, phases)
