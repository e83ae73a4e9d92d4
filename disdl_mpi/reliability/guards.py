"""Per-step safety decisions agreed by every rank: non-finite numbers and preemption signals.

One tiny ``Allreduce(MAX)`` of three int64 per step carries both decisions, so every rank
stops, skips or checkpoints at the same step whatever rank saw the problem:

- slot 0: non-finite values: ``(world - rank) * 4 + kind`` of the reporting rank (kind 1 =
  loss, 2 = gradient, 3 = both), so the maximum names the LOWEST such rank and its kind;
- slot 1: ``world - rank`` of the lowest rank that received a signal;
- slot 2: that signal's number (the largest, when ranks got different ones).

Signals (SIGTERM from SLURM at preemption or ``--time`` with ``--signal``, SIGUSR1) only set a
flag in the handler; the training loop acts on it at the next step boundary, because MPI must
never be entered from a signal handler and all ranks must checkpoint the same step.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from mpi4py import MPI

from disdl_mpi.errors import UserError

WATCHED = (signal.SIGTERM, signal.SIGUSR1)


class NumericalError(UserError):
    """A NaN/Inf in the loss or gradients with ``--on-nan stop``; raised on every rank."""

    def __init__(self, message: str):
        super().__init__(message, collective=True, exit_code=3)


class Preempted(UserError):
    """A watched signal arrived; every rank raises it after the checkpoint is committed."""

    def __init__(self, message: str, signum: int):
        # 128 + signal number: what shells and schedulers report for death by that signal.
        super().__init__(message, collective=True, exit_code=128 + int(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalWatch:
    """Records the first watched signal; the handler does nothing else (async-signal-safe)."""

    def __init__(self, signals: tuple[int, ...] = WATCHED) -> None:
        self.signals = signals
        self.received: Optional[int] = None
        self.at: Optional[float] = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if self.received is None:
            self.received, self.at = signum, time.monotonic()

    def install(self) -> "SignalWatch":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


@dataclass(frozen=True)
class StepDecision:
    """What every rank does after this step's gradient sync (identical on all ranks)."""

    nonfinite_rank: Optional[int] = None  # lowest rank with a NaN/Inf
    nonfinite_kind: str = ""  # "loss", "gradient" or "loss and gradient"
    signal_rank: Optional[int] = None  # lowest rank that received a signal
    signum: int = 0

    @property
    def nonfinite(self) -> bool:
        return self.nonfinite_rank is not None

    @property
    def preempt(self) -> bool:
        return self.signal_rank is not None


_KINDS = {1: "loss", 2: "gradient", 3: "loss and gradient"}


class GradFiniteProbe:
    """Tensor hooks that note, without a device sync, whether any LOCAL gradient is non-finite.

    A tensor hook sees this rank's gradient before it is accumulated into ``.grad`` and so
    before the allreducer's post-accumulate hook reduces it in place: the check names the
    rank where the NaN/Inf was born, not every rank it spreads to through the average.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._flags: list[torch.Tensor] = []
        self._handles = [p.register_hook(self._hook) for p in model.parameters() if p.requires_grad]

    def _hook(self, grad: torch.Tensor) -> None:
        self._flags.append(torch.isfinite(grad).all())
        return None

    def take(self) -> bool:
        """True when some gradient of this step was non-finite; resets for the next step."""
        if not self._flags:
            return False
        ok = bool(torch.stack(self._flags).all())  # the one sync of the step
        self._flags.clear()
        return not ok

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class StepGuard:
    """The per-step agreement (see the module docstring); ``seconds`` is its total cost."""

    def __init__(self, comm: MPI.Comm, watch: Optional[SignalWatch]) -> None:
        self.comm = comm
        self.watch = watch
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        self._buf = np.zeros(3, dtype=np.int64)
        self.seconds = 0.0

    def decide(self, loss_bad: bool, grad_bad: bool) -> StepDecision:
        t0 = time.perf_counter()
        kind = (1 if loss_bad else 0) | (2 if grad_bad else 0)
        buf = self._buf
        buf[0] = (self.world - self.rank) * 4 + kind if kind else 0
        got = self.watch.received if self.watch is not None else None
        buf[1] = self.world - self.rank if got is not None else 0
        buf[2] = int(got) if got is not None else 0
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        self.seconds += time.perf_counter() - t0
        d = StepDecision()
        if buf[0]:
            d = StepDecision(
                nonfinite_rank=self.world - int(buf[0]) // 4, nonfinite_kind=_KINDS[int(buf[0]) % 4]
            )
        if buf[1]:
            d = StepDecision(
                d.nonfinite_rank, d.nonfinite_kind, signal_rank=self.world - int(buf[1]), signum=int(buf[2])
            )
        return d
