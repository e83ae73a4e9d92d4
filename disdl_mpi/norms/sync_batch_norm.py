"""Synchronized (global) BatchNorm over MPI ranks, exact for unequal and empty local batches.

Forward: one fused Allreduce of a float64 [count, sum, sumsq] buffer per layer. The sums are of
``x - K`` with K = the layer's running mean (the "shifted data" algorithm): K is identical on
every rank because every rank applies the same global update to it, and being close to the
batch mean it keeps ``E[(x-K)^2] - E[x-K]^2`` free of the cancellation that plain sums of
squares suffer when |mean| >> std. Each rank derives its shifted sums from its local mean and
variance (two passes over x), never from a raw float32 sum of squares. All of it stays on the
input's device; the collective is a :class:`~disdl_mpi.comm.stats_allreduce.StatsAllreduce`
(MPI on CPU, host-staged or CUDA-aware MPI on a GPU, or torch.distributed with ``--comm``).
Backward: one fused Allreduce of [sum dy, sum dy*xhat].

Gradient convention. The input gradient of global BN mixes ``dy`` from every rank, so every
rank's ``dy`` must be in the same units:
- ``global``: every rank's ``dy`` is already the gradient of one common loss (e.g. the global
  batch mean); the weight/bias gradients are this rank's share and must be SUMMED over ranks.
- ``local_mean`` (the trainer's convention, docs/CONTRACTS.md): each rank backpropagates the
  mean loss over its OWN n_r samples and the gradient allreducer weights rank r by n_r/N. The
  layer rescales ``dy`` by n_r/N before the reduction and the input gradient back by N/n_r, so
  after the allreducer's weighting the result is exactly the global-batch gradient even for
  unequal n_r (plain SyncBN gives biased gradients there).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from disdl_mpi.comm.stats_allreduce import StatsAllreduce
from disdl_mpi.comm.torch_group import over_torch
from disdl_mpi.norms.local_layers import batch_stats_of, channel_view
from disdl_mpi.norms.scheme import CommTimer, NormScheme

CONVENTIONS = ("local_mean", "global")


def check_convention(convention: str) -> str:
    """``convention`` if it is one of CONVENTIONS, else the ValueError that names them."""
    if convention not in CONVENTIONS:
        raise ValueError(f"syncbn: grad_convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the statistics handed to the kernels: float32 for half inputs, as torch's."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


# The per-element passes, each in two forms: torch's fused CUDA kernels of its own SyncBatchNorm
# (batch_norm_stats: Welford; batch_norm_backward_reduce / _elemt), which exist for CUDA only,
# and the generic form on any device (two passes for the moments; the native BN backward in
# inference form; the centred input gradient). Their numerics are the same (a CUDA test
# compares them); ``fused`` picks the CUDA kernels for CUDA inputs.


def _local_moments(x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(biased variance, mean) of this rank's batch per channel."""
    if fused:
        mean, invstd = torch.batch_norm_stats(x, 0.0)  # eps 0: invstd = var^-1/2 (inf at 0)
        return invstd.pow(-2), mean
    return batch_stats_of(x)


def _grad_sums(dy, x, weight, mean_x, var_x, eps: float, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's sum(dy) and sum(dy * xhat) per channel, xhat from the global statistics."""
    if fused:
        invstd = (var_x + eps).rsqrt()
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
            dy, x, mean_x, invstd, weight, True, False, False
        )
        return sum_dy, sum_dy_xmu * invstd
    # save_mean/save_invstd: empty, not None. The CUDA kernel asserts they are defined and
    # falls back to the running (here: global) statistics when they are empty; the CPU kernel
    # gives the same bits either way (found on the first GPU run).
    empty = x.new_empty(0)
    _, gw, gb = torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, mean_x, var_x, empty, empty, False, eps, [False, True, True]
    )
    return gb, gw


def _grad_input(
    dy, x, weight, mean_x, var, eps: float, sums: torch.Tensor, count, fused: bool
) -> torch.Tensor:
    """w*invstd*(dy - mean_dy - xhat*mean_dy_xhat), the means = ``sums`` / ``count`` (the
    reduced [sum dy, sum dy*xhat] in this rank's units, and the count that makes them means)."""
    c = x.shape[1]
    if fused:
        invstd = (var + eps).rsqrt().to(mean_x.dtype)
        w = weight.to(mean_x.dtype) if weight is not None else None
        sum_dy, sum_dy_xmu = sums[:c].to(mean_x.dtype), (sums[c:] / (var + eps).rsqrt()).to(mean_x.dtype)
        counts = (
            count.to(torch.int32)
            if torch.is_tensor(count)
            else torch.full((1,), count, dtype=torch.int32, device=x.device)
        )
        return torch.batch_norm_backward_elemt(dy, x, mean_x, invstd, w, sum_dy, sum_dy_xmu, counts)
    # per channel, in the statistics' dtype (the float64 sums are only needed until here)
    means = (sums / count).to(mean_x.dtype)
    mean_dy, mean_dy_xhat = means[:c], means[c:]
    invstd = (var + eps).rsqrt_().to(mean_x.dtype)
    w = invstd if weight is None else invstd * weight
    nd = dy.dim()
    # = w*dy + b*(x - mean) + k with b = -w*invstd*mean_dy_xhat, k = -w*mean_dy. Centering x
    # explicitly first matters: the folded form b*x + (k - b*mean) cancels catastrophically in
    # float32 when |mean| >> std (measured: 1e-3 relative gradient errors on a real model).
    # In place on the centred copy: torch's broadcasting addcmul is 10x slower on the CPU.
    grad_x = x - channel_view(mean_x.to(x.dtype), nd)
    grad_x.mul_(channel_view((-w * invstd * mean_dy_xhat).to(x.dtype), nd))
    grad_x.add_(channel_view((-w * mean_dy).to(x.dtype), nd))
    return grad_x.addcmul_(dy, channel_view(w.to(dy.dtype), nd))


class _SyncBNFunction(torch.autograd.Function):
    """Training-mode global batch norm; running stats are updated in place in forward.

    Everything stays on x's device: the per-channel arithmetic in float64 tensors there, the
    per-element work in torch's fused batch-norm kernels called with the GLOBAL statistics as
    if they were running statistics. The only host contact is the collective's own
    (:class:`~disdl_mpi.comm.stats_allreduce.StatsAllreduce`: one packed vector per layer per
    pass, 0-2 host synchronizations by path).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, reduce, convention, fused):
        c = x.shape[1]
        n_local = x.numel() // c if c else 0
        fused = bool(fused and x.is_cuda)
        shift = running_mean.detach().to(torch.float64, copy=True)  # a copy: updated in place below
        buf = torch.zeros(2 * c + 1, dtype=torch.float64, device=x.device)
        if n_local:
            # This rank's mean and biased variance (exact where a folded sum of squares would
            # cancel), re-expressed as sums of (x - K), K the running mean:
            # S1 = n (m - K), S2 = n (var + (m - K)^2). K is the same on every rank.
            var_l, mean_l = _local_moments(x, fused)
            dm = mean_l.double() - shift
            buf[0] = n_local
            torch.mul(dm, n_local, out=buf[1 : c + 1])
            torch.mul(var_l.double().addcmul_(dm, dm), n_local, out=buf[c + 1 :])
        # An empty rank still joins the collective, with zeros.
        host = reduce(buf)
        if host is not None and host[0] <= 1:
            # Every rank sees the same global count, so every rank raises here together.
            raise ValueError(
                f"syncbn: expected more than 1 value per channel over all ranks "
                f"in training, got {int(host[0])} (input shape {tuple(x.shape)})"
            )
        # The count: a host number where the path holds the sums on the host (no extra
        # synchronization), else a device tensor; there a global batch of one value per
        # channel gives variance 0 instead of the error.
        n = float(host[0]) if host is not None else buf[:1].clamp_min(1.0)
        moments = buf[1:] / n
        d_mean = moments[:c]
        var = torch.addcmul(moments[c:], d_mean, d_mean, value=-1.0).clamp_min_(0.0)
        mean = shift.add_(d_mean)
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            bessel = n / (n - 1) if host is not None else n / (n - 1).clamp_min(1.0)
            running_var.mul_(1 - momentum).add_((var * bessel).to(running_var.dtype), alpha=momentum)
        mean_x, var_x = mean.to(_stat_dtype(x)), var.to(_stat_dtype(x))
        # Native fused kernel in inference form: (x - mean) / sqrt(var + eps) * w + b.
        y = F.batch_norm(x, mean_x, var_x, weight, bias, training=False, eps=eps)
        ctx.save_for_backward(x, weight, mean_x, var_x, var)
        ctx.n = n
        ctx.reduce, ctx.n_local, ctx.fused = reduce, n_local, fused
        ctx.eps, ctx.convention = eps, convention
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean_x, var_x, var = ctx.saved_tensors
        n = ctx.n
        c, n_local = x.shape[1], ctx.n_local
        dy = dy.contiguous()
        gw = gb = None
        buf = torch.zeros(2 * c, dtype=torch.float64, device=x.device)
        if n_local:
            gb, gw = _grad_sums(dy, x, weight, mean_x, var_x, ctx.eps, ctx.fused)
            buf[:c] = gb
            buf[c:] = gw
            # Scale this rank's dy into common (global-mean) units before mixing ranks.
            if ctx.convention == "local_mean":
                buf.mul_(n_local / n)
        ctx.reduce(buf)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if n_local:
                # the global means, in this rank's units: sums / (scale n)
                count = n_local if ctx.convention == "local_mean" else n
                grad_x = _grad_input(dy, x, weight, mean_x, var, ctx.eps, buf, count, ctx.fused)
            else:
                grad_x = torch.zeros_like(dy)
        if gw is None and (ctx.has_weight or ctx.has_bias):
            gw = gb = torch.zeros(c, dtype=dy.dtype, device=dy.device)
        grad_w = gw.to(weight.dtype) if ctx.has_weight else None  # the parameters' dtype
        grad_b = gb.to(weight.dtype if weight is not None else dy.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Global BatchNorm over all ranks of ``comm`` (training); running stats in eval, no comm.

    Method: synchronized BN (as in Peng et al. 2018, MegDet / torch.nn.SyncBatchNorm) computed
    over MPI on CPU or GPU. It helps when each rank's batch is small or label-skewed: every rank
    normalizes with the statistics of the whole global batch, which is what a single machine
    would use. Works on (N,C), (N,C,L), (N,C,H,W); a rank with N=0 must still call forward and
    backward so it joins the collectives.
    """

    def __init__(
        self,
        num_features: int,
        comm: Any,
        timer: Optional[CommTimer] = None,
        *,
        reduce: Optional[StatsAllreduce] = None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        convention: str = "local_mean",
        affine: bool = True,
    ):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        self.comm = comm
        self.timer = timer
        # the per-layer collective; the scheme shares one among its layers (and counts there)
        self.reduce = reduce if reduce is not None else StatsAllreduce(comm, timer)
        self.convention = check_convention(convention)
        self.fused_cuda = True  # CUDA inputs: torch's fused SyncBN kernels (False: the generic form)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.dim() > 5:
            raise ValueError(f"syncbn expects (N,C,...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"syncbn: expected {self.num_features} channels, got input shape {tuple(x.shape)}"
            )
        if not self.training:
            return super().forward(x)  # running statistics, identical on every rank: no comm
        # Same momentum bookkeeping as torch's _BatchNorm (momentum=None: cumulative average).
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _SyncBNFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.eps,
            factor,
            self.reduce,
            self.convention,
            self.fused_cuda,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", convention={self.convention}"


class SyncBN(NormScheme):
    """syncbn: every layer a :class:`SyncBatchNorm` on the scheme's own communicator."""

    name = "syncbn"
    summary = (
        "synchronized BatchNorm: statistics of the whole global batch via MPI allreduce (exact "
        "for unequal/empty local batches); what one machine would compute, at one small "
        "allreduce per layer per pass"
    )
    communicates = True
    collective_forward = True

    def __init__(
        self,
        comm: Any = None,
        *,
        grad_convention: str = "local_mean",
        stats_path: str = "auto",
        cuda_aware: bool | str = "auto",
    ) -> None:
        self.grad_convention = check_convention(grad_convention)  # before a communicator is made
        super().__init__(comm)
        # one collective for all layers: it counts the scheme's host synchronizations
        self.reduce = StatsAllreduce(self.comm, self.timer, path=stats_path, cuda_aware=cuda_aware)

    @classmethod
    def options(cls, cfg: Any) -> dict[str, Any]:
        return {"stats_path": "torch" if over_torch(cfg.comm) else "auto", "cuda_aware": cfg.cuda_aware}

    def host_syncs(self) -> int:
        return self.reduce.host_syncs

    def make_layer(self, num_features: int) -> nn.Module:
        return SyncBatchNorm(
            num_features, self.comm, self.timer, reduce=self.reduce, convention=self.grad_convention
        )
