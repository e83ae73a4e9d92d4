"""Which local samples each rank uses at each step, known to every rank without communication.

Every rank knows every rank's partition size (one allgather at start), so each rank can compute
the global sample count of any step locally; that count is what makes the weighted gradient
average exact for unequal per-rank batches.
"""

from __future__ import annotations

import math

import numpy as np


class BatchPlan:
    """Per-epoch step schedule for one rank.

    ``proportional``: the global batch is split across ranks in proportion to their partition
    sizes, so all ranks finish an epoch after the same number of steps.
    ``equal``: every rank takes ``global_batch // world`` samples per step; the epoch lasts until
    the largest partition is used up and a rank that has run out joins with empty batches
    (the analogue of DDP's ``join()``).
    """

    def __init__(self, sizes: list[int], rank: int, global_batch: int, mode: str = "proportional"):
        if mode not in ("proportional", "equal"):
            raise ValueError(f"unknown batching mode {mode!r}")
        self.sizes = [int(s) for s in sizes]
        self.rank = rank
        self.mode = mode
        self.global_batch = int(global_batch)
        total = sum(self.sizes)
        if mode == "proportional":
            self.steps_per_epoch = max(1, math.ceil(total / self.global_batch))
        else:
            self.per_rank = max(1, self.global_batch // len(self.sizes))
            self.steps_per_epoch = max(1, math.ceil(max(self.sizes) / self.per_rank))

    def _chunk_size(self, n: int, step: int) -> int:
        if self.mode == "proportional":
            s = self.steps_per_epoch
            return n // s + (1 if step < n % s else 0)
        return max(0, min(self.per_rank, n - step * self.per_rank))

    def local_size(self, step: int) -> int:
        return self._chunk_size(self.sizes[self.rank], step)

    def global_count(self, step: int) -> int:
        """Samples summed over all ranks at this step of an epoch."""
        return sum(self._chunk_size(n, step) for n in self.sizes)

    def epoch_indices(self, epoch: int, seed: int) -> list[np.ndarray]:
        """This rank's sample indices for each step of ``epoch`` (a fresh shuffle per epoch)."""
        n = self.sizes[self.rank]
        rng = np.random.default_rng([seed, self.rank, epoch])
        order = rng.permutation(n)
        out, start = [], 0
        for step in range(self.steps_per_epoch):
            size = self._chunk_size(n, step)
            out.append(order[start : start + size])
            start += size
        return out
