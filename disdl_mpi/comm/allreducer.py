"""Bucketed, overlapped, sample-weighted gradient allreduce over MPI (or a torch.distributed group).

Parameters are grouped into buckets in REVERSE registration order (roughly the order backward
produces their gradients), each bucket one flat contiguous buffer. Every parameter's ``.grad``
is made a view into its bucket's buffer, so autograd accumulates straight into the buffer MPI
reduces: on CPU (and with a CUDA-aware MPI) no gradient is ever copied for communication.

With ``overlap=True`` a post-accumulate-grad hook marks a parameter ready, scales its gradient
by this rank's weight and, once a bucket is complete, starts its ``Iallreduce``. Buckets are
launched strictly in index order on every rank (MPI matches collectives by order), so a bucket
completed early waits for its predecessors. MPI implementations without an asynchronous
progress thread (the MPICH default) advance a nonblocking collective only inside MPI calls, so
each hook also tests the oldest outstanding request. ``finish_step`` launches whatever is left
(parameters that got no gradient contribute zeros; a rank with an empty batch and no backward
still joins every bucket), waits for all, and casts/copies back where the wire format differs.
With ``overlap=False`` the hooks only scale, and ``finish_step`` reduces bucket by bucket with
the blocking ``Allreduce``.

Timing (``finish_step``'s dict, ``events``): a bucket is "in flight" from its launch until this
rank observes completion (a hook's test or the final wait), so ``total_s`` (the union of those
intervals) bounds the communication time from above; ``exposed_s`` is the time spent inside
``finish_step``, i.e. the communication the backward pass did not hide.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Protocol

import torch
import torch.distributed
from mpi4py import MPI
from torch import nn

from disdl_mpi.comm import compression, mpi_ops
from disdl_mpi.comm.cuda_aware import CudaAwareness, check_choice
from disdl_mpi.comm.cuda_aware import detect as detect_cuda_aware
from disdl_mpi.comm.mpi_ops import mpi_buffer, sum_op
from disdl_mpi.comm.torch_group import TorchWork
from disdl_mpi.units import union_seconds

DEFAULT_BUCKET_MB = 1.0


class Payload(Protocol):
    """Extra numbers summed over ranks by the gradient allreduce itself, unweighted, in the last
    bucket (bn-carry's statistics): ``fill`` before the bucket launches, ``consume`` after."""

    numel: int

    def fill(self, out: torch.Tensor) -> None: ...

    def consume(self, summed: torch.Tensor) -> None: ...


class BucketEvent(NamedTuple):
    """One bucket's communication in the last step; times in seconds since ``begin_step``
    (add :attr:`GradientAllreducer.step_origin` for ``time.perf_counter`` values). A named
    tuple, not a dataclass: one is built per bucket per step, on the critical path."""

    bucket: int
    bytes: int
    t_start: float
    t_end: float


@dataclass
class _Bucket:
    index: int
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    device: torch.device
    dtype: torch.dtype
    grad_buf: torch.Tensor  # flat, param dtype/device; every .grad is a view into it
    wire: torch.Tensor  # what MPI reduces: grad_buf itself, or a cast/host copy
    mpi_buf: object  # numpy view (CPU/host) or the CUDA tensor (CUDA-aware)
    op: MPI.Op  # the sum for the wire dtype (mpi_ops.sum_op)
    wire_bytes: int
    views: list[torch.Tensor] = field(default_factory=list)
    ready: list[bool] = field(default_factory=list)
    pending: int = 0
    request: Optional[MPI.Request] = None
    payload: Optional[torch.Tensor] = None  # trailing elements past the gradients (last bucket)
    t_start: float = 0.0
    t_end: float = 0.0
    # Fixed at build time and read every step: plain flags, not torch attribute lookups.
    staged: bool = False  # wire is a separate buffer (cast and/or host copy)
    on_cuda: bool = False


class GradientAllreducer:
    """Averages gradients over ``comm`` with weights; see the module docstring.

    ``bucket_mb`` caps a bucket's gradient bytes (a tensor larger than the cap gets a bucket of
    its own); ``0`` gives one bucket per tensor. ``skip(name, p)`` keeps a parameter local.
    ``torch_group``: a torch.distributed group (True: the default group) that carries the
    buckets instead of MPI (``--comm gloo|nccl``), with the same buckets, order and overlap.
    """

    def __init__(
        self,
        model: nn.Module,
        comm: MPI.Comm,
        *,
        bucket_mb: float = DEFAULT_BUCKET_MB,
        overlap: bool = True,
        compress: str = "none",
        cuda_aware: str = "auto",
        skip: Callable[[str, nn.Parameter], bool] = lambda name, p: False,
        payload: Optional[Payload] = None,
        torch_group: Any = None,
    ) -> None:
        if not (bucket_mb >= 0 and math.isfinite(bucket_mb)):
            raise ValueError(f"bucket_mb must be a finite number >= 0, got {bucket_mb}")
        self.comm = comm
        self.overlap = bool(overlap)
        self.compress = compression.check(compress)
        self.bucket_mb = float(bucket_mb)
        if payload is not None and payload.numel and self.compress != "none":
            raise ValueError(
                "a statistics payload rides in the gradient buffers as raw sums, "
                "which float16 cannot hold: use --compress none"
            )
        self.payload = payload if payload is not None and payload.numel else None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not skip(n, p)]
        on_cuda = any(p.is_cuda for _, p in named)
        # The verdict and its reason (None on CPU, where MPI reads the tensors directly).
        self.cuda_awareness: Optional[CudaAwareness] = None
        # torch.distributed carries the data (MPI keeps the control: the layout check below)
        self.torch_data = torch_group is not None
        self.group = None if torch_group is None or torch_group is True else torch_group
        if self.torch_data:
            check_choice(cuda_aware)
            self.path = f"torch-{torch.distributed.get_backend(self.group)}"
        elif on_cuda:
            self.cuda_awareness = detect_cuda_aware(cuda_aware)
            self.path = "cuda-aware" if self.cuda_awareness.aware else "host-staged"
        else:
            check_choice(cuda_aware)
            self.path = "cpu-zero-copy"
        # Hooks of CUDA backward run on autograd's device threads: MPI calls from there need at
        # least MPI_THREAD_SERIALIZED (the main thread is blocked in backward meanwhile).
        self._hook_launch = self.overlap and (
            not on_cuda or torch_group is not None or MPI.Query_thread() >= MPI.THREAD_SERIALIZED
        )
        self.buckets = self._build_buckets(named)
        self._slot: dict[int, tuple[_Bucket, int]] = {}
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self._slot[id(p)] = (b, i)
        self._check_layout_agrees()
        self._wire_bytes = sum(b.wire_bytes for b in self.buckets)
        self._handles = [
            p.register_post_accumulate_grad_hook(self.grad_ready) for b in self.buckets for p in b.params
        ]
        self._active = False
        self._weight = 1.0
        self._next = 0  # next bucket index to launch
        self._oldest = 0  # oldest bucket not yet seen complete
        self.step_origin = 0.0  # perf_counter at begin_step
        self.waiting_for: Optional[int] = None  # the bucket finish_step waits on, if any
        self.events: list[BucketEvent] = []
        self._attach_grads()

    # ------------------------------------------------------------------ layout
    def _build_buckets(self, named: list[tuple[str, nn.Parameter]]) -> list[_Bucket]:
        cap = self.bucket_mb * 2**20
        groups: list[list[tuple[str, nn.Parameter]]] = []
        size = 0.0
        for name, p in reversed(named):
            nbytes = p.numel() * p.element_size()
            cur = groups[-1] if groups else None
            same_kind = cur is not None and (cur[0][1].device, cur[0][1].dtype) == (p.device, p.dtype)
            if cur is None or cap == 0 or not same_kind or size + nbytes > cap:
                groups.append([(name, p)])
                size = nbytes
            else:
                cur.append((name, p))
                size += nbytes
        extra = self.payload.numel if self.payload is not None else 0
        return [self._make_bucket(i, g, extra if i == len(groups) - 1 else 0) for i, g in enumerate(groups)]

    def _make_bucket(self, index: int, group: list[tuple[str, nn.Parameter]], extra: int = 0) -> _Bucket:
        """One flat bucket; ``extra`` trailing elements carry the payload (last bucket)."""
        params = [p for _, p in group]
        device, dtype = params[0].device, params[0].dtype
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        payload_at = total
        total += extra
        grad_buf = mpi_ops.zeros(total, dtype, device)
        wdtype = compression.wire_dtype(dtype, self.compress)
        if self.path == "host-staged":
            wire = torch.zeros(total, dtype=wdtype, pin_memory=torch.cuda.is_available())
        elif wdtype != dtype:
            wire = mpi_ops.zeros(total, wdtype, device)
        else:
            wire = grad_buf
        b = _Bucket(
            index=index,
            names=[n for n, _ in group],
            params=params,
            offsets=offsets,
            numel=total,
            device=device,
            dtype=dtype,
            grad_buf=grad_buf,
            wire=wire,
            mpi_buf=None if self.torch_data else mpi_buffer(wire, cuda_aware=self.path == "cuda-aware"),
            op=sum_op(wdtype),
            wire_bytes=wire.numel() * wire.element_size(),
            staged=wire is not grad_buf,
            on_cuda=device.type == "cuda",
        )
        b.views = [grad_buf[o : o + p.numel()].view_as(p) for o, p in zip(offsets, params)]
        b.payload = grad_buf[payload_at:] if extra else None
        b.ready = [False] * len(params)
        return b

    def _check_layout_agrees(self) -> None:
        """Every rank must build the same buckets, or the collectives would mismatch."""
        mine = [(b.numel, str(b.wire.dtype)) for b in self.buckets]
        layouts = self.comm.allgather(mine)
        for r, other in enumerate(layouts):
            if other != mine:
                raise RuntimeError(
                    f"GradientAllreducer: rank {self.comm.Get_rank()} built buckets {mine[:4]}... "
                    f"({len(mine)} buckets) but rank {r} built {other[:4]}... ({len(other)}); "
                    f"models or skip() differ between ranks"
                )

    def bucket_names(self) -> list[list[str]]:
        """Parameter names per bucket, in launch order."""
        return [list(b.names) for b in self.buckets]

    def _attach_grads(self) -> None:
        """Make every ``p.grad`` the view into its bucket (keeping any value it already has)."""
        for b in self.buckets:
            for p, view in zip(b.params, b.views):
                g = p.grad
                if g is view:
                    continue  # the usual case, checked first: it is this per-step loop's cost
                if g is None:
                    view.zero_()
                    p.grad = view
                elif g.data_ptr() != view.data_ptr():
                    view.copy_(g)
                    p.grad = view

    # ------------------------------------------------------------------ step
    def begin_step(self, weight: float) -> None:
        """Before backward: this rank's gradient will be scaled by ``weight`` and summed."""
        weight = float(weight)
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"begin_step: weight must be finite and >= 0, got {weight}")
        if self._active:
            raise RuntimeError("begin_step called twice without finish_step")
        self._attach_grads()  # zero_grad(set_to_none=True) or the user may have replaced .grad
        for b in self.buckets:
            b.ready = [False] * len(b.params)
            b.pending = len(b.params)
            b.request = None
        self._weight = weight
        self._next = self._oldest = 0
        self.events = []
        self.step_origin = time.perf_counter()
        self._active = True

    def grad_ready(self, p: nn.Parameter) -> None:
        """``p.grad`` is final for this step (the autograd hook calls this; so may code that
        writes ``p.grad`` by hand, e.g. a benchmark): scale it, maybe launch its bucket."""
        if not self._active:
            return  # a backward outside begin/finish (e.g. a user's probe): leave it alone
        b, i = self._slot[id(p)]
        if b.ready[i]:
            raise RuntimeError(
                f"GradientAllreducer: parameter {b.names[i]} got a gradient twice "
                f"in one step; call begin_step/finish_step around each backward"
            )
        view = b.views[i]
        g = p.grad
        if g is not view and g is not None and g.data_ptr() != view.data_ptr():
            view.copy_(p.grad)  # autograd replaced the grad instead of accumulating into it
            p.grad = view
        if self._weight != 1.0:
            view.mul_(self._weight)
        b.ready[i] = True
        b.pending -= 1
        if self._hook_launch:
            if b.pending == 0:
                self._launch_ready()
            self._poke()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        if b.pending:
            # No gradient this step on this rank: the slot contributes zeros.
            for ok, view in zip(b.ready, b.views):
                if not ok:
                    view.zero_()
        b.t_start = time.perf_counter()
        if b.payload is not None:
            self.payload.fill(b.payload)  # unweighted: summed as they are
        if b.staged:
            b.wire.copy_(b.grad_buf)  # cast (fp16/bf16) and/or device-to-host staging
        if self.torch_data:
            # NCCL runs in stream order (no host wait); gloo copies or reads the host buffer
            b.request = TorchWork(
                lambda: torch.distributed.all_reduce(b.wire, group=self.group, async_op=True), timed=b.on_cuda
            )
            return
        if b.on_cuda:
            # MPI reads the buffer outside CUDA's stream order: the writes must be finished.
            torch.cuda.current_stream(b.device).synchronize()
        if self._hook_launch:
            b.request = self.comm.Iallreduce(MPI.IN_PLACE, b.mpi_buf, op=b.op)
        else:
            # Without overlap every rank launches from finish_step, so every rank uses the
            # blocking call (MPI forbids matching a blocking with a nonblocking collective);
            # MPICH's blocking intra-node algorithms beat Iallreduce + Wait on small messages.
            self.comm.Allreduce(MPI.IN_PLACE, b.mpi_buf, op=b.op)
            b.request = MPI.REQUEST_NULL

    def _complete(self, b: _Bucket) -> None:
        if isinstance(b.request, TorchWork):
            b.request.Wait()  # a seen completion too: the stream's order and the end event
        b.t_end = time.perf_counter()
        if b.staged:
            b.grad_buf.copy_(b.wire)  # back to the gradient dtype / device
        if b.payload is not None:
            self.payload.consume(b.payload)
        self.events.append(
            BucketEvent(b.index, b.wire_bytes, b.t_start - self.step_origin, b.t_end - self.step_origin)
        )

    def _poke(self) -> None:
        """Drive MPI progress and notice completions, oldest first."""
        while self._oldest < self._next:
            b = self.buckets[self._oldest]
            if not b.request.Test():
                return
            self._complete(b)
            self._oldest += 1

    def finish_step(self) -> dict:
        """After backward: reduce what is left, wait for everything; returns timing seconds."""
        if not self._active:
            raise RuntimeError("finish_step called without begin_step")
        t_fin = time.perf_counter()
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        while self._oldest < self._next:
            b = self.buckets[self._oldest]
            self.waiting_for = b.index  # read by the stall watchdog's thread
            b.request.Wait()
            self.waiting_for = None
            self._complete(b)
            self._oldest += 1
        if self.buckets and self.buckets[0].on_cuda:
            torch.cuda.current_stream(self.buckets[0].device).synchronize()
            if self.torch_data:  # NCCL: the CUDA events' durations, not host clocks
                self.events = [
                    e._replace(t_end=e.t_start + self.buckets[e.bucket].request.seconds())
                    for e in self.events
                ]
        t_end = time.perf_counter()
        self._active = False
        return {
            "total_s": union_seconds([(e.t_start, e.t_end) for e in self.events]),
            "exposed_s": t_end - t_fin,
            "buckets": len(self.buckets),
            "bytes": self._wire_bytes,
        }

    def close(self) -> None:
        """Remove the gradient hooks (the .grad views stay valid tensors)."""
        for h in self._handles:
            h.remove()
        self._handles = []
