"""The on-disk partition format shared by the writer (data_prep) and the reader (partition_io):
file names, the folder-naming rule, content hashes, and the test-set shard a rank scores.

See docs/CONTRACTS.md, "Partition on disk". A folder's name carries every setting that shapes
the partition (dataset, partition spec, ranks, seed, and the source options of generated data),
so two requests that differ never share a folder.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "disdl-partition/1"
# The names a manifest's "dataset" field takes (data_prep.sources opens each), with how each
# comes in; --dataset's choices and help are derived from this.
DATASETS = {
    "digits": "embedded",
    "mnist": "IDX files",
    "fashion-mnist": "IDX files",
    "cifar10": "python batches, folder or .tar.gz",
    "cifar100": "python batches, folder or .tar.gz",
    "npz": "",
    "synthetic": "",
}
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




def spec_tag(spec: str) -> str:
    """A file-name-safe spelling of a partition spec: ``dirichlet:0.1`` -> ``dirichlet-0.1``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-")


def source_options(source_opts: dict[str, Any]) -> dict[str, Any]:
    """The source options that shape a partition: the given ones, sorted, without the unset."""
    return {k: v for k, v in sorted(source_opts.items()) if v is not None}


def partition_dir(root: str | Path, dataset: str, spec: str, ranks: int, seed: int,
                  **source_opts: Any) -> Path:
    """``ROOT/<dataset>-<spec>-n<ranks>-s<seed>[-o<hash of source options>]``."""
    name = f"{dataset}-{spec_tag(spec)}-n{int(ranks)}-s{int(seed)}"
    opts = source_options(source_opts)
    if opts:
        digest = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode())
        name += f"-o{digest.hexdigest()[:8]}"
    return Path(root) / name
