"""Batch Renormalization (Ioffe 2017) with the r_max/d_max warm-up schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from disdl_mpi.norms.local_layers import LocalBatchNorm, batch_stats_of, renormalize
from disdl_mpi.norms.scheme import NormScheme


class RenormSchedule:
    """r_max ramps 1 -> r_max_final and d_max 0 -> d_max_final linearly over ``warmup_steps``.

    At r_max=1, d_max=0 Batch Renorm is plain BN; Ioffe (2017) starts there because the
    running statistics are meaningless early on, then relaxes the clipping. One schedule object
    is shared by all layers of a model; ``BRN.before_step`` drives it.
    """

    def __init__(self, warmup_steps: int = 100, r_max_final: float = 3.0, d_max_final: float = 5.0) -> None:
        if warmup_steps < 0 or r_max_final < 1.0 or d_max_final < 0.0:
            raise ValueError(
                f"brn: need brn_warmup_steps >= 0, r_max >= 1, d_max >= 0; got "
                f"{warmup_steps}, {r_max_final}, {d_max_final}"
            )
        self.warmup_steps = int(warmup_steps)
        self.r_max_final = float(r_max_final)
        self.d_max_final = float(d_max_final)
        self.step = 0
        self.r_max, self.d_max = 1.0, 0.0
        self.set_step(0)

    def set_step(self, step: int) -> None:
        self.step = int(step)
        frac = 1.0 if self.warmup_steps == 0 else min(max(step, 0) / self.warmup_steps, 1.0)
        self.r_max = 1.0 + (self.r_max_final - 1.0) * frac
        self.d_max = self.d_max_final * frac


class BatchRenorm(LocalBatchNorm):
    """Batch Renormalization: local batch statistics corrected towards the running ones.

    Method: Ioffe, "Batch Renormalization" (NeurIPS 2017). Training normalizes with
    ``(x - mu_B)/sigma_B * r + d`` where ``r = sigma_B/sigma``, ``d = (mu_B - mu)/sigma`` are
    clipped to [1/r_max, r_max] and [-d_max, d_max] and treated as constants. Within the clip
    this equals normalizing by the running (population) statistics, so training and inference
    agree; it helps when local batches are small or non-i.i.d., as on a skewed rank.
    """

    def __init__(
        self, num_features: int, schedule: RenormSchedule, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.schedule = schedule

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self._check_input_dim(x)
        if not self.training or x.numel() // max(x.shape[1], 1) <= 1:
            return super().forward(x)  # eval: running stats; empty / single value: see base
        n = x.numel() // x.shape[1]
        var_b, mean_b = batch_stats_of(x)
        # r and d from the running statistics before this batch updates them
        y = renormalize(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.eps,
            batch_stats=(var_b, mean_b),
            clip=(self.schedule.r_max, self.schedule.d_max),
        )
        with torch.no_grad():
            self.running_mean.add_(mean_b - self.running_mean, alpha=self.momentum)
            self.running_var.add_(var_b * (n / (n - 1)) - self.running_var, alpha=self.momentum)
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", r_max={self.schedule.r_max:.3g}, d_max={self.schedule.d_max:.3g}")


class BRN(NormScheme):
    """brn: BatchRenorm layers sharing one r/d warm-up schedule, advanced before every step."""

    name = "brn"
    per_rank_layers = True
    summary = (
        "Batch Renormalization (Ioffe 2017): local batch statistics corrected towards the "
        "running ones (r/d clipping, warm-up r_max 1->3, d_max 0->5); for small or non-i.i.d. "
        "local batches"
    )

    def __init__(
        self, comm: Any = None, *, brn_warmup_steps: int = 100, r_max: float = 3.0, d_max: float = 5.0
    ) -> None:
        super().__init__(comm)
        self.schedule = RenormSchedule(brn_warmup_steps, r_max, d_max)

    def make_layer(self, num_features: int) -> nn.Module:
        return BatchRenorm(num_features, self.schedule)

    def before_step(
        self, model: nn.Module, x_train: Any, batch_size: int, step: int, total_steps: int
    ) -> None:
        self.schedule.set_step(step)
