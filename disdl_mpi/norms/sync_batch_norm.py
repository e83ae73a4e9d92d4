"""Synchronized (global) BatchNorm over MPI ranks, exact for unequal and empty local batches.

Forward: one fused Allreduce of a float64 [count, sum, sumsq] buffer per layer. The sums are of
``x - K`` with K = the layer's running mean (the "shifted data" algorithm): K is identical on
every rank because every rank applies the same global update to it, and being close to the
batch mean it keeps ``E[(x-K)^2] - E[x-K]^2`` free of the cancellation that plain sums of
squares suffer when |mean| >> std. Backward: one fused Allreduce of [sum dy, sum dy*xhat].

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
from torch import nn

from ..mpi_ops import allreduce_
from .local_layers import _reduce_dims
from .registry import CommTimer

CONVENTIONS = ("local_mean", "global")


def _allreduce(buf: torch.Tensor, comm: Any, timer: Optional[CommTimer]) -> torch.Tensor:
    if timer is None:
        return allreduce_(buf, comm)
    return timer.timed(lambda: allreduce_(buf, comm))


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view([1, -1] + [1] * (ndim - 2))


class _SyncBNFunction(torch.autograd.Function):
    """Training-mode global batch norm; running stats are updated in place in forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, comm, timer,
                convention):
        c = x.shape[1]
        dims = _reduce_dims(x)
        n_local = x.numel() // c if c else 0
        shift = running_mean.detach().to(x.dtype)
        buf = torch.empty(2 * c + 1, dtype=torch.float64, device=x.device)
        buf[0] = float(n_local)
        if n_local:
            xs = x - _channel_view(shift, x.dim())
            buf[1:c + 1] = xs.sum(dims, dtype=torch.float64)
            buf[c + 1:] = (xs * xs).sum(dims, dtype=torch.float64)
        else:
            buf[1:] = 0.0  # an empty rank still joins the collective with zeros
        _allreduce(buf, comm, timer)
        n = float(buf[0].item())
        if n <= 1:
            # Every rank sees the same global count, so every rank raises here together.
            raise ValueError(f"syncbn: expected more than 1 value per channel over all ranks "
                             f"in training, got {int(n)} (input shape {tuple(x.shape)})")
        d_mean = buf[1:c + 1] / n
        var = (buf[c + 1:] / n - d_mean * d_mean).clamp_(min=0.0)
        mean = shift.to(torch.float64) + d_mean
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype),
                                                alpha=momentum)
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        mean = mean.to(x.dtype)
        xhat = (x - _channel_view(mean, x.dim())) * _channel_view(invstd, x.dim())
        y = xhat
        if weight is not None:
            y = y * _channel_view(weight, x.dim())
        if bias is not None:
            y = y + _channel_view(bias, x.dim())
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.comm, ctx.timer, ctx.n, ctx.n_local = comm, timer, n, n_local
        ctx.convention = convention
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        c = xhat.shape[1]
        dims = _reduce_dims(xhat)
        n, n_local = ctx.n, ctx.n_local
        dy = dy.contiguous()
        if n_local:
            sum_dy = dy.sum(dims, dtype=torch.float64)
            sum_dy_xhat = (dy * xhat).sum(dims, dtype=torch.float64)
        else:
            sum_dy = torch.zeros(c, dtype=torch.float64, device=dy.device)
            sum_dy_xhat = torch.zeros_like(sum_dy)
        # Scale this rank's dy into common (global-mean) units before mixing ranks.
        scale = n_local / n if ctx.convention == "local_mean" else 1.0
        buf = torch.cat([sum_dy, sum_dy_xhat]) * scale
        _allreduce(buf, ctx.comm, ctx.timer)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if n_local:
                back = 1.0 / scale  # and the input gradient back into this rank's units
                mean_dy = (buf[:c] * (back / n)).to(dy.dtype)
                mean_dy_xhat = (buf[c:] * (back / n)).to(dy.dtype)
                w = invstd if weight is None else invstd * weight
                nd = dy.dim()
                grad_x = (dy - _channel_view(mean_dy, nd)
                          - xhat * _channel_view(mean_dy_xhat, nd)) * _channel_view(w, nd)
            else:
                grad_x = torch.zeros_like(dy)
        grad_w = sum_dy_xhat.to(dy.dtype) if weight is not None else None
        grad_b = sum_dy.to(dy.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Global BatchNorm over all ranks of ``comm`` (training); running stats in eval, no comm.

    Method: synchronized BN (as in Peng et al. 2018, MegDet / torch.nn.SyncBatchNorm) computed
    over MPI on CPU or GPU. It helps when each rank's batch is small or label-skewed: every rank
    normalizes with the statistics of the whole global batch, which is what a single machine
    would use. Works on (N,C), (N,C,L), (N,C,H,W); a rank with N=0 must still call forward and
    backward so it joins the collectives.
    """

    def __init__(self, num_features: int, comm: Any, timer: Optional[CommTimer] = None, *,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 convention: str = "local_mean", affine: bool = True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True)
        if convention not in CONVENTIONS:
            raise ValueError(f"syncbn: grad_convention must be one of {CONVENTIONS}, "
                             f"got {convention!r}")
        self.comm = comm
        self.timer = timer
        self.convention = convention

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.dim() > 5:
            raise ValueError(f"syncbn expects (N,C,...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"syncbn: expected {self.num_features} channels, got input shape "
                             f"{tuple(x.shape)}")
        if not self.training:
            return super().forward(x)  # running statistics, identical on every rank: no comm
        # Same momentum bookkeeping as torch's _BatchNorm (momentum=None: cumulative average).
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        return _SyncBNFunction.apply(x, self.weight, self.bias, self.running_mean,
                                     self.running_var, self.eps, factor, self.comm,
                                     self.timer, self.convention)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", convention={self.convention}"
