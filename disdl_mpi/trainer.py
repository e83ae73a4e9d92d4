"""Synchronous data-isolated SGD for one normalization scheme."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from .allreducer import GradientAllreducer
from .batching import BatchPlan
from .checkpoint import jsonable, model_parts, restore_model, rng_state, set_rng_state
from .config import RunConfig
from .comm import RankInfo
from .device import seed_everything
from .evaluate import evaluate_per_rank, evaluate_sharded
from .guards import GradFiniteProbe, NumericalError, Preempted, signal_name
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
    # reliability: the per-step agreement (guards.StepGuard), the checkpoint writer
    # (checkpoint.Checkpointer), its schedule (("steps"|"epochs", N) or None) and the run-level
    # part of a checkpoint (scheme index, finished records), supplied by run.main
    guard: Optional[Any] = None
    checkpointer: Optional[Any] = None
    checkpoint_every: Optional[tuple[str, int]] = None
    run_state: Optional[Callable[[], dict]] = None
    # a checkpoint.Loaded positioned inside the next scheme to train, or None (set by run.main)
    resume: Optional[Any] = None


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
    skipped_steps: int = 0


def _norm_state_ids(model: torch.nn.Module) -> set[int]:
    """Ids of the parameters and buffers that belong to normalization layers."""
    ids: set[int] = set()
    for m in model.modules():
        if is_norm_layer(m):
            ids.update(id(t) for t in m.parameters(recurse=False))
            ids.update(id(t) for t in m.buffers(recurse=False))
    return ids


def phase_summary(comm: MPI.Comm, values: dict[str, float]) -> dict[str, dict[str, float]]:
    """Collective: min/mean/max of each phase across ranks (every rank holds the same keys)."""
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
    """Train one scheme from the shared initial weights (or a checkpoint) and evaluate it.

    ``ctx.resume``, a ``checkpoint.Loaded`` positioned inside this scheme: training continues
    from its step with the model, optimizer, RNG and batch-plan position restored, so the
    result is bitwise the one of an uninterrupted run.
    """
    cfg, comm, data = ctx.cfg, ctx.comm, ctx.data
    rank = comm.Get_rank()
    resume = ctx.resume
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
    timer = PhaseTimer(ctx.device, wait_comm=ctx.wait_comm, trace=ctx.trace)
    if ctx.trace is not None:
        ctx.trace.args = {"scheme": norm_name}
    scheme_start = time.perf_counter()
    norm_comm_start = scheme.comm_seconds()
    guard = ctx.guard
    guard_start = guard.seconds if guard is not None else 0.0
    probe = GradFiniteProbe(model) if guard is not None else None
    skip_nan = cfg.on_nan == "skip"
    every = ctx.checkpoint_every
    result_log: list[dict] = []
    step = samples = skipped = 0
    train_s = 0.0
    acc, per_rank = 0.0, None
    start_epoch = start_batch = 0
    loss_sum = np.zeros(2, dtype=np.float64)  # [sum of sample losses, samples] of the epoch
    if resume is not None:
        restore_model(model, optimizer, resume.shared, resume.local)
        pos, st = resume.shared["position"], resume.shared["scheme_state"]
        start_epoch, start_batch, step = pos["epoch"], pos["batch"], pos["step"]
        samples, train_s, skipped = st["samples"], st["train_s"], st["skipped"]
        result_log, acc, per_rank = list(st["epochs_log"]), st["acc"], st["per_rank"]
        loss_sum = resume.local["loss_sum"].numpy().astype(np.float64).copy()
        set_rng_state(resume.local["rng"])
        for k, v in st.get("phases", {}).items():
            timer.add(k, v)  # phase totals cover the whole scheme, before and after resume

    def run_eval(epoch: int) -> tuple[float, Optional[list[float]]]:
        with timer.phase("eval"):
            if scheme.recalibrate is not None:
                scheme.recalibrate(model, data.x_train, cfg.global_batch_size)
            if scheme.per_rank_eval:
                return evaluate_per_rank(model, data.x_test, data.y_test, comm)
            # Like DDP's broadcast_buffers: running statistics come from rank 0.
            broadcast_module_(model, comm, buffers_only=True, exclude=local_ids)
            return evaluate_sharded(model, data.x_test, data.y_test, comm), None

    def checkpoint(epoch: int, batch: int, label: str) -> Any:
        """Collective: commit the state at this step boundary (position = next batch)."""
        shared, local = model_parts(model, optimizer)
        shared["position"] = {"scheme_index": ctx.run_state()["scheme_index"] if ctx.run_state
                              else 0, "norm": norm_name, "epoch": epoch, "batch": batch,
                              "step": step}
        shared["scheme_state"] = {
            "samples": samples, "train_s": train_s + (time.perf_counter() - epoch_start
                                                      if batch else 0.0),
            "skipped": skipped, "epochs_log": jsonable(result_log), "acc": float(acc),
            "per_rank": per_rank, "phases": {k: float(v) for k, v in timer.seconds.items()}}
        shared["run"] = jsonable(ctx.run_state()) if ctx.run_state else {}
        local["rng"] = rng_state()
        local["loss_sum"] = torch.from_numpy(loss_sum.copy())
        return ctx.checkpointer.save(shared, local, label=label)

    for epoch in range(start_epoch, epochs):
        model.train()
        epoch_start = time.perf_counter()
        first = start_batch if epoch == start_epoch else 0
        if first == 0:
            loss_sum = np.zeros(2, dtype=np.float64)
        batches = plan.epoch_indices(epoch, cfg.seed)
        for i in range(first, len(batches)):
            idx = batches[i]
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
            # --on-nan skip must undo what forward did to running statistics.
            saved_buffers = [b.detach().clone() for b in model.buffers()] if skip_nan else None
            reducer.begin_step(len(idx) / n_global)
            step_loss, loss_bad = None, False
            # syncbn must join its forward collectives even with an empty local batch.
            if len(idx) > 0 or scheme.collective_forward:
                with timer.phase("forward"):
                    logits = model(xb)
                    loss_total = F.cross_entropy(logits, yb, reduction="sum")
                    # The local mean; its gradient, weighted by n_local/n_global and summed
                    # over ranks, is the exact gradient of the global-batch mean.
                    loss = loss_total / max(1, len(idx))
                with timer.phase("backward"):
                    loss.backward()
                step_loss = float(loss_total.detach())
                loss_bad = not math.isfinite(step_loss)
            timer.wait_for_peers()
            with timer.phase("allreduce"):
                stats = reducer.finish_step()
            timer.add("allreduce_total", stats.get("total_s", 0.0))
            if ctx.trace is not None:
                ctx.trace.buckets(bucket_records(reducer))
            with timer.phase("guard"):  # the per-step NaN/signal agreement collective
                decision = guard.decide(loss_bad, probe.take()) if guard is not None else None
            if decision is not None and decision.nonfinite:
                where = (f"non-finite {decision.nonfinite_kind} on rank "
                         f"{decision.nonfinite_rank} at optimizer step {step + 1} (scheme "
                         f"{norm_name}, epoch {epoch + 1})")
                if not skip_nan:
                    raise NumericalError(f"{where}: stopping (--on-nan stop); lower --lr, or "
                                         f"use --on-nan skip to skip such steps")
                ctx.log(f"  {where}: step skipped (--on-nan skip)")
                with torch.no_grad():
                    for b, old in zip(model.buffers(), saved_buffers):
                        b.copy_(old)
                skipped += 1
                timer.end_step()
            else:
                with timer.phase("optimizer"):
                    optimizer.step()
                timer.end_step()
                if step_loss is not None:
                    loss_sum += (step_loss, len(idx))
            step += 1
            samples += n_global
            if ctx.progress:
                ctx.progress(step, max_steps, f"{norm_name} epoch {epoch + 1}/{epochs}")
            if decision is not None and decision.preempt:
                name = signal_name(decision.signum)
                if ctx.checkpointer is None:
                    raise Preempted(f"{name} received on rank {decision.signal_rank}: stopped "
                                    f"at step {step} of scheme {norm_name} (no checkpointer)",
                                    decision.signum)
                path = checkpoint(epoch, i + 1, f"{name} at step {step}")
                raise Preempted(f"{name} received on rank {decision.signal_rank}: checkpoint "
                                f"of scheme {norm_name} at step {step} written to {path}; "
                                f"resume with --resume auto (same --out)", decision.signum)
            if every and every[0] == "steps" and step % every[1] == 0 and step < max_steps:
                checkpoint(epoch, i + 1, f"every {every[1]} steps")
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
        if every and every[0] == "epochs" and (epoch + 1) % every[1] == 0:
            checkpoint(epoch + 1, 0, f"every {every[1]} epochs")

    if probe is not None:
        probe.close()
    reducer.close()
    timer.add("norm_comm", scheme.comm_seconds() - norm_comm_start)
    if guard is not None:
        timer.add("step_guard", guard.seconds - guard_start)
    if ctx.trace is not None:
        ctx.trace.complete(f"scheme {norm_name}", scheme_start,
                           time.perf_counter() - scheme_start, cat="scheme")
    return SchemeResult(
        norm=norm_name, model=model, test_accuracy=acc, per_rank_accuracy=per_rank,
        epochs=len(result_log), steps=step, samples=samples, train_s=train_s,
        phases=timer.totals(), allreduce_path=reducer.path, epochs_log=result_log,
        skipped_steps=skipped)
