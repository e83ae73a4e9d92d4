"""The on-disk partition format shared by the writer (data_prep) and the reader (partition_io).

See docs/CONTRACTS.md, "Partition on disk".
"""
from __future__ import annotations

import hashlib

import numpy as np

FORMAT = "disdl-partition/1"
MANIFEST = "partition.json"
TEST_FILE = "test.h5"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.h5"


def domain_test_file(rank: int) -> str:
    """Rank r's own-domain test split (feature-shift partitions only)."""
    return f"test_rank_{rank:05d}.h5"


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of an ``n``-row test set that ``rank`` scores: contiguous, near-equal."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ContentHash:
    """sha256 over a partition's content: the x bytes (C order) then the y bytes (int64 LE).

    It hashes the arrays, not the HDF5 file bytes, so it does not depend on HDF5 layout and can
    be computed while the file is written in pieces (x rows in order, then y).
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add_x(self, x: np.ndarray) -> None:
        # An empty rank (--min-per-rank 0) adds no bytes; memoryview refuses to cast (0, ...).
        if x.size:
            self._h.update(memoryview(np.ascontiguousarray(x)).cast("B"))

    def finish(self, y: np.ndarray) -> str:
        self._h.update(memoryview(np.ascontiguousarray(y, dtype="<i8")).cast("B"))
        return self._h.hexdigest()


def content_sha256(x: np.ndarray, y: np.ndarray) -> str:
    h = ContentHash()
    h.add_x(x)
    return h.finish(y)
