"""Input standardization from allreduced sums: no rank needs anyone else's samples.

The inputs stay resident in their stored dtype (uint8 stays uint8) and are standardized batch
by batch where they are indexed, so a rank's memory is its partition plus one batch, not four
(float32) or eight (float64) copies of it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from disdl_mpi.data.local_data import TrainRows
from disdl_mpi.data.residency import StreamedInputs, standardized

# Rows per pass of the statistics: bounds the float64 working set (about 64 MiB at 224x224x3).
_STATS_ROWS_BYTES = 64 << 20


class StandardizedInputs:
    """A rank's inputs in their stored dtype; indexing returns standardized float32 rows.

    ``x[index]`` equals ``((x_stored.float() - mean) / std)[index]`` element for element (the
    same float32 operations), so training is bitwise what it was with a standardized copy.
    """

    def __init__(self, stored: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.stored, self.mean, self.std = stored, mean, std

    def __getitem__(self, index: Any) -> torch.Tensor:
        return standardized(self.stored[index], self.mean, self.std)

    def __len__(self) -> int:
        return int(self.stored.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.stored.shape

    def rows(self, lo: int, hi: int) -> "StandardizedInputs":
        """Rows [lo, hi) as inputs of their own (a view: no copy of the stored data)."""
        return StandardizedInputs(self.stored[lo:hi], self.mean, self.std)

    @property
    def nbytes(self) -> int:
        return self.stored.element_size() * self.stored.numel()


class ChannelSums:
    """Running [count, per-channel sums, per-channel sums of squares] in float64.

    Fed the blocks of a read pass (``add``). uint8 images are counted in a 256-bin histogram
    per channel, and the sums come from the histogram: exact integers, whatever the blocks,
    and about 7x faster than float64 arithmetic (the start-up's costliest step otherwise).
    Other inputs are summed in float64 sub-blocks of at most ``_STATS_ROWS_BYTES``:
    accumulators, never a float64 copy of the partition. Every residency mode takes its
    statistics from the same pass (partition_io's check of the file), so the modes agree bit
    for bit either way.
    """

    def __init__(self, sample_shape: tuple[int, ...]) -> None:
        self.channels = sample_shape[0] if sample_shape else 1
        self.per_value = int(np.prod(sample_shape[1:], dtype=np.int64))
        self.step = max(1, _STATS_ROWS_BYTES // max(1, self.per_value * self.channels * 8))
        self.rows = 0
        self.s1 = np.zeros(self.channels, dtype=np.float64)
        self.s2 = np.zeros(self.channels, dtype=np.float64)
        self.hist = np.zeros((self.channels, 256), dtype=np.int64)

    def add(self, block: np.ndarray) -> None:
        self.rows += block.shape[0]
        if block.dtype == np.uint8 and self.per_value >= 256:  # images: a histogram each
            t = torch.from_numpy(np.ascontiguousarray(block)).reshape(
                block.shape[0], self.channels, self.per_value)
            for c in range(self.channels):
                self.hist[c] += torch.bincount(t[:, c].reshape(-1), minlength=256).numpy()
            return
        axes = (0,) + tuple(range(2, block.ndim))
        for lo in range(0, block.shape[0], self.step):
            part = torch.from_numpy(np.ascontiguousarray(block[lo:lo + self.step]))
            part = part.to(torch.float64)
            self.s1 += part.sum(dim=axes).numpy()
            self.s2 += (part * part).sum(dim=axes).numpy()

    def values(self) -> np.ndarray:
        v = np.arange(256, dtype=np.int64)
        s1 = self.s1 + (self.hist @ v).astype(np.float64)
        s2 = self.s2 + (self.hist @ (v * v)).astype(np.float64)
        return np.concatenate([[self.rows * self.per_value], s1, s2])


def channel_sums(x: Any) -> np.ndarray:
    """[count, sums, sums of squares] of ``x`` (an array or HDF5 dataset), read in one block
    per ``ChannelSums`` sub-block."""
    sums = ChannelSums(tuple(x.shape[1:]))
    for lo in range(0, x.shape[0], sums.step):
        sums.add(x[lo:lo + sums.step])
    return sums.values()


def standardize(train: TrainRows, others: list[np.ndarray], comm: MPI.Comm,
                device: torch.device) -> tuple[Any, list[StandardizedInputs]]:
    """Per-channel (images) or per-feature (flat) standardization of the training rows and,
    with the same statistics, of ``others`` (the test splits).

    Only counts, sums and sums of squares travel (one Allreduce); the statistics are those of
    the union of all ranks' training partitions. The test arrays move to ``device`` as stored;
    the training inputs stay where ``train.residency`` says: on ``device``, in host memory
    (``host``), or in the file (``stream``: ``train.x`` is then None, and ``train.path`` the
    file). ``train.sums`` are this rank's ``ChannelSums`` values when the load already made
    them (partition_io does, in its one pass over the file); else they are computed here.
    """
    residency, stream_path, sums, x_train = train.residency, train.path, train.sums, train.x
    if residency == "stream":
        import h5py
        with h5py.File(stream_path, "r", locking=False) as f:
            ndim = f["x"].ndim
            stats = channel_sums(f["x"]) if sums is None else sums.copy()
    else:
        ndim = x_train.ndim
        stats = channel_sums(x_train) if sums is None else sums.copy()
    comm.Allreduce(MPI.IN_PLACE, stats, op=MPI.SUM)
    c = (stats.size - 1) // 2
    count = max(1.0, stats[0])
    mean = stats[1:1 + c] / count
    var = np.maximum(stats[1 + c:] / count - mean ** 2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0  # constant features (e.g. blank digit borders) stay as they are
    shape = (1, c) + (1,) * (ndim - 2)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(shape)

    def resident(x: np.ndarray, where: torch.device = device) -> StandardizedInputs:
        return StandardizedInputs(torch.from_numpy(np.ascontiguousarray(x)).to(where), m, s)

    if residency == "stream":
        train: Any = StreamedInputs(stream_path, m, s)
    else:
        train = resident(x_train, torch.device("cpu") if residency == "host" else device)
    return train, [resident(x) for x in others]
