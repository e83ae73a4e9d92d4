"""What one rank loaded: its training rows (and where they live), its test rows, the partition's
facts. Made by :func:`disdl_mpi.data.partition_io.load_partition`; the training rows are what
:func:`disdl_mpi.data.standardize.standardize` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass
class TrainRows:
    """This rank's training partition as loaded: resident rows, or the file to stream them from."""

    x: Optional[np.ndarray]  # None when streamed (residency 'stream')
    y: Optional[np.ndarray] = None
    path: Optional[Path] = None  # this rank's partition file
    residency: str = "device"  # data.residency mode in use
    sums: Optional[np.ndarray] = None  # ChannelSums of x, from the checking pass
    budget_refusal: Optional[str] = None  # why resident data would not fit (auto streamed)


@dataclass
class TestRows:
    """Rows ``rows`` of the global test set of ``total`` rows (all of it, or this rank's shard)."""

    x: np.ndarray
    y: np.ndarray
    rows: tuple[int, int] = (0, 0)
    total: int = 0


@dataclass
class LocalData:
    """This rank's training partition, its test rows and the partition's facts."""

    train: TrainRows
    test: TestRows
    num_classes: int
    sample_shape: tuple[int, ...]
    sizes: list[int]  # every rank's training size, rank order
    manifest: dict
    manifest_sha256: str
    domain_test: Optional[TestRows] = None  # feature shift: this rank's own-domain split
