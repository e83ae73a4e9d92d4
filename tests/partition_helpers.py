"""Reading a partition back in the tests, and comparing samples as multisets (one copy)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from disdl_mpi.data.layout import ContentHash


def read_ranks(out: Path) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """Every rank file's (x, y, attributes), in the manifest's rank order."""
    manifest = json.loads((out / "partition.json").read_text())
    parts = []
    for e in manifest["ranks"]:
        with h5py.File(out / e["file"], "r") as f:
            parts.append((f["x"][...], f["y"][...], dict(f.attrs)))
    return parts


def read_all(out: Path) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """All ranks' training rows concatenated in rank order, and the test set."""
    parts = read_ranks(out)
    with h5py.File(out / "test.h5", "r") as f:
        test = (f["x"][...], f["y"][...])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test


def sorted_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Samples as sortable rows (label, values): equal outputs mean equal multisets."""
    rows = np.concatenate([y[:, None].astype(np.float64), x.reshape(len(x), -1).astype(np.float64)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def same_multiset(x: np.ndarray, y: np.ndarray, x_ref: np.ndarray, y_ref: np.ndarray) -> bool:
    """The same samples with the same labels, in any order, stored in the same dtype."""
    return (
        x.dtype == x_ref.dtype
        and x.shape[1:] == x_ref.shape[1:]
        and np.array_equal(sorted_rows(x, y), sorted_rows(x_ref, y_ref))
    )


def content_sha256(x: np.ndarray, y: np.ndarray) -> str:
    """The sha256 the manifest records for a rank's arrays (data.layout.ContentHash)."""
    h = ContentHash()
    h.add_x(x)
    return h.finish(y)
