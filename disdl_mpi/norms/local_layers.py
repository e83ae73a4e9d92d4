"""Normalization layers that need no communication: local BN, GroupNorm family, instance norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reduce_dims(x: torch.Tensor) -> list[int]:
    """Every dimension except the channel one (dim 1)."""
    return [0] + list(range(2, x.dim()))


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over an (N, C, ...) tensor of ``ndim`` dims."""
    return t.view([1, -1] + [1] * (ndim - 2))


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


class FlaggedBatchNorm(LocalBatchNorm):
    """Local BN with one boolean state ``flag_name`` read in every forward: a buffer (so
    checkpoints keep it) mirrored by a Python bool (so reading it is no device synchronization
    on a GPU). Set it with :meth:`set_flag`; loading a state dict refreshes the mirror."""

    flag_name = "flag"

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.register_buffer(self.flag_name, torch.zeros((), dtype=torch.bool))
        self.flag = False

    def set_flag(self, value: bool = True) -> None:
        getattr(self, self.flag_name).fill_(value)
        self.flag = bool(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.flag = bool(getattr(self, self.flag_name))  # once per load, not per step


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


def batch_stats_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(biased variance, mean) per channel of this batch, no autograd history.

    Two passes: the mean, then the mean square of the centred values (exact where a folded
    sum of squares would cancel). On the CPU this is 2-7x faster than torch's Welford pass
    (``var_mean`` or the one inside training-mode ``batch_norm``) at the models' shapes
    (64 x 16..64 channels x 4..32 squared, one thread): 40 against 137 us at 16x8x8, 280
    against 1,960 at 16x32x32 (bench note in docs/BENCHMARKS.md).
    """
    dims = reduce_dims(x)
    x = x.detach()
    n = max(1, x.numel() // max(1, x.shape[1]))
    mean = x.sum(dims).div_(n)
    centred = x - channel_view(mean, x.dim())
    return centred.square_().sum(dims).div_(n), mean


class _Renorm(torch.autograd.Function):
    """The value of BN with given statistics, the gradient of BN with the batch's.

    y = xhat_B * (w r) + (w d + b), xhat_B the batch-normalized x, r = std_B / std and
    d = (mean_B - mean) / std constants (clipped to ``clip`` = (r_max, d_max) for Batch Renorm).
    Unclipped that is the inference-form BN with the given statistics, one fused pass; clipped,
    the inference form with the batch's statistics and weight w r. Backward is torch's fused
    training-form BN backward with weight w r, so the cost is local BN's; the weight and bias
    gradients follow from w' = w r, b' = w d + b by the chain rule. r and d are formed where
    they are needed (backward, unclipped): a handful of per-channel ops, not a dozen.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, mean_b, var_b, eps, clip):
        # mean and var may be buffers updated in place before backward runs (brn's running
        # statistics; bn-carry's global ones, when the last bucket completes inside backward):
        # what backward needs of them is computed or copied now.
        inv = (var + eps).rsqrt()
        if clip is None:
            y = F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
            ctx.clipped = False
            given = mean.clone()
        else:
            r = (var_b + eps).sqrt_().mul_(inv).clamp_(1.0 / clip[0], clip[0])
            d = (mean_b - mean).mul_(inv).clamp_(-clip[1], clip[1])
            y = F.batch_norm(
                x, mean_b, var_b, weight * r, torch.addcmul(bias, weight, d), training=False, eps=eps
            )
            ctx.clipped = True
            inv, given = r, d
        ctx.save_for_backward(x, weight, inv, given, mean_b, var_b)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, inv, given, mean_b, var_b = ctx.saved_tensors
        eps = ctx.eps
        invstd_b = (var_b + eps).rsqrt()
        if ctx.clipped:
            r, d = inv, given
        else:  # inv = 1 / std, given = the given mean
            r = inv / invstd_b  # std_B / std
            d = (mean_b - given).mul_(inv)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, g_wr, g_shift = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(), x, weight * r, None, None, mean_b, invstd_b, True, eps, [need_x, True, True]
        )
        grad_w = torch.addcmul(g_wr.mul_(r), g_shift, d) if need_w else None
        return grad_x, grad_w, g_shift if need_b else None, None, None, None, None, None, None


def renormalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Normalize with given (e.g. global) statistics, with BN's gradient through the batch's.

    The value is ``(x - mean) / sqrt(var + eps) * weight + bias``; the gradient is that of
    batch normalization with this batch's statistics, corrected by the constants
    r = std_B / std and d = (mean_B - mean) / std (Batch Renormalization, Ioffe 2017). BN's
    gradient keeps the layers before it scale-invariant; a plain affine with fixed statistics
    does not. ``clip`` = (r_max, d_max) clips r and d as Batch Renorm does (then the value is
    only close to the given statistics' normalization). ``batch_stats`` = (var_B, mean_B) when
    the caller already has them. Costs local BN's two fused passes plus one statistics pass.
    """
    var_b, mean_b = batch_stats if batch_stats is not None else batch_stats_of(x)
    c = x.shape[1]
    w = weight if weight is not None else torch.ones(c, dtype=mean_b.dtype, device=x.device)
    b = bias if bias is not None else torch.zeros(c, dtype=mean_b.dtype, device=x.device)
    return _Renorm.apply(x, w, b, mean.detach(), var.detach(), mean_b, var_b, eps, clip)
