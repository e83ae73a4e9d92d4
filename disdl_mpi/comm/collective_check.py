"""``--check-collectives``: every rank compares each collective's signature before running it.

MPI matches collectives by call order only. A rank that skips one (an empty rank not joining
syncbn's forward) or calls it with another size makes the job hang or silently mix buffers.
In this debug mode the run's communicators are wrapped in :class:`CheckedComm`: before each
collective, all ranks ``Allgather`` one int64 hash of (operation, reduction op/root, buffer
shape and dtype, communicator name) on a private communicator. The checks are themselves
identical collectives, so they always match one another: a rank that took another path meets
the others' check with a different hash, and every rank stops with a message naming what each
side was about to call and where. Disabled (the default), nothing is wrapped and nothing is paid.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

from disdl_mpi.errors import UserError

_HERE = {str(Path(__file__).resolve()), str((Path(__file__).parent / "mpi_ops.py").resolve())}
_OP_NAMES = ("SUM", "MAX", "MIN", "PROD", "BOR", "BAND", "LOR", "LAND", "MAXLOC", "MINLOC")


def _op_name(op: Any) -> str:
    """MPI.Op handles are not hashable: compare against the predefined ones."""
    for name in _OP_NAMES:
        if getattr(MPI, name, None) == op:
            return name
    return "user-op"


class CollectiveMismatch(UserError):
    """Ranks were about to run different collectives; raised on every rank together."""

    def __init__(self, message: str):
        super().__init__(message, collective=True, exit_code=4)


def describe_buffer(buf: Any) -> str:
    """Shape and dtype of an mpi4py buffer argument (array, tensor, or [array, type] spec)."""
    if buf is None or buf is MPI.IN_PLACE:
        return "-"
    if isinstance(buf, (list, tuple)) and buf:
        buf = buf[0]
    shape = getattr(buf, "shape", None)
    dtype = getattr(buf, "dtype", None)
    if shape is None:
        try:
            return f"{len(memoryview(buf).cast('B'))} bytes"
        except TypeError:
            return type(buf).__name__
    return f"{tuple(int(s) for s in shape)} {str(dtype).replace('torch.', '')}"


def _site() -> str:
    """The first caller outside this module and mpi_ops: where the collective comes from."""
    f = sys._getframe(2)
    while f is not None and str(Path(f.f_code.co_filename).resolve()) in _HERE:
        f = f.f_back
    if f is None:
        return "?"
    return f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}"


class CollectiveChecker:
    """Counts checked calls and compares signatures over its own duplicated communicator."""

    def __init__(self, comm: MPI.Comm) -> None:
        self._comm = comm.Dup()
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.calls = 0
        self._mine = np.zeros(1, dtype=np.int64)
        self._all = np.zeros(self.size, dtype=np.int64)

    def check(self, signature: str) -> None:
        """Collective: raise CollectiveMismatch on every rank if any signature differs."""
        self.calls += 1
        digest = hashlib.blake2b(signature.encode(), digest_size=8).digest()
        self._mine[0] = int.from_bytes(digest, "little", signed=True)
        self._comm.Allgather(self._mine, self._all)
        if (self._all == self._mine[0]).all():
            return
        # Rare path: fetch the full descriptions so the message names both sides.
        described = self._comm.allgather((f"{signature} at {_site()}", socket.gethostname()))
        groups: dict[str, list[tuple[int, str]]] = {}
        for r, (text, host) in enumerate(described):
            groups.setdefault(text, []).append((r, host))
        lines = [
            f"  rank{'s' if len(rs) > 1 else ''} {','.join(str(r) for r, _ in rs)} on "
            f"{','.join(dict.fromkeys(h for _, h in rs))}: {text}"
            for text, rs in groups.items()
        ]
        raise CollectiveMismatch(
            f"collective mismatch at checked call #{self.calls}: the "
            f"ranks were about to run different collectives:\n" + "\n".join(lines)
        )


class CheckedComm:
    """A communicator wrapper that checks every collective before delegating it.

    Point-to-point calls, queries and anything not listed pass through unchanged; ``Dup``
    returns a checked communicator sharing the same checker.
    """

    def __init__(self, comm: MPI.Comm, checker: CollectiveChecker, name: str = "world"):
        self._comm = comm
        self._checker = checker
        self._name = name
        self._dups = 0

    @property
    def raw(self) -> MPI.Comm:
        return self._comm

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._comm, attr)

    def _check(self, op: str, detail: str = "") -> None:
        self._checker.check(f"{op}{detail} on {self._name}")

    # -- buffer collectives
    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        buf = recvbuf if sendbuf is MPI.IN_PLACE else sendbuf
        self._check("Allreduce", f"({_op_name(op)}) {describe_buffer(buf)}")
        return self._comm.Allreduce(sendbuf, recvbuf, op=op)

    def Iallreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        buf = recvbuf if sendbuf is MPI.IN_PLACE else sendbuf
        self._check("Iallreduce", f"({_op_name(op)}) {describe_buffer(buf)}")
        return self._comm.Iallreduce(sendbuf, recvbuf, op=op)

    def Bcast(self, buf, root=0):
        self._check("Bcast", f"(root {root}) {describe_buffer(buf)}")
        return self._comm.Bcast(buf, root=root)

    def Allgather(self, sendbuf, recvbuf):
        self._check("Allgather", f" {describe_buffer(sendbuf)}")
        return self._comm.Allgather(sendbuf, recvbuf)

    def Reduce(self, sendbuf, recvbuf, op=MPI.SUM, root=0):
        buf = recvbuf if sendbuf is MPI.IN_PLACE else sendbuf
        self._check("Reduce", f"({_op_name(op)}, root {root}) {describe_buffer(buf)}")
        return self._comm.Reduce(sendbuf, recvbuf, op=op, root=root)

    def Barrier(self):
        self._check("Barrier")
        return self._comm.Barrier()

    # -- pickled-object collectives (sizes may differ legitimately: only the kind is compared)
    def allgather(self, obj):
        self._check("allgather(obj)")
        return self._comm.allgather(obj)

    def allreduce(self, obj, op=MPI.SUM):
        self._check("allreduce(obj)", f" ({_op_name(op)})")
        return self._comm.allreduce(obj, op=op)

    def bcast(self, obj, root=0):
        self._check("bcast(obj)", f" (root {root})")
        return self._comm.bcast(obj, root=root)

    def gather(self, obj, root=0):
        self._check("gather(obj)", f" (root {root})")
        return self._comm.gather(obj, root=root)

    def Dup(self):
        self._dups += 1
        self._check("Dup")
        return CheckedComm(self._comm.Dup(), self._checker, f"{self._name}.dup{self._dups}")

    def Split_type(self, *args, **kwargs):
        self._check("Split_type")
        return self._comm.Split_type(*args, **kwargs)
