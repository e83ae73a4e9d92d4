"""gn-ws: GroupNorm with weight standardization (Qiao et al. 2019, "Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization").

Every convolution's weight is standardized per output channel before use: w_hat = (w - mean) /
sqrt(var + eps) over its (in_channels, kh, kw) entries, with autograd through the
standardization. Together with GroupNorm it is the batch-independent remedy the literature
recommends where batches are small or skewed: no statistic depends on the batch, so no rank's
skew reaches another's normalization, and no collective is needed. Linear layers are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from disdl_mpi.norms.local_schemes import GroupNormScheme


class Standardized(nn.Module):
    """The parametrization: a conv weight standardized per output channel."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # noqa: D102
        flat = w.flatten(1)
        var, mean = torch.var_mean(flat, 1, unbiased=False, keepdim=True)
        return ((flat - mean) * (var + self.eps).rsqrt()).view_as(w)


def standardize_convolutions(model: nn.Module) -> int:
    """Register weight standardization on every Conv2d of ``model``; returns how many."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        if not parametrize.is_parametrized(conv, "weight"):
            parametrize.register_parametrization(conv, "weight", Standardized())
    return len(convs)


class GroupNormWS(GroupNormScheme):
    name = "gn-ws"
    summary = (
        "GroupNorm with weight standardization (Qiao et al. 2019): every convolution's weight "
        "standardized per output channel; batch-independent, no collective"
    )

    def adapt_model(self, model: nn.Module) -> Any:
        standardize_convolutions(model)
        return model
