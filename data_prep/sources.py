"""Training/test sources for partitioning: one interface over embedded, file and synthetic data.

A source exposes the full label vector (small even at millions of samples) and streams the
images in index order, so the partitioner never needs the whole dataset in memory at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.source_base import DEFAULT_TEST_FRACTION, ArraySource, Source, sha256_arrays
from disdl_mpi.data.layout import DATASETS

SOURCES = tuple(DATASETS)  # every name open_source opens


def load_digits_source(test_fraction: float = DEFAULT_TEST_FRACTION) -> ArraySource:
    """The UCI handwritten digits that ship inside scikit-learn: 8x8 images, values 0..16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.uint8).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    return ArraySource(
        "digits",
        x,
        y,
        None,
        None,
        sha256=sha256_arrays(x, y),
        origin="sklearn digits",
        num_classes=10,
        test_fraction=test_fraction,
    )


# Datasets that a system package installs in a known folder: (folder, package).
INSTALLED = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"), "dataset-fashion-mnist")}
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def installed_dir(name: str) -> Path:
    """The package's folder for ``name``, or a DataPrepError that says how to get it."""
    folder, package = INSTALLED[name]
    if folder.is_dir():
        return folder
    raise DataPrepError(
        f"{name}: not found in {folder}. Install it with 'apt-get install {package}' (Debian/"
        f"Ubuntu; 'make fashion-mnist' does it), or pass --source-dir with a folder holding the "
        f"four IDX files ({', '.join(IDX_FILES)}; raw or .gz)"
    )


def train_subset(src: ArraySource, n: int) -> ArraySource:
    """A fixed, class-stratified subset of ``n`` training samples (the same for every seed,
    so studies that vary the seed vary only the partition and the training); the test set
    stays whole."""
    total = src.n_train
    if not 0 < n <= total:
        raise DataPrepError(f"--train-subset must be in 1..{total}, got {n}")
    rng = np.random.default_rng(0xF1)
    counts = np.bincount(src.y_train, minlength=src.num_classes)
    take = np.floor(counts * n / total).astype(np.int64)
    take[np.argsort(-(counts * n / total - take))[: n - int(take.sum())]] += 1
    keep = np.concatenate([rng.permutation(np.flatnonzero(src.y_train == c))[:k] for c, k in enumerate(take)])
    keep.sort()
    src.x_train, src.y_train = src.x_train[keep], src.y_train[keep]
    src.options["train_subset"] = int(n)
    return src


def open_source(dataset: str, source_dir: str | Path | None = None, *, seed: int = 0, **opts) -> Source:
    """Open a source by name; ``opts`` are source options (``python -m data_prep.partition -h``)."""
    name = (dataset or "").lower()
    opts = {k: v for k, v in opts.items() if v is not None}
    test_fraction = float(opts.pop("test_fraction", DEFAULT_TEST_FRACTION))
    subset = opts.pop("train_subset", None)
    if subset is not None:
        if name == "synthetic":
            raise DataPrepError("--train-subset: synthetic data has --num-samples instead")
        return train_subset(
            open_source(dataset, source_dir, seed=seed, test_fraction=test_fraction, **opts), int(subset)
        )
    if name == "synthetic":
        from data_prep.synthetic import SyntheticSource

        return SyntheticSource(seed=seed, **opts)
    allowed = {"npz": {"num_classes"}}.get(name, set())
    extra = sorted(set(opts) - allowed)
    if extra:
        raise DataPrepError(f"source {dataset!r} takes no option(s) {', '.join(extra)}")
    if name == "digits":
        return load_digits_source(test_fraction)
    if name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "npz"):
        from data_prep import readers

        if source_dir is None and name in INSTALLED:
            source_dir = installed_dir(name)
        if source_dir is None:
            raise DataPrepError(
                f"source {dataset!r} needs --source-dir (the folder with its "
                f"files; they cannot be downloaded here)"
            )
        return readers.open_file_source(name, Path(source_dir), test_fraction=test_fraction, **opts)
    raise DataPrepError(f"unknown dataset {dataset!r}; choose one of {', '.join(SOURCES)}")
