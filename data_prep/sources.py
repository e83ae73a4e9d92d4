"""Training/test sources for partitioning: one interface over embedded, file and synthetic data.

A source exposes the full label vector (small even at millions of samples) and streams the
images in index order, so the partitioner never needs the whole dataset in memory at once.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import DataPrepError

# The stratified test split of sources without their own test set uses this fixed seed, so
# every partition of a source (any scheme, size or seed) is evaluated on the same test set.
TEST_SPLIT_SEED = 20210
DEFAULT_TEST_FRACTION = 0.2
CHUNK_BYTES = 32 << 20  # the images streamed per step of the writer

SOURCES = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "synthetic")


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

    def __init__(self, name: str, x_train: np.ndarray, y_train: np.ndarray,
                 x_test: np.ndarray | None, y_test: np.ndarray | None, *, sha256: str,
                 origin: str, num_classes: int | None = None, options: dict | None = None,
                 test_fraction: float = DEFAULT_TEST_FRACTION):
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
                raise DataPrepError(f"{origin}: field 'x_test' has sample shape "
                                    f"{x_test.shape[1:]}, but 'x' has {x_train.shape[1:]}")
        top = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
        if num_classes is None:
            num_classes = top
        elif top > num_classes:
            raise DataPrepError(f"{origin}: labels go up to {top - 1}, outside "
                                f"[0, {num_classes}) of --num-classes {num_classes}")
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
            yield start, self.x_train[start:start + step]

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x_test, self.y_test


def _as_images(x: np.ndarray, origin: str, field: str) -> np.ndarray:
    """Check image/feature arrays: (N,C,H,W) or (N,D); (N,H,W) gets one channel."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim not in (2, 4):
        raise DataPrepError(f"{origin}: field '{field}' has shape {x.shape}; expected images "
                            f"(N,C,H,W) or (N,H,W), or flat features (N,D)")
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
            or x.dtype == np.bool_):
        raise DataPrepError(f"{origin}: field '{field}' has dtype {x.dtype}; expected numbers")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataPrepError(f"{origin}: field '{field}' holds NaN or Inf values")
    return x


def _as_labels(y: np.ndarray, n: int, origin: str, field: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataPrepError(f"{origin}: field '{field}' has shape {y.shape}; expected ({n},), "
                            f"one label per sample")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and \
                (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise DataPrepError(f"{origin}: field '{field}' has dtype {y.dtype}; expected "
                                f"integer class labels")
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


def load_digits_source(test_fraction: float = DEFAULT_TEST_FRACTION) -> ArraySource:
    """The UCI handwritten digits that ship inside scikit-learn: 8x8 images, values 0..16."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = d.images.astype(np.uint8).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    return ArraySource("digits", x, y, None, None, sha256=sha256_arrays(x, y),
                       origin="sklearn digits", num_classes=10, test_fraction=test_fraction)


# Datasets that a system package installs in a known folder: (folder, package).
INSTALLED = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),
                               "dataset-fashion-mnist")}
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def installed_dir(name: str) -> Path:
    """The package's folder for ``name``, or a DataPrepError that says how to get it."""
    folder, package = INSTALLED[name]
    if folder.is_dir():
        return folder
    raise DataPrepError(
        f"{name}: not found in {folder}. Install it with 'apt-get install {package}' (Debian/"
        f"Ubuntu; 'make fashion-mnist' does it), or pass --source-dir with a folder holding the "
        f"four IDX files ({', '.join(IDX_FILES)}; raw or .gz)")


def train_subset(src: "ArraySource", n: int) -> "ArraySource":
    """A fixed, class-stratified subset of ``n`` training samples (the same for every seed,
    so studies that vary the seed vary only the partition and the training); the test set
    stays whole."""
    total = src.n_train
    if not 0 < n <= total:
        raise DataPrepError(f"--train-subset must be in 1..{total}, got {n}")
    rng = np.random.default_rng(0xF1)
    counts = np.bincount(src.y_train, minlength=src.num_classes)
    take = np.floor(counts * n / total).astype(np.int64)
    take[np.argsort(-(counts * n / total - take))[:n - int(take.sum())]] += 1
    keep = np.concatenate([rng.permutation(np.flatnonzero(src.y_train == c))[:k]
                           for c, k in enumerate(take)])
    keep.sort()
    src.x_train, src.y_train = src.x_train[keep], src.y_train[keep]
    src.options["train_subset"] = int(n)
    return src


def open_source(dataset: str, source_dir: str | Path | None = None, *, seed: int = 0,
                **opts) -> Source:
    """Open a source by name; ``opts`` are source options (``python -m data_prep.partition -h``)."""
    name = (dataset or "").lower()
    opts = {k: v for k, v in opts.items() if v is not None}
    test_fraction = float(opts.pop("test_fraction", DEFAULT_TEST_FRACTION))
    subset = opts.pop("train_subset", None)
    if subset is not None:
        if name == "synthetic":
            raise DataPrepError("--train-subset: synthetic data has --num-samples instead")
        return train_subset(open_source(dataset, source_dir, seed=seed,
                                        test_fraction=test_fraction, **opts), int(subset))
    if name == "synthetic":
        from .synthetic import SyntheticSource
        return SyntheticSource(seed=seed, **opts)
    allowed = {"npz": {"num_classes"}}.get(name, set())
    extra = sorted(set(opts) - allowed)
    if extra:
        raise DataPrepError(f"source {dataset!r} takes no option(s) {', '.join(extra)}")
    if name == "digits":
        return load_digits_source(test_fraction)
    if name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "npz"):
        from . import readers
        if source_dir is None and name in INSTALLED:
            source_dir = installed_dir(name)
        if source_dir is None:
            raise DataPrepError(f"source {dataset!r} needs --source-dir (the folder with its "
                                f"files; they cannot be downloaded here)")
        return readers.open_file_source(name, Path(source_dir), test_fraction=test_fraction,
                                        **opts)
    raise DataPrepError(f"unknown dataset {dataset!r}; choose one of {', '.join(SOURCES)}")
