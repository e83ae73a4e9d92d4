"""Readers for user-supplied files in their original formats: IDX, CIFAR pickles, NPZ.

Nothing is downloaded: the user points ``--source-dir`` at the files. Errors name the file.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.source_base import ArraySource, sha256_files

# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# torchvision keeps the same files under <root>/<Name>/raw.
IDX_SUBDIRS = {
    "mnist": ("", "MNIST/raw", "mnist"),
    "fashion-mnist": ("", "FashionMNIST/raw", "fashion-mnist", "fashion_mnist"),
}


def _find_idx(root: Path, dataset: str, stem: str) -> Path:
    variants = [stem, stem.replace("-idx", ".idx")]
    for sub in IDX_SUBDIRS[dataset]:
        for v in variants:
            for name in (v, v + ".gz"):
                p = root / sub / name
                if p.is_file():
                    return p
    raise DataPrepError(
        f"{dataset}: {stem}[.gz] not found in {root} (expected the standard "
        f"IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, raw or .gz)"
    )


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (raw or gzip) with ``ndim`` dimensions."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataPrepError(f"{path}: cannot be read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataPrepError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataPrepError(
            f"{path}: IDX element type 0x{raw[2]:02x}, only unsigned bytes (0x08) are supported"
        )
    if raw[3] != ndim:
        raise DataPrepError(f"{path}: IDX file has {raw[3]} dimensions, expected {ndim}")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataPrepError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = int(np.prod(dims, dtype=np.int64))
    if len(raw) - head != need:
        raise DataPrepError(
            f"{path}: IDX header says {dims} ({need} bytes) but the file holds "
            f"{len(raw) - head} bytes of data (truncated?)"
        )
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def open_idx(dataset: str, root: Path, test_fraction: float) -> ArraySource:
    if not root.is_dir():
        raise DataPrepError(f"{dataset}: --source-dir {root} is not a folder")
    paths = {k: _find_idx(root, dataset, v) for k, v in IDX_NAMES.items()}
    arrays = {k: read_idx(p, 3 if k.endswith("_x") else 1) for k, p in paths.items()}
    for split in ("train", "test"):
        nx, ny = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if nx != ny:
            raise DataPrepError(
                f"{paths[split + '_y']}: {ny} labels for {nx} images in {paths[split + '_x']}"
            )
    return ArraySource(
        dataset,
        arrays["train_x"],
        arrays["train_y"],
        arrays["test_x"],
        arrays["test_y"],
        sha256=sha256_files(list(paths.values())),
        origin=str(root),
        num_classes=10,
        test_fraction=test_fraction,
    )


# ---------------------------------------------------------------- CIFAR python pickles

CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label": "labels",
        "classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "label": "fine_labels",
        "classes": 100,
    },
}
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2; harmless
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays only: a batch file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes, origin: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise DataPrepError(f"{origin}: not a CIFAR python batch ({exc})") from None
    if not isinstance(obj, dict):
        raise DataPrepError(f"{origin}: not a CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(d: dict, label_key: str, origin: str) -> tuple[np.ndarray, np.ndarray]:
    for key in ("data", label_key):
        if key not in d:
            raise DataPrepError(f"{origin}: field '{key}' missing from the batch")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataPrepError(
            f"{origin}: field 'data' has dtype {x.dtype} shape {x.shape}; expected uint8 (N, 3072)"
        )
    if len(y) != len(x):
        raise DataPrepError(f"{origin}: field '{label_key}' has {len(y)} labels for {len(x)} images")
    return x.reshape(-1, 3, 32, 32), y


def open_cifar(dataset: str, root: Path, test_fraction: float) -> ArraySource:
    spec = CIFAR[dataset]
    names = spec["train"] + spec["test"]
    archive = None
    if root.is_file():
        archive = root
    elif (
        (root / spec["archive"]).is_file()
        and not (root / spec["folder"]).is_dir()
        and not (root / names[0]).is_file()
    ):
        archive = root / spec["archive"]
    blobs: dict[str, bytes] = {}
    if archive is not None:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = {
                    Path(m.name).name: m
                    for m in tar.getmembers()
                    if m.isfile() and Path(m.name).name in names
                }
                for n in names:
                    if n not in members:
                        raise DataPrepError(f"{archive}: member {spec['folder']}/{n} missing")
                    blobs[n] = tar.extractfile(members[n]).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataPrepError(f"{archive}: cannot be read as a .tar.gz ({exc})") from None
        sha = sha256_files([archive])
        origin = lambda n: f"{archive}:{n}"  # noqa: E731
    else:
        folder = root if (root / names[0]).is_file() else root / spec["folder"]
        paths = [folder / n for n in names]
        for p in paths:
            if not p.is_file():
                raise DataPrepError(
                    f"{dataset}: {p} not found (point --source-dir at "
                    f"{spec['folder']}/, its parent, or {spec['archive']})"
                )
            blobs[p.name] = p.read_bytes()
        sha = sha256_files(paths)
        origin = lambda n: str(folder / n)  # noqa: E731
    split = {}
    for part in ("train", "test"):
        xs, ys = zip(
            *(_batch_arrays(_unpickle(blobs[n], origin(n)), spec["label"], origin(n)) for n in spec[part])
        )
        split[part] = (np.concatenate(xs), np.concatenate(ys))
    return ArraySource(
        dataset,
        *split["train"],
        *split["test"],
        sha256=sha,
        origin=str(archive or root),
        num_classes=spec["classes"],
        test_fraction=test_fraction,
    )


# ---------------------------------------------------------------- NPZ


def open_npz(root: Path, test_fraction: float, num_classes: int | None = None) -> ArraySource:
    path = root
    if root.is_dir():
        found = sorted(root.glob("*.npz"))
        if len(found) != 1:
            raise DataPrepError(
                f"npz: --source-dir {root} holds {len(found)} .npz files; point it at exactly one file"
            )
        path = found[0]
    if not path.is_file():
        raise DataPrepError(f"npz: {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test") if k in z.files}
    except Exception as exc:
        raise DataPrepError(f"{path}: cannot be read as .npz ({exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataPrepError(f"{path}: field '{key}' missing (need x, y; optional x_test, y_test)")
    return ArraySource(
        "npz",
        arrays["x"],
        arrays["y"],
        arrays.get("x_test"),
        arrays.get("y_test"),
        sha256=sha256_files([path]),
        origin=str(path),
        num_classes=num_classes,
        test_fraction=test_fraction,
        options={"num_classes": num_classes} if num_classes else None,
    )


def open_file_source(name: str, root: Path, *, test_fraction: float, **opts) -> ArraySource:
    if name in ("mnist", "fashion-mnist"):
        return open_idx(name, root, test_fraction)
    if name in CIFAR:
        return open_cifar(name, root, test_fraction)
    return open_npz(root, test_fraction, **opts)
