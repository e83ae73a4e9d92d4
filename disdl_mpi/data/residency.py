"""Where a rank's training inputs live: on the device, in host memory, or streamed from disk.

``--data-residency``:

- ``device``: the partition is resident where the model computes (the GPU, or the CPU);
- ``host``: resident in host memory, each batch copied to the device as it is used (on a CPU
  run the same as ``device``);
- ``stream``: only the batch in hand (and the next few) is in memory: batches are read from
  the rank's HDF5 file by a background thread that runs ahead of training;
- ``auto`` (default): ``device`` when the partition fits the memory budget, else ``stream``.

The batch order does not depend on the mode: it is the shuffle of (seed, rank, epoch) that
``batching.BatchPlan`` gives every mode, and a streamed batch is standardized with the same
float32 operations as a resident one, so the same run trains the same model, bit for bit, in
every mode. A streamed batch is read as one HDF5 selection of its rows in file order, then put
back in batch order; partitions are written with x contiguous (data_prep.writer), so a row is
read at a computed offset, without chunk lookups or reading the neighbours a chunk would bring.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

MODES = ("auto", "device", "host", "stream")
PREFETCH_BATCHES = 2   # batches read ahead of the one in training


def choose(mode: str, fits: bool) -> str:
    """The mode a run uses: ``auto`` resolves by whether the resident data fits the budget."""
    if mode not in MODES:
        raise ValueError(f"--data-residency must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "device" if fits else "stream"
    return mode


def standardized(rows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Stored rows -> float32 standardized on the statistics' device (one definition for every
    mode: the bitwise equality of the modes rests on it)."""
    if rows.device != mean.device:
        rows = rows.to(mean.device, non_blocking=True)
    return (rows.to(torch.float32) - mean) / std


class StreamedInputs:
    """A rank's training inputs read from its HDF5 file batch by batch (``stream`` mode).

    ``x[index]`` equals what ``StandardizedInputs`` returns for the same rows. ``schedule``
    hands over the epoch's batches so a background thread can read ``PREFETCH_BATCHES`` ahead;
    any other index (recalibration's slices, evaluation) is read when asked for.
    """

    def __init__(self, path: Path, mean: torch.Tensor, std: torch.Tensor,
                 depth: int = PREFETCH_BATCHES) -> None:
        self.path, self.mean, self.std, self.depth = Path(path), mean, std, max(0, depth)
        self._file = h5py.File(self.path, "r", locking=False)
        self._x = self._file["x"]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disdl-prefetch")
        self._plan: list[np.ndarray] = []
        self._next = 0                                  # next planned batch to submit
        self._ahead: dict[bytes, Future] = {}
        self.read_s = 0.0                               # seconds the trainer waited on reads
        self.prefetched = 0                             # batches that were read ahead

    def __len__(self) -> int:
        return int(self._x.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._x.shape)

    @property
    def nbytes(self) -> int:
        return 0  # nothing of the partition is resident

    def _read(self, index: Any) -> torch.Tensor:
        """The stored rows of ``index`` (a slice, or integer positions in any order)."""
        if isinstance(index, slice):
            return torch.from_numpy(self._x[index])
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, np.int64)
        if idx.size == 0:
            return torch.from_numpy(np.empty((0,) + self._x.shape[1:], self._x.dtype))
        # HDF5 wants increasing, unique positions: read those, then restore the batch order.
        uniq, inverse = np.unique(idx, return_inverse=True)
        return torch.from_numpy(self._x[uniq][inverse.reshape(idx.shape)])

    def schedule(self, batches: list[np.ndarray]) -> None:
        """The batches training will ask for next, in order; reading starts at once."""
        self._ahead.clear()
        self._plan, self._next = list(batches), 0
        self._fill()

    def _fill(self) -> None:
        while self._next < len(self._plan) and len(self._ahead) < self.depth:
            idx = self._plan[self._next]
            self._ahead[np.asarray(idx, np.int64).tobytes()] = self._pool.submit(self._read, idx)
            self._next += 1

    def __getitem__(self, index: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        pending = None
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()  # the trainer hands a (device) tensor of positions
        if not isinstance(index, slice):
            pending = self._ahead.pop(np.asarray(index, np.int64).tobytes(), None)
        self.prefetched += pending is not None
        rows = pending.result() if pending is not None else self._read(index)
        self.read_s += time.perf_counter() - t0
        self._fill()
        return standardized(rows, self.mean, self.std)

    def report(self) -> str:
        """How well the reads were hidden: batches read ahead, and the time training waited."""
        return (f"{self.prefetched} batches read ahead by the prefetcher; training waited "
                f"{self.read_s:.2f} s for batches in all")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._file.close()
