"""Input standardization from allreduced sums: no rank needs anyone else's samples.

The inputs stay resident in their stored dtype (uint8 stays uint8) and are standardized batch
by batch where they are indexed, so a rank's memory is its partition plus one batch, not four
(float32) or eight (float64) copies of it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from mpi4py import MPI

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


def channel_sums(x: np.ndarray) -> np.ndarray:
    """[count, per-channel sums, per-channel sums of squares] of ``x`` in float64, read in
    bounded row blocks (float64 accumulators, never a float64 copy of the partition)."""
    axes = (0,) + tuple(range(2, x.ndim))
    channels = x.shape[1] if x.ndim > 1 else 1
    per_value = int(np.prod([x.shape[a] for a in axes[1:]], dtype=np.int64))
    row_bytes = max(1, per_value * channels * 8)
    step = max(1, _STATS_ROWS_BYTES // row_bytes)
    s1 = np.zeros(channels, dtype=np.float64)
    s2 = np.zeros(channels, dtype=np.float64)
    for lo in range(0, x.shape[0], step):
        block = torch.from_numpy(np.ascontiguousarray(x[lo:lo + step])).to(torch.float64)
        s1 += block.sum(dim=axes).numpy()
        s2 += (block * block).sum(dim=axes).numpy()
    return np.concatenate([[x.shape[0] * per_value], s1, s2])


def standardize(x_train: Any, others: list[np.ndarray], comm: MPI.Comm,
                device: torch.device, residency: str = "device",
                stream_path: Optional[Path] = None) -> tuple[Any, list[StandardizedInputs]]:
    """Per-channel (images) or per-feature (flat) standardization of the training split and,
    with the same statistics, of ``others`` (the test splits).

    Only counts, sums and sums of squares travel (one Allreduce); the statistics are those of
    the union of all ranks' training partitions. The test arrays move to ``device`` as stored;
    the training inputs stay where ``residency`` says: on ``device``, in host memory
    (``host``), or in the file (``stream``: ``x_train`` is then
    None, and ``stream_path`` the file, read here in bounded blocks for the statistics).
    """
    if residency == "stream":
        import h5py
        with h5py.File(stream_path, "r", locking=False) as f:
            stats, ndim = channel_sums(f["x"]), f["x"].ndim
    else:
        stats, ndim = channel_sums(x_train), x_train.ndim
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
