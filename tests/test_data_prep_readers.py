"""Source readers on small files that the tests write in the real formats."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile

import numpy as np
import pytest

from data_prep.errors import DataPrepError
from data_prep.partition import build_partitions
from data_prep.sources import open_source
from tests.partition_helpers import read_all, same_multiset


def idx_bytes(arr: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0,0,0x08,ndim; big-endian dims; raw data."""
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_idx_set(folder, rng, n_train=60, n_test=20, gz=True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, arr in data.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_raw_and_gz(tmp_path, gz):
    data = write_idx_set(tmp_path / "src", np.random.default_rng(0), gz=gz)
    m = build_partitions("mnist", 3, "dirichlet:0.5", 0, tmp_path / "out", source_dir=tmp_path / "src")
    assert m["sample_shape"] == [1, 28, 28] and m["x_dtype"] == "uint8"
    x, y, (xt, yt) = read_all(tmp_path / "out")
    assert same_multiset(
        x, y, data["train-images-idx3-ubyte"][:, None].astype(np.uint8), data["train-labels-idx1-ubyte"]
    )
    assert np.array_equal(xt[:, 0], data["t10k-images-idx3-ubyte"])  # the source's own test set
    assert np.array_equal(yt, data["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_torchvision_layout(tmp_path):
    write_idx_set(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(1), gz=False)
    m = build_partitions("fashion-mnist", 2, "iid", 0, tmp_path / "out", source_dir=tmp_path)
    assert m["dataset"] == "fashion-mnist" and m["train_size"] == 60 and m["test"]["size"] == 20


def test_idx_truncated_or_missing_names_the_file(tmp_path):
    write_idx_set(tmp_path, np.random.default_rng(2), gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataPrepError, match=r"train-images-idx3-ubyte: IDX header says .*truncated"):
        open_source("mnist", tmp_path)
    bad.unlink()
    with pytest.raises(DataPrepError, match="train-images-idx3-ubyte.*not found"):
        open_source("mnist", tmp_path)
    with pytest.raises(DataPrepError, match="needs --source-dir"):
        open_source("mnist")


def cifar_batch(rng, n, label_key, classes) -> dict:
    return {
        b"batch_label": b"test",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, classes, n)],
    }


def write_cifar10(folder, rng, per_batch=8) -> dict:
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(rng, per_batch, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(rng, 6, b"labels", 10)
    for name, d in batches.items():
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    return batches


def tar_folder(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar10_folder_and_tar_gz(tmp_path, as_archive):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar10(folder, np.random.default_rng(3))
    source = tmp_path
    if as_archive:
        tar_folder(folder, tmp_path / "cifar-10-python.tar.gz")
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
        source = tmp_path / "cifar-10-python.tar.gz"
    m = build_partitions("cifar10", 2, "iid", 0, tmp_path / "out", source_dir=source)
    assert m["sample_shape"] == [3, 32, 32] and m["num_classes"] == 10 and m["train_size"] == 40
    x, y, (xt, yt) = read_all(tmp_path / "out")
    ref_x = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    ref_y = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    assert same_multiset(x, y, ref_x.reshape(-1, 3, 32, 32), ref_y)
    # CIFAR rows are channel-major: the first 1024 bytes are the red plane.
    assert np.array_equal(xt[0, 0].ravel(), batches["test_batch"][b"data"][0, :1024])


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for name, n in (("train", 30), ("test", 10)):
        d = cifar_batch(rng, n, b"fine_labels", 100)
        d[b"coarse_labels"] = [0] * n
        (folder / name).write_bytes(pickle.dumps(d))
    m = build_partitions("cifar100", 3, "iid", 0, tmp_path / "out", source_dir=folder)
    assert m["num_classes"] == 100 and m["train_size"] == 30 and m["test"]["size"] == 10


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_cifar_pickle_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, np.random.default_rng(5))
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Exploit()}))
    with pytest.raises(DataPrepError, match=r"data_batch_3: not a CIFAR python batch.*refusing"):
        open_source("cifar10", tmp_path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_npz_images_with_test_and_flat_without(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 3, 4, 4)).astype(np.float64)
    y = np.arange(50) % 5
    np.savez(tmp_path / "img.npz", x=x, y=y, x_test=x[:7], y_test=y[:7])
    m = build_partitions("npz", 2, "dirichlet:1", 0, tmp_path / "a", source_dir=tmp_path / "img.npz")
    assert m["x_dtype"] == "float32" and m["sample_shape"] == [3, 4, 4]
    assert m["num_classes"] == 5 and m["train_size"] == 50 and m["test"]["size"] == 7
    xa, ya, _ = read_all(tmp_path / "a")
    assert same_multiset(xa, ya, x.astype(np.float32), y)

    flat_dir = tmp_path / "flat"
    flat_dir.mkdir()
    np.savez(flat_dir / "data.npz", x=rng.integers(0, 256, (100, 12)).astype(np.uint8), y=np.arange(100) % 4)
    m = build_partitions("npz", 4, "shards:1", 0, tmp_path / "b", source_dir=flat_dir)
    assert m["x_dtype"] == "uint8" and m["sample_shape"] == [12]
    # No test split in the file: a stratified 20% split, every class represented.
    assert m["test"]["size"] == 20 and m["test"]["class_counts"] == [5, 5, 5, 5]
    assert m["train_size"] == 80


def test_npz_bad_inputs_name_file_and_field(tmp_path):
    np.savez(tmp_path / "nan.npz", x=np.array([[0.0, np.nan]] * 10), y=np.zeros(10, int))
    with pytest.raises(DataPrepError, match=r"nan.npz: field 'x' holds NaN"):
        open_source("npz", tmp_path / "nan.npz")
    np.savez(tmp_path / "noy.npz", x=np.zeros((10, 3)))
    with pytest.raises(DataPrepError, match=r"noy.npz: field 'y' missing"):
        open_source("npz", tmp_path / "noy.npz")
    np.savez(tmp_path / "len.npz", x=np.zeros((10, 3)), y=np.zeros(9, int))
    with pytest.raises(DataPrepError, match=r"len.npz: field 'y' has shape \(9,\)"):
        open_source("npz", tmp_path / "len.npz")
    with pytest.raises(DataPrepError, match="holds 3 .npz files"):
        open_source("npz", tmp_path)
    np.savez(tmp_path / "neg.npz", x=np.zeros((10, 3)), y=-np.ones(10, int))
    with pytest.raises(DataPrepError, match="negative label"):
        open_source("npz", tmp_path / "neg.npz")


def _fashion_mnist_or_skip() -> None:
    from data_prep.sources import INSTALLED

    folder, package = INSTALLED["fashion-mnist"]
    if not folder.is_dir():
        from tests.conftest import in_ci

        message = f"Fashion-MNIST not installed: apt-get install {package} (make fashion-mnist)"
        if in_ci():
            pytest.fail(f"CI installs it (.ci/run): {message}")
        pytest.skip(message)


def test_fashion_mnist_is_found_without_source_dir(tmp_path):
    _fashion_mnist_or_skip()
    m = build_partitions("fashion-mnist", 5, "shards:2", 0, tmp_path / "fm")
    assert m["dataset"] == "fashion-mnist" and m["train_size"] == 60000
    assert m["test"]["size"] == 10000 and m["sample_shape"] == [1, 28, 28]
    assert m["x_dtype"] == "uint8" and sum(m["sizes"]) == 60000


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    import data_prep.sources as sources

    monkeypatch.setitem(sources.INSTALLED, "fashion-mnist", (tmp_path / "nowhere", "dataset-fashion-mnist"))
    with pytest.raises(DataPrepError) as err:
        build_partitions("fashion-mnist", 2, "iid", 0, tmp_path / "out")
    text = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in text and "--source-dir" in text
    assert "train-images-idx3-ubyte.gz" in text and str(tmp_path / "nowhere") in text


def test_a_fixed_stratified_training_subset(tmp_path):
    _fashion_mnist_or_skip()
    m = build_partitions("fashion-mnist", 2, "iid", 0, tmp_path / "a", train_subset=6000)
    assert m["train_size"] == 6000 and m["class_counts"] == [600] * 10
    assert m["test"]["size"] == 10000 and m["source_options"]["train_subset"] == 6000
    other_seed = build_partitions("fashion-mnist", 2, "iid", 1, tmp_path / "b", train_subset=6000)
    assert other_seed["source_sha256"] == m["source_sha256"]
    with pytest.raises(DataPrepError, match="--train-subset must be in 1..60000"):
        build_partitions("fashion-mnist", 2, "iid", 0, tmp_path / "c", train_subset=0)
