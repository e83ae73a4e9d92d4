"""Normalization layers that need no communication: local BN, GroupNorm family, instance norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reduce_dims(x: torch.Tensor) -> list[int]:
    """Every dimension except the channel one (dim 1)."""
    return [0] + list(range(2, x.dim()))


class LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the rank's own batch, for (N,C), (N,C,L) and (N,C,H,W) inputs.

    Unlike ``nn.BatchNorm2d`` it accepts any of those ranks, so one factory serves the CNN and
    the MLP. Two corner cases of skewed partitions are handled instead of raising: an empty
    batch returns an empty output and leaves the running statistics alone (torch would average
    NaNs into them), and a batch with a single value per channel normalizes to the bias
    (``x - mean`` is exactly 0) without touching the running variance (its unbiased estimate
    is undefined).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.dim() > 5:
            raise ValueError(f"{type(self).__name__} expects (N,C,...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self._check_input_dim(x)
        if self.training and x.numel() // max(x.shape[1], 1) <= 1:
            if x.numel() == 0:
                return x * 1.0  # empty in, empty out; keeps the graph for backward
            shape = [1, -1] + [1] * (x.dim() - 2)
            w = self.weight.view(shape) if self.weight is not None else 1.0
            b = self.bias.view(shape) if self.bias is not None else 0.0
            # (x - mean) == 0 exactly; the product keeps x and weight in the graph (zero grads).
            return (x - x) * w + b
        return super().forward(x)


class InstanceNormAny(nn.GroupNorm):
    """Instance norm with a per-channel affine transform (one group per channel).

    On (N,C,H,W) it normalizes every channel of every sample over H,W (Ulyanov et al. 2016).
    On flat (N,C) features a channel holds a single value, so per-channel statistics would
    zero everything out; there it normalizes each sample over its C features (LayerNorm), the
    only per-sample statistic left, and keeps the per-channel affine parameters.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(num_channels, num_channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() == 2:
            return F.group_norm(x, 1, self.weight, self.bias, self.eps)
        return super().forward(x)


def gn_groups_for(channels: int, requested: int) -> int:
    """min(requested, channels), lowered until it divides the channel count."""
    if requested < 1:
        raise ValueError(f"gn_groups must be >= 1, got {requested}")
    g = min(requested, channels)
    while channels % g:
        g -= 1
    return g


def renormalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalize with given (e.g. global) statistics, with BN's gradient through the batch's.

    The value is exactly ``(x - mean) / sqrt(var + eps) * weight + bias``; the gradient is that
    of batch normalization with this batch's statistics, corrected by the constants
    r = std_B / std and d = (mean_B - mean) / std (Batch Renormalization, Ioffe 2017, without
    clipping). BN's gradient keeps the layers before it scale-invariant; a plain affine with
    fixed statistics does not. One fused native batch_norm does it: with x_B the batch-normalized
    input, w * (x_B r + d) + b = x_B (w r) + (w d + b). ``batch_stats`` = (var_B, mean_B) when
    the caller already has them.
    """
    var_b, mean_b = (
        batch_stats if batch_stats is not None else torch.var_mean(x.detach(), reduce_dims(x), unbiased=False)
    )
    std = (var + eps).sqrt()
    r = ((var_b + eps).sqrt() / std).detach()
    d = ((mean_b - mean) / std).detach()
    w = weight if weight is not None else torch.ones_like(r)
    b = bias if bias is not None else torch.zeros_like(r)
    return F.batch_norm(x, None, None, w * r, w * d + b, True, 0.0, eps)
