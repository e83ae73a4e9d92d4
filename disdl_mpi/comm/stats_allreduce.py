"""The small per-layer collective of syncbn (count and moments forward, two gradient sums
backward): one packed float64 vector summed in place over the ranks, by one of four paths,
each counting the host synchronizations it makes.

=============  =====================================================  ==================
path           how                                                    host syncs a call
=============  =====================================================  ==================
cpu            MPI reads the tensor's memory (numpy view)             0
host-staged    blocking copy to a pinned host buffer, MPI, copy back  2
cuda-aware     the stream synchronized, MPI reads the device buffer   1
torch          torch.distributed (NCCL: in stream order; gloo)        0
=============  =====================================================  ==================

A host synchronization is a point where the CPU waits for the device (a device-to-host copy,
a stream synchronize) or hands it host memory (the copy back). The count is kept in the code
path itself, so it is the same on a CPU, where the copies and the synchronize are cheap, as on
a GPU; the tests check it on CPU (a named path runs its calls on CPU tensors too).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from mpi4py import MPI

from disdl_mpi.comm.cuda_aware import detect as detect_cuda_aware

PATHS = ("cpu", "host-staged", "cuda-aware", "torch")


class StatsAllreduce:
    """In-place sums of small float64 tensors over ``comm`` or a torch.distributed group.

    ``path``: one of PATHS, or "auto": cpu for CPU tensors, cuda-aware or host-staged for
    device tensors by ``cuda_aware`` (a bool, or ``--cuda-aware``'s auto|yes|no). A named
    device path is taken for CPU tensors too (the tests count its calls on CPU).
    ``group``: the torch.distributed group of the torch path (None: the default group).
    ``timer``: anything with ``timed(fn)`` (a scheme's CommTimer).
    """

    def __init__(
        self,
        comm: Any,
        timer: Any = None,
        *,
        path: str = "auto",
        cuda_aware: bool | str = "auto",
        group: Any = None,
    ) -> None:
        if path != "auto" and path not in PATHS:
            raise ValueError(f"stats allreduce path must be 'auto' or one of {PATHS}, got {path!r}")
        self.comm, self.timer, self.path, self.cuda_aware, self.group = comm, timer, path, cuda_aware, group
        self.host_syncs = 0
        self.calls = 0
        self._pinned: dict[int, torch.Tensor] = {}

    def path_for(self, t: torch.Tensor) -> str:
        """The path a tensor on ``t``'s device takes."""
        if self.path != "auto":
            return self.path
        if not t.is_cuda:
            return "cpu"
        if isinstance(self.cuda_aware, str):  # --cuda-aware auto|yes|no, decided on first use
            self.cuda_aware = detect_cuda_aware(self.cuda_aware).aware
        return "cuda-aware" if self.cuda_aware else "host-staged"

    def __call__(self, t: torch.Tensor) -> Optional[np.ndarray]:
        """Sum ``t`` (contiguous float64) over the ranks in place; the sums as host numpy when
        the path already holds them on the host (cpu, host-staged), else None."""
        self.calls += 1
        path = self.path_for(t)
        if path == "torch":
            return self._torch(t)
        if path == "cpu":
            host = t.numpy()
            self._mpi(host)
            return host
        if path == "cuda-aware":
            self._sync(t)
            self._mpi(t if t.is_cuda else t.numpy())
            return None
        host = self._staging(t)
        host.copy_(t)  # device to host: waits for the kernels that wrote t
        self.host_syncs += 1
        self._mpi(host.numpy())
        t.copy_(host, non_blocking=True)  # host to device, from pinned memory
        self.host_syncs += 1
        return host.numpy()

    def _sync(self, t: torch.Tensor) -> None:
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()
        self.host_syncs += 1

    def _staging(self, t: torch.Tensor) -> torch.Tensor:
        buf = self._pinned.get(t.numel())
        if buf is None:
            buf = torch.empty(t.numel(), dtype=t.dtype, pin_memory=torch.cuda.is_available())
            self._pinned[t.numel()] = buf
        return buf

    def _mpi(self, buf: Any) -> None:
        if self.comm.Get_size() > 1:
            self._timed(lambda: self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM))

    def _torch(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        self._timed(lambda: dist.all_reduce(t, group=self.group))

    def _timed(self, collective: Any) -> None:
        if self.timer is None:
            collective()
        else:
            self.timer.timed(collective)
