"""``--stall-timeout S``: name the ranks a stalled job waits for, then end it.

A rank that stops (a hung node, a SIGSTOP, a deadlock in user code) leaves every other rank
blocked in its next collective, forever. With a stall timeout each rank runs a watchdog thread
that tells every other rank, on a private communicator, where its main thread is (step, phase,
and the gradient bucket it waits on), a few times per timeout. When a rank has been in one
phase longer than the timeout, the lowest rank still heard from reports: the ranks it has not
heard from within the timeout (they have not arrived) and where each of the others waits; then
it ends the job with ``MPI_Abort`` and the exit code :data:`EXIT_STALL`.

It needs ``MPI_THREAD_MULTIPLE`` (mpi4py asks for it by default; MPICH and Open MPI give it): the
watchdog's messages travel while the main thread sits in a collective.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Optional

from mpi4py import MPI

from disdl_mpi.comm.world import abort_job

EXIT_STALL = 5
TAG = 0x57A1


class StallWatchdog:
    """One per rank; ``enter(step, phase)`` marks where the main thread is."""

    def __init__(
        self,
        comm: MPI.Comm,
        timeout: float,
        *,
        detail: Callable[[], str] = lambda: "",
        abort: Optional[Callable[[int], None]] = None,
    ) -> None:
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError("--stall-timeout needs MPI_THREAD_MULTIPLE")
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = float(timeout)
        self.interval = max(0.05, self.timeout / 8)
        self.detail = detail  # e.g. the bucket the allreducer waits on
        self.abort = abort or (lambda code: abort_job(MPI.COMM_WORLD, code))
        # Not watching until the first phase: start-up (model build, first collectives) may
        # legitimately take longer than the timeout.
        self.state = {"step": -1, "phase": "start", "since": None}
        self.seen: dict[int, tuple[dict, float]] = {}  # rank -> (its state, when heard)
        self._stop = threading.Event()
        self._sends: list[Any] = []
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()

    def enter(self, step: int, phase: str) -> None:
        self.state = {"step": int(step), "phase": phase, "since": time.monotonic()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 1)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            since = self.state["since"]
            mine = dict(self.state, waiting=0.0 if since is None else now - since, detail=self.detail())
            self._sends = [r for r in self._sends if not r.Test()]
            for dest in range(self.size):
                if dest != self.rank:
                    self._sends.append(self.comm.isend(mine, dest=dest, tag=TAG))
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG):
                status = MPI.Status()
                msg = self.comm.recv(source=MPI.ANY_SOURCE, tag=TAG, status=status)
                self.seen[status.Get_source()] = (msg, time.monotonic())
            self.seen[self.rank] = (mine, now)
            if since is not None and mine["waiting"] > self.timeout:
                self._stalled(now)

    def _stalled(self, now: float) -> None:
        alive = sorted(r for r, (_, t) in self.seen.items() if now - t <= self.timeout)
        if alive and alive[0] != self.rank:
            # the lowest live rank reports; give it time, then end the job ourselves
            if now - (self.state["since"] or now) < 2 * self.timeout:
                return
        lines = [
            f"stall: no progress for {self.timeout:.0f} s (--stall-timeout); ending the "
            f"job (exit code {EXIT_STALL})"
        ]
        for r in range(self.size):
            if r not in self.seen:
                lines.append(f"  rank {r}: not heard from at all (has not arrived)")
                continue
            st, t = self.seen[r]
            where = f"step {st['step']}, phase {st['phase']}" + (
                f", {st['detail']}" if st.get("detail") else ""
            )
            if now - t > self.timeout:
                lines.append(f"  rank {r}: has not arrived: silent for {now - t:.0f} s, last seen at {where}")
            else:
                lines.append(f"  rank {r}: waiting {st['waiting']:.0f} s at {where}")
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        self.abort(EXIT_STALL)
