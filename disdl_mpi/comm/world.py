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


def where(rank: int, hostname: str | None = None, virtual_ranks: int = 1) -> str:
    """ "rank R on NODE": how every report names a rank; a process of K > 1 virtual ranks
    (``--virtual-ranks K``) adds the isolated ranks it holds, " (isolated ranks 4-7)"."""
    name = f"rank {rank} on {hostname or socket.gethostname()}"
    if virtual_ranks > 1:
        name += f" (isolated ranks {rank * virtual_ranks}-{(rank + 1) * virtual_ranks - 1})"
    return name


def mpi_library() -> str:
    """A one-line name of the MPI library in use (e.g. 'MPICH 5.0.2')."""
    try:
        first = MPI.Get_library_version().strip().splitlines()[0]
    except Exception:  # pragma: no cover - exotic MPIs
        return "unknown MPI"
    return " ".join(first.split())


def install_abort_handler(comm: MPI.Comm) -> None:
    """Make an uncaught exception on any rank end the whole job instead of hanging it.

    Under plain ``python`` the other ranks would sit in their next collective forever; this is
    the guarantee ``python -m mpi4py`` gives, provided here because users launch without it.
    Every error exit of the library comes through here and ends in :func:`leave_job`.
    """
    rank = comm.Get_rank()

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            msg = f"[{where(rank)}] interrupted\n"
        elif isinstance(exc, UserError) and exc.collective:
            # Errors that every rank detects alike are printed once, by rank 0.
            msg = f"error: {exc}\n" if rank == 0 else ""
        elif isinstance(exc, UserError):
            msg = f"error on {where(rank)}: {exc}\n"
        else:
            msg = "".join(
                f"[{where(rank)}] {line}"
                for line in "".join(traceback.format_exception(exc_type, exc, tb)).splitlines(True)
            )
        if msg:
            sys.stderr.write(msg)
        together = isinstance(exc, UserError) and exc.collective
        leave_job(comm, getattr(exc, "exit_code", 1), collective=together)

    sys.excepthook = hook


# Seconds between a rank's last words and the first rank's exit. Hydra ends every other rank
# the moment one exits (even with code 0) and can drop a rank's stderr that its proxy has not
# read yet: without this pause a stall report went missing in about one run in three, and a
# validation error in about one in twenty, on this 2-core machine with other work beside it.
ABORT_OUTPUT_GRACE_S = 1.0


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def leave_job(comm: MPI.Comm, code: int, *, collective: bool) -> None:
    """The one way a rank ends the job on an error: flush, give the launcher time to forward
    what was written, then leave.

    ``collective``: every rank raised the same error at the same point, so all leave together
    with the same exit code (a barrier after the pause, then ``MPI_Finalize``); otherwise this
    rank alone knows, and ``MPI_Abort`` ends the others.
    """
    _flush()
    if comm.Get_size() == 1:
        os._exit(code)
    time.sleep(ABORT_OUTPUT_GRACE_S)
    if not collective:
        comm.Abort(code)
        os._exit(code)  # pragma: no cover - Abort does not return
    try:
        comm.Barrier()
        # Finalize so MPI removes its shared-memory segments: a requeued SLURM job restarts
        # with the same job/step id and would attach to a leaked segment.
        MPI.Finalize()
    finally:
        os._exit(code)


def abort_job(comm: MPI.Comm, code: int) -> None:
    """End every rank with exit code ``code`` from this one (the stall watchdog's thread)."""
    leave_job(comm, code, collective=False)


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
