"""The stall watchdog, on by default: name the ranks a stalled job waits for, then end it.

A rank that stops (a node that lost its link, a SIGSTOP, a deadlock in user code) leaves every
other rank blocked in its next collective, forever. Each rank runs a watchdog thread that
tells every other rank, on a private communicator, where its main thread is (step, phase, the
gradient bucket it waits on) every couple of seconds: a heartbeat that keeps coming however
long the main thread computes. From what it hears, the lowest rank still heard from reports
the ranks that have gone silent and where each of the others waits, and ends the job with
``MPI_Abort`` and :data:`EXIT_STALL`.

Two policies (:class:`StallPolicy`):

- the default (no option): a first report after 60 s without progress, without ending
  anything; the end when a rank has been silent for 120 s while the others wait (its process,
  node or link is gone: a heartbeat thread does not fall silent on a slow step), or when no
  rank has moved for max(600 s, 10x the longest phase any rank has completed), a deadlock
  among ranks that still talk (NCCL's watchdog also waits 10 minutes);
- ``--stall-timeout S``: report and end after S seconds, silent or not; ``0`` turns it off.

A job that is suspended as a whole (SIGSTOP of every rank, SLURM's ``scontrol suspend``) and
resumed is not a stall: each watchdog sees the gap in its own ticks and counts from the resume.

It needs ``MPI_THREAD_MULTIPLE`` (mpi4py asks for it by default; MPICH and Open MPI give it): the
heartbeats travel while the main thread sits in a collective. Without it the default is
dropped with a note and an explicit timeout is an error.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from mpi4py import MPI

from disdl_mpi.comm.world import abort_job, where

EXIT_STALL = 5
TAG = 0x57A1
# A gap this long in the watchdog thread's own ticks means this process was not running.
SUSPENDED_S = 10.0


@dataclass(frozen=True)
class StallPolicy:
    """When to report a stall, and when to end the job (seconds)."""

    report_after: float  # no progress this long: the first report (the job goes on)
    lost_after: float  # a rank silent this long while this rank waits: end
    stuck_after: float  # no progress this long, everyone still heard: end ...
    stuck_multiple: float = 0.0  # ... or this many times the longest phase seen, if longer
    explicit: bool = False  # --stall-timeout S

    @classmethod
    def default(cls) -> "StallPolicy":
        return cls(report_after=60.0, lost_after=120.0, stuck_after=600.0, stuck_multiple=10.0)

    @classmethod
    def fixed(cls, seconds: float) -> "StallPolicy":
        s = float(seconds)
        return cls(report_after=s, lost_after=s, stuck_after=s, explicit=True)

    @property
    def interval(self) -> float:
        """Seconds between heartbeats: several per threshold, at most 2 s."""
        return max(0.05, min(2.0, self.report_after / 8))

    def stuck_limit(self, longest_phase: float) -> float:
        return max(self.stuck_after, self.stuck_multiple * longest_phase)

    def describe(self) -> str:
        if self.explicit:
            return f"--stall-timeout {self.stuck_after:g}"
        return (
            f"the default: the job ends when a rank is silent for {self.lost_after:.0f} s or nothing "
            f"moves for {self.stuck_after:.0f} s (--stall-timeout S to change, 0 to turn off)"
        )


def make_watchdog(
    comm: MPI.Comm,
    stall_timeout: Optional[float],
    log: Callable[[str], None],
    hosts: Optional[Sequence[str]] = None,
    virtual_ranks: int = 1,
):
    """The watchdog ``--stall-timeout`` asks for: None = the default policy, 0 = none.
    An explicit timeout without MPI_THREAD_MULTIPLE is the constructor's error."""
    if stall_timeout == 0:
        return None
    if stall_timeout is None and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        log("note: no stall watchdog (this MPI gives no MPI_THREAD_MULTIPLE)")
        return None
    policy = StallPolicy.default() if stall_timeout is None else StallPolicy.fixed(stall_timeout)
    return StallWatchdog(comm, policy, hosts=hosts, virtual_ranks=virtual_ranks)


class StallWatchdog:
    """One per rank; ``enter(step, phase)`` marks where the main thread is."""

    def __init__(
        self,
        comm: MPI.Comm,
        policy: StallPolicy | float,
        *,
        detail: Callable[[], str] = lambda: "",
        abort: Optional[Callable[[int], None]] = None,
        hosts: Optional[Sequence[str]] = None,
        virtual_ranks: int = 1,
    ) -> None:
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError("the stall watchdog (--stall-timeout) needs MPI_THREAD_MULTIPLE")
        self.policy = policy if isinstance(policy, StallPolicy) else StallPolicy.fixed(policy)
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # every rank's node, in rank order (RankInfo.hostnames when the caller has them)
        self.hosts = list(hosts) if hosts is not None else self.comm.allgather(socket.gethostname())
        self.virtual_ranks = virtual_ranks  # reports name the isolated ranks a process holds
        self.detail = detail  # e.g. the bucket the allreducer waits on
        self.abort = abort or (lambda code: abort_job(MPI.COMM_WORLD, code))
        # Not watching until the first phase: start-up (model build, first collectives) may
        # legitimately take longer than any threshold.
        self.state: dict[str, Any] = {"step": -1, "phase": "start", "since": None}
        self.longest = 0.0  # this rank's longest completed phase (seconds)
        self.started = time.monotonic()
        self.seen: dict[int, tuple[dict, float]] = {}  # rank -> (its state, when heard)
        self.reported: Optional[float] = None  # the 'since' of the stall already reported
        self._stop = threading.Event()
        self._sends: list[Any] = []
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()

    def enter(self, step: int, phase: str) -> None:
        now = time.monotonic()
        since = self.state["since"]
        if since is not None and now - since > self.longest:
            self.longest = now - since
        self.state = {"step": int(step), "phase": phase, "since": now}

    def close(self) -> None:
        """Stop the heartbeats (before MPI_Finalize); a second call does nothing more."""
        self._stop.set()
        self._thread.join(timeout=2 * self.policy.interval + 1)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.policy.interval):
            now = time.monotonic()
            if now - last > max(SUSPENDED_S, 5 * self.policy.interval):
                self._resumed(now)  # this process did not run: the whole job was suspended
            last = now
            since = self.state["since"]
            mine = dict(
                self.state,
                waiting=0.0 if since is None else now - since,
                detail=self.detail(),
                longest=self.longest,
            )
            self._sends = [r for r in self._sends if not r.Test()]
            for dest in range(self.size):
                if dest != self.rank:
                    self._sends.append(self.comm.isend(mine, dest=dest, tag=TAG))
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG):
                status = MPI.Status()
                msg = self.comm.recv(source=MPI.ANY_SOURCE, tag=TAG, status=status)
                self.seen[status.Get_source()] = (msg, time.monotonic())
            self.seen[self.rank] = (mine, now)
            if since is not None:
                self._judge(now, mine["waiting"], since)

    def _resumed(self, now: float) -> None:
        """After a gap in this thread's own ticks (SIGSTOP of every rank, SLURM's ``scontrol
        suspend``, a machine that slept) no one's silence or wait is evidence: count from now."""
        self.seen = {r: (st, now) for r, (st, _) in self.seen.items()}
        self.started = now
        if self.state["since"] is not None:
            self.state = dict(self.state, since=now)

    def _silence(self, now: float) -> dict[int, float]:
        """Seconds since each other rank was last heard (since watching began, if never)."""
        return {
            r: now - (self.seen[r][1] if r in self.seen else self.started)
            for r in range(self.size)
            if r != self.rank
        }

    def _judge(self, now: float, waiting: float, since: float) -> None:
        p = self.policy
        if waiting <= p.report_after:
            return
        silence = self._silence(now)
        lost = sorted(r for r, s in silence.items() if s > p.lost_after)
        longest = max(st.get("longest", 0.0) for st, _ in self.seen.values())
        limit = p.stuck_limit(longest)
        ending = (lost and waiting > p.lost_after) or waiting > limit
        alive = [r for r in range(self.size) if r == self.rank or silence[r] <= p.lost_after]
        if alive[0] != self.rank:
            # The lowest live rank reports; give it time, then end the job ourselves.
            if not ending or waiting < 2 * (p.lost_after if lost else limit):
                return
        if ending:
            names = ", ".join(where(r, self.hosts[r], self.virtual_ranks) for r in lost)
            why = (
                f"{names} silent for over {p.lost_after:.0f} s"
                if lost and waiting > p.lost_after
                else f"no progress for {waiting:.0f} s"
            )
            head = f"stall: {why} ({p.describe()}); ending the job (exit code {EXIT_STALL})"
        elif self.reported == since:
            return
        else:
            head = f"stall: no progress for {waiting:.0f} s; still waiting ({p.describe()})"
        self.reported = since
        sys.stderr.write("\n".join([head, *self._where_each(now, silence)]) + "\n")
        sys.stderr.flush()
        if ending:
            self.abort(EXIT_STALL)

    def _where_each(self, now: float, silence: dict[int, float]) -> list[str]:
        lines = []
        for r in range(self.size):
            name = where(r, self.hosts[r], self.virtual_ranks)
            if r not in self.seen:
                lines.append(f"  {name}: not heard from at all (has not arrived)")
                continue
            st, _ = self.seen[r]
            at = f"step {st['step']}, phase {st['phase']}" + (f", {st['detail']}" if st.get("detail") else "")
            if r != self.rank and silence[r] > self.policy.interval * 4 + 1:
                lines.append(f"  {name}: has not arrived: silent for {silence[r]:.0f} s, last seen at {at}")
            else:
                lines.append(f"  {name}: waiting {st['waiting']:.0f} s at {at}")
        return lines
