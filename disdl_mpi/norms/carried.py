"""bn-carry: BatchNorm with global statistics that ride in the gradient allreduce.

syncbn gets exact global batch statistics at the price of a collective in every BN layer of
every forward and backward pass. bn-carry gets global statistics for no collective of its own:

- In training, layer l at step t normalizes with the GLOBAL batch statistics of step t-1,
  mu_{t-1} and sigma^2_{t-1} (the statistics of all ranks' batches at the previous step, as
  the previous weights produced them): y = (x - mu_{t-1}) / sqrt(sigma^2_{t-1} + eps) * w + b.
  They are constants of step t; the gradient flows through this rank's own batch statistics
  (renormalization, as Batch Renorm does), so backward needs no collective either.
- Meanwhile each rank records its own batch's per-channel sums, shifted by mu_{t-1} to avoid
  cancellation: n_r, S_r = sum(x - mu_{t-1}), Q_r = sum((x - mu_{t-1})^2). They are appended to
  the LAST gradient bucket of step t (unweighted) and summed by the same Iallreduce; then
  mu_t = mu_{t-1} + S/n, sigma^2_t = Q/n - (S/n)^2 (n, S, Q the sums over ranks): exactly the
  statistics of the union of all ranks' step-t batches.
- Step 0 has no previous statistics: it normalizes with the local batch (bn). The running
  statistics (for evaluation) are updated from the global ones with BN's momentum, so they
  are identical on every rank.

The lag: step t is normalized with step t-1's statistics, which came from weights one SGD step
older; with small learning rates the two are close. What it does not give: the current step's
global statistics (syncbn's), nor a gradient through them -- the gradient sees this rank's own
batch statistics. The payload is 1 + 2C floats per layer (a few KB); it needs a wire format that
can hold raw sums (--compress none).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from disdl_mpi.norms.local_layers import (
    FlaggedBatchNorm,
    batch_stats_of,
    channel_view,
    reduce_dims,
    renormalize,
)
from disdl_mpi.norms.scheme import NormScheme
from disdl_mpi.virtual_ranks import groups_of


class CarryBatchNorm(FlaggedBatchNorm):
    """BN normalizing with the previous step's global statistics (see the module docstring).

    No forward or update reads a value back to the host (on a GPU, no synchronization).
    """

    flag_name = "have_global"

    def __init__(
        self, num_features: int, *, grad: str = "local", eval_stats: str = "running", **kwargs
    ) -> None:
        super().__init__(num_features, **kwargs)
        self.grad, self.eval_stats = check_variant(grad, eval_stats)
        self.register_buffer("global_mean", torch.zeros(num_features))
        self.register_buffer("global_var", torch.ones(num_features))
        # the other ranks' moments of the previous step (grad="exact"): count, mean, variance
        self.register_buffer("others", torch.zeros(1 + 2 * num_features, dtype=torch.float64))
        # the previous step's global sums of dy and dy * xhat per channel (grad="carried"):
        # the allreduced gradients of this layer's bias and weight
        self.register_buffer("grad_sums", torch.zeros(2 * num_features, dtype=torch.float64))
        self._own_last: Optional[torch.Tensor] = None  # the sums this rank sent last
        # Per channel, the count of the batch whose mean is the loss: this layer's own batch,
        # unless a VirtualNorm runs it on one virtual rank's rows of a larger batch.
        self.loss_count: Optional[int] = None
        self._sums: Optional[torch.Tensor] = None  # [n, S(C), Q(C)] of this step's batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self._check_input_dim(x)
        if not self.training:
            if self.flag and self.eval_stats == "last":  # what the model was last trained with
                return F.batch_norm(
                    x, self.global_mean, self.global_var, self.weight, self.bias, False, 0.0, self.eps
                )
            return super().forward(x)
        have = self.flag
        per_channel = x.numel() // max(1, x.shape[1])
        if per_channel == 0:  # an empty batch contributes nothing to the sums
            self._sums = None
            return super().forward(x)
        with torch.no_grad():
            # One pass for this batch's per-channel statistics: they give the payload (sums
            # about the previous global mean, in float64 per channel) and the renormalization.
            # (global_mean is still zeros before the first global statistics arrive)
            var_b, mean_b = batch_stats_of(x)
            n = float(per_channel)
            sums = torch.empty(self.payload_size, dtype=torch.float64, device=x.device)
            dm = torch.sub(mean_b, self.global_mean, out=sums[1 : self.num_features + 1])
            torch.addcmul(var_b, dm, dm, out=sums[self.num_features + 1 :])
            self._sums = sums.mul_(n)
            sums[0] = n
        if not have or per_channel <= 1:
            return super().forward(x)  # step 0 (or a 1-value batch): the local batch
        if self.grad == "none":  # the statistics are constants of the step: an affine map
            return F.batch_norm(
                x, self.global_mean, self.global_var, self.weight, self.bias, False, 0.0, self.eps
            )
        if self.grad == "exact":
            return self._exact(x)
        if self.grad == "carried" and self.weight is not None:
            # BN's backward with the previous step's global means of dy and dy * xhat, in this
            # rank's units (its loss is its own batch's mean: see carry_grad_sums)
            c = self.num_features
            means = (self.grad_sums / float(self.loss_count or n)).to(x.dtype)
            return _CarriedGrad.apply(
                x, self.weight, self.bias, self.global_mean, self.global_var, means[:c], means[c:], self.eps
            )
        # Values normalized with the previous step's global statistics; BN's gradient through
        # this batch's statistics (see local_layers.renormalize).
        return renormalize(
            x,
            self.global_mean,
            self.global_var,
            self.weight,
            self.bias,
            self.eps,
            batch_stats=(var_b, mean_b),
        )

    def _exact(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize with the moments of this rank's current batch pooled with the other
        ranks' previous-step batches, autograd through this rank's part (grad="exact")."""
        c, dims, nd = self.num_features, reduce_dims(x), x.dim()
        n_o, mean_o, var_o = self.others[:1], self.others[1 : c + 1], self.others[c + 1 :]
        total = (n_o + float(x.numel() // c)).to(x.dtype)
        xs = x - channel_view(mean_o.to(x.dtype), nd)  # shifted by the others' mean: their sum is 0
        s1, s2 = xs.sum(dims), (xs * xs).sum(dims)
        m = s1 / total
        var = (s2 + (n_o * var_o).to(x.dtype)) / total - m * m
        y = (xs - channel_view(m, nd)) * channel_view((var.clamp_min(0.0) + self.eps).rsqrt(), nd)
        if self.weight is not None:
            y = y * channel_view(self.weight, nd) + channel_view(self.bias, nd)
        return y

    @torch.no_grad()
    def carry_grad_sums(self, dy_sum: Optional[torch.Tensor], dyx_sum: Optional[torch.Tensor]) -> None:
        """Keep the step's allreduced bias and weight gradients (grad="carried").

        They are the global sums of dy and dy * xhat over every rank's batch, in the units of
        the global-batch mean loss. A rank's own dy is in units of its batch's mean loss,
        n_global / n_rank times larger, so the global mean of dy in this rank's units is the
        global sum over this rank's own per-channel count: forward divides by it.
        """
        if self.grad != "carried" or dy_sum is None or dyx_sum is None:
            return
        c = self.num_features
        self.grad_sums[:c].copy_(dy_sum)
        self.grad_sums[c:].copy_(dyx_sum)

    @property
    def payload_size(self) -> int:
        return 1 + 2 * self.num_features

    def take_sums(self) -> torch.Tensor:
        """This step's [n, S, Q] (zeros when the rank ran no forward), then forget them."""
        sums = (
            self._sums
            if self._sums is not None
            else torch.zeros(self.payload_size, dtype=torch.float64, device=self.global_mean.device)
        )
        self._sums = None
        self._own_last = sums
        return sums

    @torch.no_grad()
    def set_global(self, sums: torch.Tensor) -> None:
        """The sums over all ranks: the global statistics for the next step, running stats.

        Nothing is read back to the host. Every training step has data on some rank (the batch
        plan gives each step at least one sample per rank), so n >= 1; the clamp only keeps a
        step without any data from dividing by zero.
        """
        c = self.num_features
        if self.grad == "exact":
            self._keep_others(sums)
        n = sums[:1].double().clamp_min(1.0)
        d = sums[1 : 1 + c].double() / n
        mean = self.global_mean.double() + d  # zeros before the first update
        var = (sums[1 + c :].double() / n).sub_(d * d).clamp_min_(0.0)
        self.global_mean.copy_(mean)
        self.global_var.copy_(var)
        self.set_flag(True)
        m = self.momentum if self.momentum is not None else 0.1
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        unbiased = var * (n / (n - 1).clamp_min(1.0))
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        self.num_batches_tracked += 1

    def _keep_others(self, summed: torch.Tensor) -> None:
        """The other ranks' count, mean and variance of this step: the sums over all ranks
        minus this rank's own (both about the same shift, the global mean before the update)."""
        c = self.num_features
        own = self._own_last if self._own_last is not None else torch.zeros_like(summed)
        rest = summed.double() - own.double()
        n_o = rest[:1].clamp_min(0.0)
        safe = n_o.clamp_min(1.0)
        d = rest[1 : c + 1] / safe
        self.others[:1] = n_o
        self.others[1 : c + 1] = self.global_mean.double() + d
        self.others[c + 1 :] = (rest[c + 1 :] / safe - d * d).clamp_min(0.0)


class _CarriedGrad(torch.autograd.Function):
    """y = BN with given statistics; backward: BN's, with given means of dy and dy * xhat.

    dx = w / std * (dy - mean(dy) - xhat * mean(dy * xhat)), the means over the global batch
    of the previous step (syncbn's backward uses the current step's); dw, db as for BN.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, dy_mean, dyx_mean, eps):
        inv = (var + eps).rsqrt()
        ctx.save_for_backward(x, weight, mean.clone(), inv, dy_mean, dyx_mean)
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, inv, dy_mean, dyx_mean = ctx.saved_tensors
        nd, dims = x.dim(), reduce_dims(x)
        xhat = (x - channel_view(mean, nd)) * channel_view(inv, nd)
        grad_b = dy.sum(dims)
        grad_w = (dy * xhat).sum(dims)
        inner = dy - channel_view(dy_mean, nd) - xhat * channel_view(dyx_mean, nd)
        grad_x = inner * channel_view(weight * inv, nd)
        return grad_x, grad_w, grad_b, None, None, None, None, None


GRADS = ("local", "exact", "none", "carried")
EVALS = ("last", "running")


def check_variant(grad: str, eval_stats: str) -> tuple[str, str]:
    """(grad, eval_stats) when both are known variants, else the ValueError naming them."""
    if grad not in GRADS:
        raise ValueError(f"bn-carry: carry_grad must be one of {GRADS}, got {grad!r}")
    if eval_stats not in EVALS:
        raise ValueError(f"bn-carry: carry_eval must be one of {EVALS}, got {eval_stats!r}")
    return grad, eval_stats


class StatsPayload:
    """The model's CarryBatchNorm sums as one flat payload of the gradient allreduce.

    Per layer position: one layer, or the K copies of a VirtualNorm (K virtual ranks in this
    process), whose sums are added before they are sent and which all receive the total.
    """

    def __init__(self, model: nn.Module) -> None:
        self.groups = groups_of(model, CarryBatchNorm)
        self.numel = sum(g[0].payload_size for g in self.groups)

    def fill(self, out: torch.Tensor) -> None:
        """This process's contribution (unweighted sums), into ``out`` (numel floats)."""
        off = 0
        for group in self.groups:
            size = group[0].payload_size
            part = out[off : off + size]
            part.copy_(group[0].take_sums())
            for m in group[1:]:
                part.add_(m.take_sums())
            off += size

    def consume(self, summed: torch.Tensor) -> None:
        """The sums over all ranks, after the allreduce."""
        off = 0
        for group in self.groups:
            size = group[0].payload_size
            for m in group:
                m.set_global(summed[off : off + size])
            off += size


class BNCarry(NormScheme):
    """bn-carry: CarryBatchNorm layers whose sums are the gradient allreduce's payload."""

    name = "bn-carry"
    per_rank_layers = True
    summary = (
        "BN with global statistics carried in the gradient allreduce: each layer normalizes with "
        "the previous step's global batch statistics, whose sums ride in the last gradient "
        "bucket; no collective of its own"
    )

    @classmethod
    def config_errors(cls, cfg: Any) -> list[str]:
        if cfg.compress != "none":
            return [
                "--norm bn-carry: its statistics ride in the gradient allreduce as raw sums, which "
                "--compress fp16 cannot hold; use --compress none (or list the schemes without "
                "bn-carry: 'all' includes it)"
            ]
        return []

    def __init__(self, comm: Any = None, *, carry_grad: str = "local", carry_eval: str = "running") -> None:
        self.carry_grad, self.carry_eval = check_variant(carry_grad, carry_eval)
        super().__init__(comm)

    @classmethod
    def options(cls, cfg: Any) -> dict[str, Any]:
        return {"carry_grad": cfg.carry_grad, "carry_eval": cfg.carry_eval}

    def make_layer(self, num_features: int) -> nn.Module:
        return CarryBatchNorm(num_features, grad=self.carry_grad, eval_stats=self.carry_eval)

    def payload(self, model: nn.Module) -> StatsPayload:
        return StatsPayload(model)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.carry_grad != "carried":
            return
        for m in model.modules():
            if isinstance(m, CarryBatchNorm) and m.weight is not None:
                m.carry_grad_sums(m.bias.grad, m.weight.grad)
