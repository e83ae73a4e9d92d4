"""Per-step phase timers: where the time of a training step goes.

Phases of one step, in the order they run (the *disjoint* ones add up to the step wall time):

- ``data``            index this rank's batch (host perf_counter)
- ``forward``         forward pass + loss (CUDA events on a GPU, perf_counter on the CPU)
- ``backward``        backward pass; with overlap it also launches bucket allreduces
- ``imbalance_wait``  time this rank waits for the slowest rank before the gradient sync
                      (measured only with timing detail, see below)
- ``allreduce``       the exposed gradient sync: the wall of ``finish_step()``
- ``guard``           the per-step agreement collective (NaN / signal check, reliability)
- ``optimizer``       zero_grad + optimizer.step
- ``step``            the measured wall of the whole step (begin_step .. end_step)
- ``other``           derived: step - sum(disjoint phases) (loop overhead, hooks)

Not disjoint: ``allreduce_total`` (the allreducer's total time of all bucket allreduces,
partly hidden under backward), ``norm_comm`` (syncbn/bn-recal collectives, which run inside
forward/backward), ``eval`` (between epochs, outside steps). Derived: ``compute`` =
forward + backward + optimizer - norm_comm, ``comm`` = allreduce + guard + norm_comm.

Load-imbalance wait. With timing detail on, every step runs a timed ``Barrier`` on a
dedicated communicator right before the gradient sync: a rank that finished its backward
early waits there for the slowest one, so that wait is separated from the allreduce itself
(otherwise it hides inside the exposed allreduce time). The probe costs one barrier latency per
step (about 4 us at 2 ranks here, ~0.1-0.2 ms at 8 oversubscribed ranks); the fastest
(least waiting) rank's wait is an upper bound on that cost and is reported as
``imbalance_wait.min``. Without detail the wait is *derived* from the cross-rank spread of the
compute phases (max - own, averaged over ranks) and reported as ``imbalance_wait_derived``.
Detail is on with ``--timeline`` or ``DISDL_TIMING_DETAIL=1``.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional

import numpy as np
import torch
from mpi4py import MPI

from disdl_mpi.observe.profiler import named_range

# The one list of phases that the run, the report, the plots and the sweeps all use.
# The phases that partition a step's wall time, in the order a step runs them.
DISJOINT = ("data", "forward", "backward", "imbalance_wait", "allreduce", "guard", "optimizer")
# Every measured phase: the disjoint ones, then the overlapping and whole-step ones.
PHASES = DISJOINT + ("allreduce_total", "norm_comm", "eval", "step")
# What a per-step table reports (rank-mean seconds of the whole run); "other", "compute" and
# "comm" are derived in PhaseTimer.totals().
REPORTED = DISJOINT + ("other", "step", "allreduce_total", "norm_comm", "compute", "comm")
# The stacked per-step breakdown: forward/backward drawn without the normalization
# collectives that run inside them (norm_comm gets its own segment).
BREAKDOWN = (
    "data",
    "forward",
    "backward",
    "optimizer",
    "norm_comm",
    "imbalance_wait",
    "allreduce",
    "guard",
    "other",
)
# Phases whose work runs on the GPU stream: timed with CUDA events, not host clocks.
GPU_PHASES = frozenset({"forward", "backward", "optimizer"})

DETAIL_ENV = "DISDL_TIMING_DETAIL"


def detail_requested(timeline: Optional[str] = None) -> bool:
    """Timing detail (the imbalance probe) is on with a timeline or DISDL_TIMING_DETAIL=1."""
    flag = os.environ.get(DETAIL_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(timeline)


class PhaseTimer:
    """Accumulates seconds per phase on one rank, step by step.

    CPU: host ``perf_counter`` around each phase. CUDA: the GPU phases record a pair of CUDA
    events (no synchronization inside the step, so kernels keep pipelining); host phases that
    block in MPI synchronize the device first, because the gradients must be complete before
    MPI reads them anyway; ``end_step`` synchronizes once and resolves the event pairs.

    With ``trace`` (a :class:`disdl_mpi.observe.timeline.TraceRecorder`) every phase also becomes a
    timeline event.
    """

    def __init__(
        self, device: torch.device, *, wait_comm: Any = None, trace: Any = None, on_phase: Any = None
    ) -> None:
        self.device = device
        self.on_phase = on_phase  # (step, phase) at every phase start (the stall watchdog)
        self.cuda = device.type == "cuda"
        self.wait_comm = wait_comm  # a dedicated communicator for the imbalance probe, or None
        self.trace = trace
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._step_start: Optional[float] = None
        self._step_index = 0
        # CUDA: (name, start_event, end_event) of this step, resolved in end_step
        self._pending: list[tuple[str, Any, Any]] = []
        self._ref_event: Any = None
        self.ranges = False  # --profile-steps: phases become named profiler ranges

    @property
    def detail(self) -> bool:
        return self.wait_comm is not None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def begin_step(self, step: int) -> None:
        self._sync()
        self._step_index = step
        self._step_start = time.perf_counter()
        if self.cuda:
            # Recorded right after a synchronize: GPU event offsets from it equal host time.
            self._ref_event = torch.cuda.Event(enable_timing=True)
            self._ref_event.record()

    def end_step(self) -> None:
        if self._step_start is None:
            return
        self._sync()
        end = time.perf_counter()
        for name, ev0, ev1 in self._pending:
            dur = ev0.elapsed_time(ev1) / 1e3
            self.seconds[name] += dur
            if self.trace is not None:
                offset = self._ref_event.elapsed_time(ev0) / 1e3
                self.trace.complete(name, self._step_start + offset, dur, cat="gpu")
        self._pending.clear()
        self.seconds["step"] += end - self._step_start
        self.steps += 1
        if self.trace is not None:
            self.trace.complete(
                f"step {self._step_index}", self._step_start, end - self._step_start, cat="step"
            )
        self._step_start = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time ``name``; while a profiler window is open (``ranges``) also name it there."""
        if self.on_phase is not None:
            self.on_phase(self._step_index, name)
        with named_range(name, self.cuda) if self.ranges else nullcontext():
            if self.cuda and name in GPU_PHASES:
                ev0 = torch.cuda.Event(enable_timing=True)
                ev1 = torch.cuda.Event(enable_timing=True)
                ev0.record()
                try:
                    yield
                finally:
                    ev1.record()
                    if self._step_start is None:  # outside a step: resolve at once
                        torch.cuda.synchronize(self.device)
                        self.seconds[name] += ev0.elapsed_time(ev1) / 1e3
                    else:
                        self._pending.append((name, ev0, ev1))
                return
            self._sync()
            start = time.perf_counter()
            try:
                yield
            finally:
                self._sync()
                dur = time.perf_counter() - start
                self.seconds[name] += dur
                if self.trace is not None:
                    self.trace.complete(name, start, dur, cat="cpu")

    def wait_for_peers(self) -> None:
        """The imbalance probe: a timed barrier right before the gradient sync (detail only)."""
        if self.wait_comm is None:
            return
        with self.phase("imbalance_wait"):
            self.wait_comm.Barrier()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def totals(self) -> dict[str, float]:
        """Phase seconds plus the derived compute/comm/other split used in every table."""
        # Every rank reports the same keys, so cross-rank reductions line up.
        s = {name: 0.0 for name in PHASES}
        s.update(self.seconds)
        norm_comm = s["norm_comm"]
        compute = s["forward"] + s["backward"] + s["optimizer"]
        # syncbn collectives run inside forward/backward: move them from compute to comm.
        s["compute"] = max(0.0, compute - norm_comm)
        s["comm"] = s["allreduce"] + s["guard"] + norm_comm
        s["other"] = max(0.0, s["step"] - sum(s[p] for p in DISJOINT))
        return s


def derive_imbalance(detail: dict[str, dict[str, float]]) -> float:
    """Mean per-rank wait for the slowest rank, estimated from compute totals alone.

    ``detail`` is the min/mean/max-per-phase table; a rank that computes for T_r waits about
    max_r T - T_r per run, so the mean wait is max - mean of (data + forward + backward). It
    is approximate: per-step imbalance that averages out over the run is not seen (too low),
    and summing per-phase maxima can combine different slowest ranks (too high).
    """
    keys = ("data", "forward", "backward")
    if not all(k in detail for k in keys):
        return 0.0
    hi = sum(detail[k]["max"] for k in keys)
    mean = sum(detail[k]["mean"] for k in keys)
    return max(0.0, hi - mean)


def timing_fields(detail: dict[str, dict[str, float]], *, measured_wait: bool, cuda: bool) -> dict[str, Any]:
    """Extra summary-record fields describing how the phases were measured."""
    return {
        "imbalance_method": "barrier-probe" if measured_wait else "derived",
        # the derived wait is always given, so runs with and without the probe compare
        "imbalance_wait_derived": derive_imbalance(detail),
        "timing_clock": "cuda-events+perf_counter" if cuda else "perf_counter",
    }


def phase_summary(comm: MPI.Comm, values: dict[str, float]) -> dict[str, dict[str, float]]:
    """Collective: min/mean/max of each phase across ranks (every rank holds the same keys)."""
    keys = sorted(values)
    local = np.array([values[k] for k in keys], dtype=np.float64)
    lo, hi, total = local.copy(), local.copy(), local.copy()
    comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
    comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
    comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    n = comm.Get_size()
    return {
        k: {"min": float(lo[i]), "mean": float(total[i] / n), "max": float(hi[i])} for i, k in enumerate(keys)
    }


def comm_share(compute_s: float, comm_s: float) -> float:
    """Communication's share of the step: comm / (compute + comm), 0 when both are 0."""
    total = compute_s + comm_s
    return comm_s / total if total > 0 else 0.0
