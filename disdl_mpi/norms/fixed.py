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
    # (r_max, d_max) while the switch to the frozen statistics is ramped in, else None
    clip: Optional[tuple[float, float]] = None

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
        # During the ramp (FixSchedule) r and d are clipped as Batch Renorm clips them: the
        # value moves from the batch's normalization to the frozen one over the ramp steps
        # instead of at once.
        return renormalize(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.eps, clip=self.clip
        )


class FixSchedule:
    """Freezes the model's FixBatchNorm layers once, at step ``fix_at`` (or half the run), and
    ramps the switch to the frozen statistics in over ``ramp`` steps (None: a fifth of the
    steps left; 0: at once, as FixBN does).

    Why a ramp: until T* every layer normalized with its rank's own batch statistics; under label
    skew those differ from the global ones by large factors, so switching every layer at once
    changes each layer's output scale in one step (on all of Fashion-MNIST at shards:2 the loss
    went non-finite about 80 steps after an unramped freeze). Over the ramp r is clipped to
    [1/r_max, r_max] and d to [-d_max, d_max], r_max rising linearly from 1 to ``RAMP_END[0]``
    and d_max from 0 to ``RAMP_END[1]`` (Batch Renorm's warm-up, Ioffe 2017), and the clip stays
    at ``RAMP_END`` after it: the same run with the ramp but unclipped afterwards diverged about
    60 steps after the ramp ended. Inside the clip the value is the frozen normalization; a
    rank whose batch lies further than that from the global statistics is normalized partly by
    its own (docs/RESULTS.md, bn-fix). ``ramp=0`` is FixBN as published: frozen at once, unclipped.
    """

    RAMP_END = (5.0, 5.0)

    def __init__(
        self, comm: Any, timer: CommTimer, fix_at: Optional[int] = None, ramp: Optional[int] = None
    ) -> None:
        self.comm, self.timer, self.fix_at, self.ramp = comm, timer, fix_at, ramp

    def step_of(self, total_steps: int) -> int:
        return self.fix_at if self.fix_at is not None else total_steps // 2

    def ramp_steps(self, total_steps: int) -> int:
        if self.ramp is not None:
            return max(0, self.ramp)
        return max(0, (total_steps - self.step_of(total_steps)) // 5)

    def clip_at(self, step: int, total_steps: int) -> Optional[tuple[float, float]]:
        """The (r_max, d_max) clip at ``step``: None before T* and with no ramp; rising over
        the ramp; ``RAMP_END`` after it (the bound that keeps the run finite, see above)."""
        start, length = self.step_of(total_steps), self.ramp_steps(total_steps)
        if length == 0 or step < start:
            return None
        frac = min(1.0, (step - start) / length)
        return 1.0 + (self.RAMP_END[0] - 1.0) * frac, self.RAMP_END[1] * frac

    def __call__(self, model: nn.Module, x_train: Any, batch_size: int, step: int, total_steps: int) -> None:
        """Collective at T*: recalibrate over all ranks, then freeze; the ramp's clip after."""
        layers = [m for m in model.modules() if isinstance(m, FixBatchNorm)]
        if not layers:
            return
        if step == self.step_of(total_steps) and not layers[0].flag:
            recalibrate_batchnorm(model, x_train, batch_size, self.comm, self.timer)
            for m in layers:
                m.set_flag(True)
        clip = self.clip_at(step, total_steps)
        for m in layers:
            m.clip = clip


class BNFix(NormScheme):
    """bn-fix: FixBatchNorm layers, frozen once at T* by :class:`FixSchedule`."""

    name = "bn-fix"
    summary = (
        "FixBN (Zhong, Chen & Chao 2023): local BN until step T* (--fix-at, default half the "
        "run), then statistics recalibrated over all ranks once and frozen, used in training and "
        "evaluation; no per-step collective"
    )
    communicates = True  # the one recalibration at T*
    per_rank_layers = True

    def __init__(
        self, comm: Any = None, *, fix_at: Optional[int] = None, fix_ramp: Optional[int] = None
    ) -> None:
        super().__init__(comm)
        self.schedule = FixSchedule(self.comm, self.timer, fix_at, fix_ramp)

    @classmethod
    def options(cls, cfg: Any) -> dict[str, Any]:
        return {"fix_at": cfg.fix_at, "fix_ramp": cfg.fix_ramp}

    def make_layer(self, num_features: int) -> nn.Module:
        return FixBatchNorm(num_features)

    def before_step(
        self, model: nn.Module, x_train: Any, batch_size: int, step: int, total_steps: int
    ) -> None:
        self.schedule(model, x_train, batch_size, step, total_steps)
