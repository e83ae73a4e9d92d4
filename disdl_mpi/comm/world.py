"""The MPI communicator and per-rank identity: the only global state of the package."""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass

from mpi4py import MPI

from disdl_mpi.errors import UserError


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    hostname: str
    hostnames: tuple[str, ...] = ()  # every rank's, in rank order

    @property
    def nodes(self) -> int:
        return len(set(self.hostnames)) or 1


def world() -> MPI.Comm:
    """COMM_WORLD; every module receives the communicator from the caller, never a global."""
    return MPI.COMM_WORLD


def rank_info(comm: MPI.Comm) -> RankInfo:
    """Rank, world size, and the node-local rank among the ranks with this rank's hostname.

    By hostname, not by a shared-memory split: an MPI told not to use shared memory (the
    emulated cluster's TCP-only jobs) puts every rank in a "node" of its own, while the ranks
    of one node still share its cores.
    """
    me = socket.gethostname()
    hostnames = tuple(comm.allgather(me))
    rank = comm.Get_rank()
    return RankInfo(
        rank=rank,
        world_size=comm.Get_size(),
        local_rank=hostnames[:rank].count(me),
        local_size=hostnames.count(me),
        hostname=me,
        hostnames=hostnames,
    )


def mpi_library() -> str:
    """A one-line name of the MPI library in use (e.g. 'MPICH 5.0.2')."""
    try:
        first = MPI.Get_library_version().strip().splitlines()[0]
    except Exception:  # pragma: no cover - exotic MPIs
        return "unknown MPI"
    return " ".join(first.split())


def install_abort_handler(comm: MPI.Comm) -> None:
    """Make an uncaught exception on any rank abort the whole job instead of hanging it.

    Under plain ``python`` the other ranks would sit in their next collective forever; this is
    the guarantee ``python -m mpi4py`` gives, provided here because users launch without it.
    """
    rank = comm.Get_rank()

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            msg = f"[rank {rank}] interrupted\n"
        elif isinstance(exc, UserError):
            # Errors that every rank detects alike are printed once, by rank 0.
            msg = f"error: {exc}\n" if rank == 0 else ""
        else:
            msg = "".join(
                f"[rank {rank}] {line}"
                for line in "".join(traceback.format_exception(exc_type, exc, tb)).splitlines(True)
            )
        if msg:
            sys.stderr.write(msg)
            sys.stderr.flush()
        code = getattr(exc, "exit_code", 1)
        if comm.Get_size() == 1:
            os._exit(code)
        if isinstance(exc, UserError) and exc.collective:
            # Every rank raised the same error: leave together, no Abort noise from the launcher.
            try:
                comm.Barrier()
                # Finalize so MPI removes its shared-memory segments: a requeued SLURM job
                # restarts with the same job/step id and would attach to a leaked segment.
                MPI.Finalize()
            finally:
                os._exit(code)
        abort_job(comm, code)

    sys.excepthook = hook


# Seconds between a rank's last words and MPI_Abort. Hydra's proxy drops a rank's unread
# stderr when the abort request reaches it first: without this pause a stall report (and even
# MPICH's own "Abort(5)" line) went missing in about one run in three on this 2-core machine.
ABORT_OUTPUT_GRACE_S = 0.5


def abort_job(comm: MPI.Comm, code: int) -> None:
    """End every rank with exit code ``code``, after giving the launcher time to forward what
    this rank has written to stdout and stderr."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    time.sleep(ABORT_OUTPUT_GRACE_S)
    comm.Abort(code)


def agree_or_raise(comm: MPI.Comm, error: str | None, *, exc_type=UserError) -> None:
    """Collective check: if any rank reports an error, every rank raises all the messages.

    Used after local validation so a bad input on one rank never leaves the others waiting.
    """
    errors = comm.allgather(error)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        # Errors every rank sees alike (configuration) are reported once, not once per rank.
        text = "\n".join(dict.fromkeys(e for _, e in bad))
        raise exc_type(text, collective=True)
