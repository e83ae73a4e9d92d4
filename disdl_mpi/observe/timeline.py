"""Chrome trace-event timeline of a run: one track per rank, phases as complete events.

The file is the JSON Object Format of the Trace Event Format (``{"traceEvents": [...]}``),
loadable by chrome://tracing and https://ui.perfetto.dev. Each rank is a process (pid = rank,
named "rank R"); thread 0 holds schemes > steps > phases (properly nested "X" events), thread 1
the per-bucket gradient allreduces, which overlap the backward pass and so need their own row.

Clock alignment: every rank takes its time origin right after a Barrier, so ranks agree to
within about one barrier latency (microseconds on one node); no global clock is assumed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

from mpi4py import MPI

from disdl_mpi.comm.allreducer import BucketEvent
from disdl_mpi.files import write_json

PHASE_TID = 0
BUCKET_TID = 1


class TraceRecorder:
    """Collects this rank's events; ``write`` gathers them on rank 0 (collective)."""

    def __init__(self, comm: MPI.Comm, *, max_events: int = 500_000) -> None:
        self.rank = comm.Get_rank()
        comm.Barrier()
        self.origin = time.perf_counter()
        self.events: list[dict[str, Any]] = []
        self.max_events = max_events
        self.dropped = 0
        self.args: dict[str, Any] = {}  # attached to every event (e.g. the scheme name)

    def _us(self, t: float) -> float:
        return round((t - self.origin) * 1e6, 3)

    def complete(
        self,
        name: str,
        start: float,
        dur: float,
        *,
        cat: str = "phase",
        tid: int = PHASE_TID,
        args: Optional[dict[str, Any]] = None,
    ) -> None:
        """One "X" event; ``start`` is a perf_counter value, ``dur`` seconds."""
        if len(self.events) >= self.max_events:
            self.dropped += 1  # bounded memory on long runs; the count is written out
            return
        ev = {
            "name": name,
            "cat": cat,
            "ph": "X",
            "ts": self._us(start),
            "dur": round(max(0.0, dur) * 1e6, 3),
            "pid": self.rank,
            "tid": tid,
        }
        merged = {**self.args, **(args or {})}
        if merged:
            ev["args"] = merged
        self.events.append(ev)

    def buckets(self, events: Sequence[BucketEvent], origin: float) -> None:
        """The allreducer's per-bucket communication of the last step, on their own row;
        ``origin`` is the perf_counter the events' times count from."""
        for ev in events:
            self.complete(
                f"allreduce bucket {ev.bucket}",
                origin + ev.t_start,
                ev.t_end - ev.t_start,
                cat="comm",
                tid=BUCKET_TID,
                args={"index": ev.bucket, "bytes": ev.bytes},
            )

    def write(self, comm: MPI.Comm, path: str | Path, *, metadata: Optional[dict] = None) -> None:
        """Collective: gather every rank's events to rank 0, which writes the file atomically."""
        gathered = comm.gather((self.events, self.dropped), root=0)
        if comm.Get_rank() != 0:
            return
        events: list[dict[str, Any]] = []
        dropped = 0
        for rank, (evs, d) in enumerate(gathered):
            dropped += d
            events.append(
                {"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}}
            )
            events.append(
                {"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}}
            )
            events.append(
                {"name": "thread_name", "ph": "M", "pid": rank, "tid": PHASE_TID, "args": {"name": "phases"}}
            )
            if any(e.get("tid") == BUCKET_TID for e in evs):
                events.append(
                    {
                        "name": "thread_name",
                        "ph": "M",
                        "pid": rank,
                        "tid": BUCKET_TID,
                        "args": {"name": "allreduce buckets"},
                    }
                )
            # Outer events first at equal timestamps, so viewers nest them correctly.
            events.extend(sorted(evs, key=lambda e: (e["ts"], -e["dur"])))
        other = dict(metadata or {})
        other["dropped_events"] = dropped
        write_json(path, {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other})
