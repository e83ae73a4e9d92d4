"""What a data source is: the ``Source`` interface, the in-memory ``ArraySource``, the checks of
images and labels, the stratified test split and the content hashes that name a source's data.

The sources themselves (embedded digits, file readers, synthetic data) build on this module;
``data_prep.sources.open_source`` picks one by name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.errors import DataPrepError

# The stratified test split of sources without their own test set uses this fixed seed, so
# every partition of a source (any partition spec, size or seed) is evaluated on the same test set.
TEST_SPLIT_SEED = 20210
DEFAULT_TEST_FRACTION = 0.2
CHUNK_BYTES = 32 << 20  # the images streamed per step of the writer


class Source:
    """What the partitioner needs to know about a dataset."""

    name: str
    num_classes: int
    sample_shape: tuple[int, ...]
    x_dtype: np.dtype
    sha256: str
    y_train: np.ndarray
    options: dict  # the source options that change the data (recorded in the manifest)

    @property
    def n_train(self) -> int:
        return int(len(self.y_train))

    def rows_per_chunk(self) -> int:
        per = int(np.prod(self.sample_shape, dtype=np.int64)) * self.x_dtype.itemsize
        return max(1, CHUNK_BYTES // max(1, per))

    def train_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, x[start:start+len])`` covering the training set in index order."""
        raise NotImplementedError

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class ArraySource(Source):
    """A source held in memory (digits, MNIST, CIFAR, NPZ: all a few hundred MB at most)."""

    def __init__(
        self,
        name: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray | None,
        y_test: np.ndarray | None,
        *,
        sha256: str,
        origin: str,
        num_classes: int | None = None,
        options: dict | None = None,
        test_fraction: float = DEFAULT_TEST_FRACTION,
    ):
        self.name = name
        self.sha256 = sha256
        self.options = dict(options or {})
        x_train = _as_images(x_train, origin, "x")
        y_train = _as_labels(y_train, len(x_train), origin, "y")
        if x_test is None and y_test is None:
            self.options["test_fraction"] = test_fraction
            train_idx, test_idx = stratified_split(y_train, test_fraction)
            x_test, y_test = x_train[test_idx], y_train[test_idx]
            x_train, y_train = x_train[train_idx], y_train[train_idx]
        elif x_test is None or y_test is None:
            raise DataPrepError(f"{origin}: has only one of x_test / y_test; give both or neither")
        else:
            x_test = _as_images(x_test, origin, "x_test")
            y_test = _as_labels(y_test, len(x_test), origin, "y_test")
            if x_test.shape[1:] != x_train.shape[1:]:
                raise DataPrepError(
                    f"{origin}: field 'x_test' has sample shape "
                    f"{x_test.shape[1:]}, but 'x' has {x_train.shape[1:]}"
                )
        top = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
        if num_classes is None:
            num_classes = top
        elif top > num_classes:
            raise DataPrepError(
                f"{origin}: labels go up to {top - 1}, outside "
                f"[0, {num_classes}) of --num-classes {num_classes}"
            )
        if len(x_train) == 0:
            raise DataPrepError(f"{origin}: the training set is empty")
        dtype = np.dtype(np.uint8) if x_train.dtype == np.uint8 else np.dtype(np.float32)
        self.x_train = x_train.astype(dtype, copy=False)
        self.x_test = x_test.astype(dtype, copy=False)
        self.y_train, self.y_test = y_train, y_test
        self.num_classes = int(num_classes)
        self.sample_shape = tuple(int(s) for s in x_train.shape[1:])
        self.x_dtype = dtype

    def train_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        step = self.rows_per_chunk()
        for start in range(0, self.n_train, step):
            yield start, self.x_train[start : start + step]

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x_test, self.y_test


def _as_images(x: np.ndarray, origin: str, field: str) -> np.ndarray:
    """Check image/feature arrays: (N,C,H,W) or (N,D); (N,H,W) gets one channel."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim not in (2, 4):
        raise DataPrepError(
            f"{origin}: field '{field}' has shape {x.shape}; expected images "
            f"(N,C,H,W) or (N,H,W), or flat features (N,D)"
        )
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise DataPrepError(f"{origin}: field '{field}' has dtype {x.dtype}; expected numbers")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataPrepError(f"{origin}: field '{field}' holds NaN or Inf values")
    return x


def _as_labels(y: np.ndarray, n: int, origin: str, field: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataPrepError(
            f"{origin}: field '{field}' has shape {y.shape}; expected ({n},), one label per sample"
        )
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise DataPrepError(
                f"{origin}: field '{field}' has dtype {y.dtype}; expected integer class labels"
            )
    y = y.astype(np.int64, copy=False)
    if len(y) and y.min() < 0:
        raise DataPrepError(f"{origin}: field '{field}' holds a negative label {y.min()}")
    return y


def stratified_split(y: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices; each class contributes ``round(fraction * count)``."""
    if not 0 < fraction < 1:
        raise DataPrepError(f"test fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(TEST_SPLIT_SEED)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = int(round(fraction * len(members)))
        test.append(rng.permutation(members)[:k])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    mask = np.ones(len(y), bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def sha256_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over the bytes of the given files (in the given order)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
