"""Many isolated ranks per process (``--virtual-ranks K``), equal to K MPI ranks each.

A world of N = P x K isolated ranks runs on P MPI processes; process p owns ranks p*K .. p*K+K-1
(their partition files only). Each step every virtual rank draws its own batch from its own
partition (its own :class:`~disdl_mpi.batching.BatchPlan`), the process concatenates the K
batches and runs ONE forward and backward over them, and the P processes allreduce as before.

Why that equals K MPI ranks:

- The loss is the mean over the process's batch and the allreducer weighs the process by
  n_process / n_global, so every shared gradient is the same sample-weighted sum as over N MPI
  ranks (backward is linear in the loss).
- Layers that see each sample alone (conv, linear, gn, ln, in, evonorm) cannot tell the batches
  apart; syncbn's statistics are sums over the batch, which a process forms over K batches
  instead of one.
- A scheme whose layers keep per-rank state or normalize with the rank's own batch
  (``NormScheme.per_rank_layers``: bn, brn, fedbn, bn-recal, bn-fix, bn-carry) gets K copies of
  each norm layer in a :class:`VirtualNorm`: copy k normalizes only virtual rank k's rows and
  keeps its running statistics, flags and sums. The copies share their affine parameters (one
  tensor, so their gradients add up as the allreduce would add them) unless the scheme keeps
  them rank-local (fedbn): then copy k's gradient is rescaled from the process's units to rank
  k's own (the MPI rank's loss is its own batch's mean).

Evaluation uses copy 0 (virtual rank 0's state, as the MPI run broadcasts rank 0's) or, for a
scheme that scores every rank's model, each copy in turn.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Optional

import numpy as np
import torch
from torch import nn

from disdl_mpi.batching import BatchPlan


@dataclass
class Segments:
    """What the model's VirtualNorm layers need to know about the current forward pass.

    ``sizes``: the rows of each virtual rank in the batch, in order (None: the whole batch is
    one rank's: ``member``'s). Shared by every VirtualNorm of one model.
    """

    k: int
    rows: list[tuple[int, int]] = field(default_factory=list)  # each rank's training rows
    sizes: Optional[list[int]] = None
    member: int = 0
    rescale: list[float] = field(default_factory=list)  # per copy: process units -> rank units

    @contextlib.contextmanager
    def split(self, sizes: list[int]) -> Iterator[None]:
        """Within: the batch holds ``sizes[k]`` rows of virtual rank k, in rank order."""
        total = sum(sizes)
        self.sizes = [int(s) for s in sizes]
        self.rescale = [total / s if s else 0.0 for s in self.sizes]
        try:
            yield
        finally:
            self.sizes = None

    def members(self) -> list[ContextManager[None]]:
        """One ``only(k)`` per virtual rank, in rank order (per-rank scoring)."""
        return [self.only(k) for k in range(self.k)]

    @contextlib.contextmanager
    def only(self, member: int) -> Iterator[None]:
        """Within: every row is virtual rank ``member``'s (recalibration, per-rank scoring)."""
        old, self.member = self.member, int(member)
        try:
            yield
        finally:
            self.member = old


class VirtualNorm(nn.Module):
    """K copies of one norm layer, copy k applied to virtual rank k's rows of the batch."""

    def __init__(self, members: list[nn.Module], segments: Segments, *, shared_affine: bool) -> None:
        super().__init__()
        first = members[0]
        if shared_affine:
            for m in members[1:]:
                for name, p in list(first.named_parameters(recurse=False)):
                    setattr(m, name, p)  # one tensor: gradients add up across copies
        else:
            for k, m in enumerate(members):
                for p in m.parameters(recurse=False):
                    p.register_hook(self._rescaler(k))
        self.members = nn.ModuleList(members)
        self.segments = segments
        self.num_features = getattr(first, "num_features", None)

    def _rescaler(self, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        # A rank-local parameter's gradient in MPI is its rank's own mean-loss gradient; here
        # the loss is the process's mean, n_k / n_process of it.
        def hook(grad: torch.Tensor) -> torch.Tensor:
            seg = self.segments
            return grad * seg.rescale[k] if seg.sizes is not None else grad

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        sizes = self.segments.sizes
        if sizes is None:
            return self.members[self.segments.member](x)
        count = x.numel() // max(1, x.shape[1])
        for m in self.members:
            if hasattr(m, "loss_count"):  # bn-carry's carried gradient: the loss's units
                m.loss_count = count
        outs = [
            m(part) for m, part, n in zip(self.members, x.split(sizes), sizes) if n > 0
        ]  # a rank with no rows runs no forward, as an MPI rank with an empty batch
        if not outs:
            return x * 1.0
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def virtual_norms(model: nn.Module) -> list[VirtualNorm]:
    return [m for m in model.modules() if isinstance(m, VirtualNorm)]


def segments_of(model: nn.Module) -> Optional[Segments]:
    """The model's shared Segments, or None for a model without VirtualNorm layers."""
    layers = virtual_norms(model)
    return layers[0].segments if layers else None


def groups_of(model: nn.Module, layer_type: type) -> list[list[nn.Module]]:
    """The model's ``layer_type`` layers grouped per position: the K copies of a VirtualNorm
    together, a plain layer alone (so a scheme can pool what its K copies hold)."""
    inside = {id(m) for v in virtual_norms(model) for m in v.members}
    groups: list[list[nn.Module]] = []
    for m in model.modules():
        if isinstance(m, VirtualNorm) and isinstance(m.members[0], layer_type):
            groups.append(list(m.members))
        elif isinstance(m, layer_type) and id(m) not in inside:
            groups.append([m])
    return groups


@torch.no_grad()
def copy_first_member(model: nn.Module) -> None:
    """Every copy takes copy 0's buffers: what the MPI run does when it broadcasts rank 0's
    running statistics before an evaluation (broadcast_module_ then carries them across
    processes)."""
    for v in virtual_norms(model):
        first = dict(v.members[0].named_buffers(recurse=False))
        for m in v.members[1:]:
            for name, b in m.named_buffers(recurse=False):
                b.copy_(first[name])
            if hasattr(m, "flag") and hasattr(v.members[0], "flag"):
                m.flag = v.members[0].flag


def virtual_layer_factory(
    make: Callable[[int], nn.Module], k: int, segments: Segments, *, shared_affine: bool
) -> Callable[[int], nn.Module]:
    """``make`` (a scheme's layer factory) for a process of ``k`` virtual ranks."""

    def layer(num_features: int) -> nn.Module:
        return VirtualNorm([make(num_features) for _ in range(k)], segments, shared_affine=shared_affine)

    return layer


def scheme_layers(scheme, k: int) -> tuple[Callable[[int], nn.Module], Optional[Segments]]:
    """The layer factory a process of ``k`` virtual ranks builds ``scheme``'s model with, and
    the Segments its layers share (None: the scheme's own layers serve K ranks as they are)."""
    if k <= 1 or not scheme.per_rank_layers:
        return scheme.layer, None
    segments = Segments(k)
    return virtual_layer_factory(scheme.layer, k, segments, shared_affine=not scheme.local_params), segments


def batch_plan(
    sizes: list[int], process: int, cfg, segments: Optional[Segments]
) -> "BatchPlan | VirtualPlan":
    """This process's BatchPlan, or the VirtualPlan of its ``cfg.virtual_ranks`` ranks (whose
    rows ``segments`` is told)."""
    if cfg.virtual_ranks <= 1:
        return BatchPlan(sizes, process, cfg.global_batch_size, cfg.batching)
    plan = VirtualPlan(sizes, process, cfg.virtual_ranks, cfg.global_batch_size, cfg.batching)
    if segments is not None:
        segments.rows = plan.rows
    return plan


class VirtualPlan:
    """The K virtual ranks' BatchPlans as one process's plan: concatenated index arrays into
    the process's training rows (the K partitions in rank order) and each rank's share."""

    def __init__(self, sizes: list[int], process: int, k: int, global_batch: int, mode: str) -> None:
        self.k = k
        self.ranks = list(range(process * k, process * k + k))
        self.plans = [BatchPlan(sizes, r, global_batch, mode) for r in self.ranks]
        self.offsets = np.cumsum([0] + [sizes[r] for r in self.ranks[:-1]]).tolist()
        self.rows = [(off, off + sizes[r]) for off, r in zip(self.offsets, self.ranks)]
        self.steps_per_epoch = self.plans[0].steps_per_epoch
        self.sizes = self.plans[0].sizes

    def global_count(self, step: int) -> int:
        return self.plans[0].global_count(step)

    def epoch_indices(self, epoch: int, seed: int) -> list[np.ndarray]:
        per_rank = [p.epoch_indices(epoch, seed) for p in self.plans]
        self._shares = [[len(idx[s]) for idx in per_rank] for s in range(self.steps_per_epoch)]
        return [
            np.concatenate([idx[s] + off for idx, off in zip(per_rank, self.offsets)])
            for s in range(self.steps_per_epoch)
        ]

    def shares(self, step: int) -> list[int]:
        """Each virtual rank's rows at ``step`` of the epoch last listed by epoch_indices."""
        return self._shares[step]


def rank_state_dict(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """Virtual rank ``k``'s model as a plain state_dict: its own copy of each norm layer under
    the layer's name (``features.0.1.members.2.weight`` -> ``features.0.1.weight`` for k = 2),
    the other copies left out; a model without VirtualNorm layers as it is."""
    out = {}
    for name, value in model.state_dict().items():
        head, sep, tail = name.partition(".members.")
        if not sep:
            out[name] = value
            continue
        index, _, rest = tail.partition(".")
        if int(index) == k:
            out[f"{head}.{rest}"] = value
    return out
