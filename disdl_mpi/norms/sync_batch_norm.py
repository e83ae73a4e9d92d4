"""Synchronized (global) BatchNorm over MPI ranks, exact for unequal and empty local batches.

Forward: one fused Allreduce of a float64 [count, sum, sumsq] buffer per layer. The sums are of
``x - K`` with K = the layer's running mean (the "shifted data" algorithm): K is identical on
every rank because every rank applies the same global update to it, and being close to the
batch mean it keeps ``E[(x-K)^2] - E[x-K]^2`` free of the cancellation that plain sums of
squares suffer when |mean| >> std. Each rank derives its shifted sums from its local mean and
M2 (torch's Welford reduction), never from a raw float32 sum of squares.
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

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from disdl_mpi.norms.scheme import CommTimer, NormScheme

CONVENTIONS = ("local_mean", "global")


def check_convention(convention: str) -> str:
    """``convention`` if it is one of CONVENTIONS, else the ValueError that names them."""
    if convention not in CONVENTIONS:
        raise ValueError(f"syncbn: grad_convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention


def _allreduce_host(buf: np.ndarray, comm: Any, timer: Optional[CommTimer]) -> None:
    """In-place sum of a small float64 host buffer over ``comm`` (timed into ``timer``)."""
    if comm.Get_size() == 1:
        return
    if timer is None:
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    else:
        timer.timed(lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM))


def _host64(t: torch.Tensor) -> np.ndarray:
    """A per-channel vector as float64 numpy (numpy: these C-sized ops cost ~1 us, not ~10)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.numpy().astype(np.float64)


def _to(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=_NP_DTYPE.get(like.dtype, np.float32)))
    if t.dtype != like.dtype:  # float16/bfloat16 inputs
        t = t.to(like.dtype)
    return t.to(like.device, non_blocking=True) if like.device.type != "cpu" else t


_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view([1, -1] + [1] * (ndim - 2))


class _SyncBNFunction(torch.autograd.Function):
    """Training-mode global batch norm; running stats are updated in place in forward.

    The per-element work is done by torch's native (fused) batch-norm kernels, called with the
    GLOBAL statistics as if they were running statistics; only the per-channel reductions and
    their allreduces are ours, and the C-sized arithmetic runs in float64 numpy on the host
    (a GPU input pays one small device-to-host copy per collective, which the allreduce
    needs anyway). That keeps the cost close to local BN.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, comm, timer, convention):
        c = x.shape[1]
        n_local = x.numel() // c if c else 0
        shift = _host64(running_mean)
        buf = np.zeros(2 * c + 1, dtype=np.float64)
        buf[0] = n_local
        if n_local:
            # Local mean and biased variance from torch's native (fused, Welford-type) kernel
            # (eps=0, so var = invstd^-2), re-expressed as sums of (x - K):
            # S1 = n (m - K), S2 = n (var + (m - K)^2): exact algebra, no raw sum of x^2.
            _, mean_l, invstd_l = torch.ops.aten.native_batch_norm(
                x.detach(), None, None, None, None, True, 0.0, 0.0
            )
            inv = _host64(invstd_l)
            # The kernel reports invstd 0 (not inf) for a zero variance (a constant channel,
            # or a single value per channel on this rank).
            with np.errstate(divide="ignore"):
                var_l = np.where(inv > 0, 1.0 / np.square(inv), 0.0)
            dm = _host64(mean_l) - shift
            buf[1 : c + 1] = dm * n_local
            buf[c + 1 :] = (var_l + dm * dm) * n_local
        # An empty rank still joins the collective, with zeros.
        _allreduce_host(buf, comm, timer)
        n = float(buf[0])
        if n <= 1:
            # Every rank sees the same global count, so every rank raises here together.
            raise ValueError(
                f"syncbn: expected more than 1 value per channel over all ranks "
                f"in training, got {int(n)} (input shape {tuple(x.shape)})"
            )
        d_mean = buf[1 : c + 1] / n
        var = np.maximum(buf[c + 1 :] / n - d_mean * d_mean, 0.0)
        mean = shift + d_mean
        new_mean = (1 - momentum) * shift + momentum * mean
        new_var = (1 - momentum) * _host64(running_var) + momentum * var * (n / (n - 1))
        with torch.no_grad():
            running_mean.copy_(_to(new_mean, running_mean))
            running_var.copy_(_to(new_var, running_var))
        mean_x, var_x = _to(mean, x), _to(var, x)
        # Native fused kernel in inference form: (x - mean) / sqrt(var + eps) * w + b.
        y = F.batch_norm(x, mean_x, var_x, weight, bias, training=False, eps=eps)
        ctx.save_for_backward(x, weight, mean_x, var_x)
        ctx.stats = (mean, var)
        ctx.comm, ctx.timer, ctx.n, ctx.n_local = comm, timer, n, n_local
        ctx.eps, ctx.convention = eps, convention
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean_x, var_x = ctx.saved_tensors
        c = x.shape[1]
        n, n_local = ctx.n, ctx.n_local
        dy = dy.contiguous()
        gw = gb = None
        if n_local:
            # Native kernel in inference form gives this rank's sum(dy * xhat) and sum(dy)
            # with xhat computed from the global statistics.
            # save_mean/save_invstd: empty, not None. The CUDA kernel asserts they are defined
            # and falls back to the running (here: global) statistics when they are empty; the
            # CPU kernel gives the same bits either way (found on the first GPU run).
            empty = x.new_empty(0)
            _, gw, gb = torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, mean_x, var_x, empty, empty, False, ctx.eps, [False, True, True]
            )
            buf = np.concatenate([_host64(gb), _host64(gw)])
        else:
            buf = np.zeros(2 * c, dtype=np.float64)
        # Scale this rank's dy into common (global-mean) units before mixing ranks.
        scale = n_local / n if ctx.convention == "local_mean" else 1.0
        buf *= scale
        _allreduce_host(buf, ctx.comm, ctx.timer)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if n_local:
                mean, var = ctx.stats
                back = 1.0 / (scale * n)  # global means, back in this rank's units
                mean_dy, mean_dy_xhat = buf[:c] * back, buf[c:] * back
                invstd = 1.0 / np.sqrt(var + ctx.eps)
                w = invstd if weight is None else invstd * _host64(weight)
                # grad_x = w*invstd*(dy - mean_dy - xhat*mean_dy_xhat)
                #        = a*dy + b*(x - mean) + k. Centering x explicitly first matters: the
                # folded form b*x + (k - b*mean) cancels catastrophically in float32 when
                # |mean| >> std (measured: 1e-3 relative gradient errors on a real model).
                b = -w * invstd * mean_dy_xhat
                k = -w * mean_dy
                nd = dy.dim()
                centered = x - _channel_view(mean_x, nd)
                grad_x = torch.addcmul(_channel_view(_to(k, x), nd), centered, _channel_view(_to(b, x), nd))
                grad_x.addcmul_(dy, _channel_view(_to(w, dy), dy.dim()))
            else:
                grad_x = torch.zeros_like(dy)
        if gw is None and (ctx.has_weight or ctx.has_bias):
            gw = gb = torch.zeros(c, dtype=dy.dtype, device=dy.device)
        grad_w = gw if ctx.has_weight else None
        grad_b = gb if ctx.has_bias else None
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
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        convention: str = "local_mean",
        affine: bool = True,
    ):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        self.comm = comm
        self.timer = timer
        self.convention = check_convention(convention)

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
            self.comm,
            self.timer,
            self.convention,
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

    def __init__(self, comm: Any = None, *, grad_convention: str = "local_mean") -> None:
        self.grad_convention = check_convention(grad_convention)  # before a communicator is made
        super().__init__(comm)

    def make_layer(self, num_features: int) -> nn.Module:
        return SyncBatchNorm(num_features, self.comm, self.timer, convention=self.grad_convention)
