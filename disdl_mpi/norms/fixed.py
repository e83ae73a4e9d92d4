"""bn-fix (FixBN, Zhong, Chen & Chao 2023): local BN first, then frozen global statistics.

Until step T* (``--fix-at``, default half of the training steps) the layers are local BN. At
T* the running statistics are re-estimated once over every rank's training data (bn-recal's
collective recalibration, two small allreduces for the whole model) and frozen: from then on
every layer normalizes with them in training as in evaluation, so training and testing see
the same, global normalization, while the affine parameters keep learning. No per-step
collective at all. In training the gradient still flows through the local batch statistics
(see FixBatchNorm.forward): the normalized values are exactly the frozen-statistics ones.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from disdl_mpi.norms.local_layers import FlaggedBatchNorm, renormalize
from disdl_mpi.norms.recalibration import recalibrate_batchnorm
from disdl_mpi.norms.scheme import CommTimer, NormScheme


class FixBatchNorm(FlaggedBatchNorm):
    """Local BN until ``fixed``; then normalization with the (frozen) running statistics.

    ``fixed`` is a buffer, so a checkpoint taken after T* resumes frozen.
    """

    flag_name = "fixed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.flag:
            return super().forward(x)
        self._check_input_dim(x)
        per_channel = x.numel() // max(1, x.shape[1])
        if not self.training or per_channel <= 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        # The value is exactly (x - mu) / sigma with the frozen global mu, sigma; the gradient
        # is BN's, through this batch's statistics. A plain frozen affine would drop BN's
        # projection of the gradient, and the weights feeding it lose their scale invariance:
        # at lr 0.05 the digits CNN's gradient norm grew 12x in two steps after the freeze
        # and the loss diverged.
        return renormalize(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)


class FixSchedule:
    """Freezes the model's FixBatchNorm layers once, at step ``fix_at`` (or half the run)."""

    def __init__(self, comm: Any, timer: CommTimer, fix_at: Optional[int] = None) -> None:
        self.comm, self.timer, self.fix_at = comm, timer, fix_at

    def step_of(self, total_steps: int) -> int:
        return self.fix_at if self.fix_at is not None else total_steps // 2

    def __call__(self, model: nn.Module, x_train: Any, batch_size: int, step: int, total_steps: int) -> None:
        """Collective at T*: recalibrate over all ranks, then freeze; a no-op otherwise."""
        layers = [m for m in model.modules() if isinstance(m, FixBatchNorm)]
        if step != self.step_of(total_steps) or not layers or layers[0].flag:
            return
        recalibrate_batchnorm(model, x_train, batch_size, self.comm, self.timer)
        for m in layers:
            m.set_flag(True)


class BNFix(NormScheme):
    """bn-fix: FixBatchNorm layers, frozen once at T* by :class:`FixSchedule`."""

    name = "bn-fix"
    summary = (
        "FixBN (Zhong, Chen & Chao 2023): local BN until step T* (--fix-at, default half the "
        "run), then statistics recalibrated over all ranks once and frozen, used in training and "
        "evaluation; no per-step collective"
    )
    communicates = True  # the one recalibration at T*

    def __init__(self, comm: Any = None, *, fix_at: Optional[int] = None) -> None:
        super().__init__(comm)
        self.schedule = FixSchedule(self.comm, self.timer, fix_at)

    @classmethod
    def options(cls, cfg: Any) -> dict[str, Any]:
        return {"fix_at": cfg.fix_at}

    def make_layer(self, num_features: int) -> nn.Module:
        return FixBatchNorm(num_features)

    def before_step(
        self, model: nn.Module, x_train: Any, batch_size: int, step: int, total_steps: int
    ) -> None:
        self.schedule(model, x_train, batch_size, step, total_steps)
