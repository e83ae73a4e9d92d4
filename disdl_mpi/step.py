"""One synchronous data-isolated SGD step: the toolkit's "hello world".

    reducer = GradientAllreducer(model, comm)
    for xb, yb, n_global in my_batches:          # n_global: samples summed over all ranks
        sync_step(model, optimizer, reducer, xb, yb, n_global)

Every rank computes the mean loss of its OWN batch; the allreducer scales each gradient by
``n_local / n_global`` and sums over ranks, so the update is exactly the gradient of the mean
over the global batch, whatever the per-rank batch sizes (a rank with no samples still joins the
gradient sum). The trainer, every in-job benchmark and the tests run this one function.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from disdl_mpi.comm.allreducer import GradientAllreducer

# (logits, labels) -> the SUMMED loss of the batch (the step divides by the local count)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PhaseFn = Callable[[str], ContextManager[None]]


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


def _no_phase(name: str) -> ContextManager[None]:  # noqa: ARG001 - the PhaseFn signature
    return contextlib.nullcontext()


@dataclass
class StepResult:
    """What one step did on this rank."""

    samples: int  # this rank's batch size
    loss_sum: Optional[float] = None  # summed local loss; None when no forward ran
    comm: dict = field(default_factory=dict)  # the allreducer's finish_step() figures

    @property
    def loss_finite(self) -> bool:
        return self.loss_sum is None or math.isfinite(self.loss_sum)


def sync_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    reducer: Optional[GradientAllreducer],
    xb: torch.Tensor,
    yb: torch.Tensor,
    n_global: int,
    *,
    loss_fn: LossFn = summed_cross_entropy,
    phase: PhaseFn = _no_phase,
    forward_when_empty: bool = False,
    before_sync: Optional[Callable[[], None]] = None,
    before_update: Optional[Callable[[StepResult], bool]] = None,
) -> StepResult:
    """Run one step on this rank; collective over the reducer's communicator.

    1. zero the gradients (in place: they are views into the allreducer's buckets);
    2. ``reducer.begin_step(n_local / n_global)``;
    3. forward and the local mean loss (skipped on an empty batch unless
       ``forward_when_empty``: syncbn's forward is itself collective);
    4. backward: the gradient hooks scale each gradient and launch its bucket's allreduce;
    5. ``before_sync()`` (the timed imbalance probe, if any), then ``reducer.finish_step()``:
       launch what is left, wait for all;
    6. ``before_update(result)`` may veto the update (the NaN/signal guard);
    7. ``optimizer.step()``.

    ``reducer=None`` leaves synchronization to the model itself (a DDP-wrapped model, or one
    rank). ``phase(name)`` wraps each part in a timer context (see observe.timing.PhaseTimer).
    """
    n_local = int(len(yb))
    result = StepResult(samples=n_local)
    with phase("optimizer"):
        optimizer.zero_grad(set_to_none=False)
    if reducer is not None:
        reducer.begin_step(n_local / n_global if n_global else 0.0)
    if n_local > 0 or forward_when_empty:
        with phase("forward"):
            loss_total = loss_fn(model(xb), yb)
            # The local mean; its gradient, weighted by n_local/n_global and summed over
            # ranks, is the exact gradient of the global-batch mean.
            loss = loss_total / max(1, n_local)
        with phase("backward"):
            loss.backward()
        result.loss_sum = float(loss_total.detach())
    if before_sync is not None:
        before_sync()
    if reducer is not None:
        with phase("allreduce"):
            result.comm = reducer.finish_step()
    if before_update is not None and not before_update(result):
        return result
    with phase("optimizer"):
        optimizer.step()
    return result
