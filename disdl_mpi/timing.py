"""Per-step phase timers: where the time of a training step goes."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

# Phases in the order a step runs them; "compute" and "comm" are derived totals.
PHASES = ("data", "forward", "backward", "allreduce", "allreduce_total", "norm_comm",
          "optimizer", "eval")


class PhaseTimer:
    """Accumulates wall seconds per phase on one rank.

    On CUDA the device is synchronized at phase edges so that kernel time lands in the phase
    that launched it rather than in the next blocking call.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def totals(self) -> dict[str, float]:
        """Phase seconds plus the derived compute/comm split used in every table."""
        # Every rank reports the same keys, so cross-rank reductions line up.
        s = {name: 0.0 for name in PHASES}
        s.update(self.seconds)
        norm_comm = s.get("norm_comm", 0.0)
        compute = s.get("forward", 0.0) + s.get("backward", 0.0) + s.get("optimizer", 0.0)
        # syncbn collectives run inside forward/backward: move them from compute to comm.
        s["compute"] = max(0.0, compute - norm_comm)
        s["comm"] = s.get("allreduce", 0.0) + norm_comm
        return s
