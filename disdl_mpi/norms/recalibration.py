"""Precise BatchNorm statistics over all ranks' training data (bn-recal).

Method: "precise BN" (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): EMA running
statistics lag behind the weights and, on a skewed rank, follow that rank's label mix. Before
evaluation we re-estimate every BN layer's mean and variance over the training data of ALL
ranks. Each rank runs its own data through the model in training mode (BN normalizes with the
local batch statistics, exactly as during training) and records per-channel count, mean and
M2 of each BN input (Chan's combine, float64). Ranks then merge them with two small fused
allreduces: [count, count*mean] gives the global mean, then [M2 + count*(mean - global)^2]
gives the global M2 without the cancellation of a raw sum of squares. No sample leaves its
rank, and the forward passes hold no collectives, so ranks with different data sizes (even 0)
are safe: every rank makes exactly the two allreduce calls.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from disdl_mpi.comm.mpi_ops import allreduce_
from disdl_mpi.norms.local_layers import LocalBatchNorm, batch_stats_of
from disdl_mpi.norms.scheme import CommTimer, NormScheme
from disdl_mpi.virtual_ranks import groups_of, segments_of


class RecalBatchNorm(LocalBatchNorm):
    """Local BN during training whose running stats are recalibrated before evaluation."""


class _Moments:
    """Per-channel count, mean and M2 of everything seen so far (Chan et al. combine)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.n = 0.0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        c = x.shape[1]
        m = x.numel() // c if c else 0
        if m == 0:
            return
        var_b, mean_b = batch_stats_of(x.to(torch.float64))  # the two passes of local_layers
        m2_b = var_b * m
        n = self.n + m
        delta = mean_b - self.mean
        self.mean += delta * (m / n)
        self.m2 += m2_b + delta * delta * (self.n * m / n)
        self.n = n

    def merge(self, other: "_Moments") -> "_Moments":
        """Add ``other``'s count, mean and M2 to these (Chan's pairwise combine)."""
        if other.n == 0:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean += delta * (other.n / n)
        self.m2 += other.m2 + delta * delta * (self.n * other.n / n)
        self.n = n
        return self


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    from disdl_mpi.norms.sync_batch_norm import SyncBatchNorm

    layers: list[nn.modules.batchnorm._BatchNorm] = []
    for name, m in model.named_modules():
        if isinstance(m, SyncBatchNorm):
            # Its forward runs collectives, and ranks here run different numbers of batches.
            raise ValueError(
                f"bn-recal: layer '{name}' is a SyncBatchNorm; recalibrate only "
                f"models built with local BN layers"
            )
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            layers.append(m)
    return layers


def recalibrate_batchnorm(
    model: nn.Module, x_train: Any, batch_size: int, comm: Any, timer: Optional[CommTimer] = None
) -> dict:
    """Set every BN layer's running mean/var to the statistics of its inputs over all ranks.

    ``x_train`` is this rank's training inputs, preprocessed as for training (tensor, numpy or
    ``StandardizedInputs``);
    ``batch_size`` is the batch size of the forward passes. Collective over ``comm``: every
    rank must call it. Returns {"layers", "samples", "comm_s"}.
    """
    if batch_size < 1:
        raise ValueError(f"bn-recal: batch_size must be >= 1, got {batch_size}")
    layers = _batchnorms(model)
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    # A tensor, a numpy array, or StandardizedInputs (indexable, standardizes per batch).
    x = torch.as_tensor(x_train) if isinstance(x_train, np.ndarray) else x_train
    moments = {id(m): _Moments(m.num_features, device) for m in layers}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, acc=acc: acc.add(inp[0]))
        for m, acc in ((m, moments[id(m)]) for m in layers)
    ]
    # Virtual ranks (disdl_mpi.virtual_ranks): each rank's own rows through its own copies,
    # in the batches an MPI rank would run; then a position's K copies pool their moments.
    seg = segments_of(model)
    parts = [(k, lo, hi) for k, (lo, hi) in enumerate(seg.rows)] if seg else [(0, 0, len(x))]
    modes = [(m, m.training) for m in model.modules()]
    saved = [m.num_batches_tracked.clone() for m in layers]
    try:
        model.train()  # normalize with batch statistics, as the layers saw data in training
        with torch.no_grad():
            for k, lo, hi in parts:
                with seg.only(k) if seg else contextlib.nullcontext():
                    for i in range(lo, hi, batch_size):
                        model(x[i : min(hi, i + batch_size)].to(device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
        for m, nbt in zip(layers, saved):
            m.num_batches_tracked.copy_(nbt)
    kept = {id(m) for m in layers}
    groups = [g for g in groups_of(model, nn.modules.batchnorm._BatchNorm) if id(g[0]) in kept]
    pooled = [moments[id(g[0])] for g in groups]
    for g, acc in zip(groups, pooled):
        for m in g[1:]:
            acc.merge(moments[id(m)])
    if not groups:
        return {"layers": 0, "samples": 0, "comm_s": 0.0}
    timer = timer or CommTimer()
    t0 = timer.seconds
    samples = _merge_over_ranks(groups, pooled, comm, timer, device)
    return {"layers": len(groups), "samples": samples, "comm_s": timer.seconds - t0}


def _merge_over_ranks(groups: list, pooled: list[_Moments], comm: Any, timer: CommTimer, device) -> int:
    """Collective: every group's copies get the moments over all ranks as running mean/var;
    returns the global sample count."""
    # Round 1: counts and count-weighted means -> global mean per channel.
    first = torch.cat(
        [torch.cat([torch.tensor([a.n], dtype=torch.float64, device=device), a.mean * a.n]) for a in pooled]
    )
    timer.timed(lambda: allreduce_(first, comm))
    # Round 2: M2 about the global mean (Chan's merge, no raw sum of squares).
    second, globals_ = [], []
    off = 0
    for a in pooled:
        c = a.mean.numel()
        n = float(first[off].item())
        gmean = first[off + 1 : off + 1 + c] / max(n, 1.0)
        globals_.append((n, gmean))
        second.append(a.m2 + a.n * (a.mean - gmean) ** 2)
        off += 1 + c
    m2 = torch.cat(second)
    timer.timed(lambda: allreduce_(m2, comm))
    off = 0
    with torch.no_grad():
        for g, (n, gmean) in zip(groups, globals_):
            c = gmean.numel()
            for m in g:
                if n >= 1:  # with no data anywhere the old statistics stay
                    m.running_mean.copy_(gmean.to(m.running_mean.dtype))
                if n >= 2:  # unbiased, with the global count (as torch's running_var)
                    m.running_var.copy_((m2[off : off + c] / (n - 1)).to(m.running_var.dtype))
            off += c
    return int(first[0].item())


class BNRecal(NormScheme):
    """bn-recal: local BN layers, recalibrated over all ranks before every evaluation."""

    name = "bn-recal"
    summary = (
        "local BN in training, then precise-BN recalibration (Wu & Johnson 2021) of the running "
        "mean/var over ALL ranks' training data by allreduce of per-channel moments before every "
        "evaluation"
    )
    communicates = True
    per_rank_layers = True

    def make_layer(self, num_features: int) -> nn.Module:
        return RecalBatchNorm(num_features)

    def recalibrate(self, model: nn.Module, x_train: Any, batch_size: int) -> None:
        recalibrate_batchnorm(model, x_train, batch_size, self.comm, self.timer)
