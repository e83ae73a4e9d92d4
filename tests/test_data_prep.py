"""Partitioner: schemes on the embedded digits, coverage, determinism, safety, inspect."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import h5py
import numpy as np
import pytest

from data_prep import writer
from data_prep.errors import DataPrepError
from data_prep.inspect import main as inspect_main
from data_prep.inspect import skew_metrics
from data_prep.partition import build_partitions
from data_prep.partition_spec import parse_partition
from data_prep.sources import open_source
from tests.mpi_helpers import ROOT, mpi_env
from tests.partition_helpers import read_ranks, same_multiset


@pytest.fixture(scope="module")
def digits():
    return open_source("digits")


SCHEMES = [
    ("iid", 4),
    ("dirichlet:0.5", 4),
    ("quantity:1", 5),
    ("dirichlet:0.3+quantity:0.8", 6),
    ("shards:2", 8),
    ("shards:1", 10),
]


@pytest.mark.parametrize("scheme,ranks", SCHEMES)
def test_scheme_covers_training_set_exactly_once(tmp_path, digits, scheme, ranks):
    m = build_partitions("digits", ranks, scheme, 3, tmp_path)
    parts = read_ranks(tmp_path)
    assert len(parts) == ranks == m["world_size"]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    assert x.dtype == np.uint8 and x.shape[1:] == (1, 8, 8) and y.dtype == np.int64
    # The union of the partitions is the training set as a multiset: nothing lost, nothing
    # duplicated (the sizes add up, so a duplicate would have to displace a sample).
    assert len(y) == digits.n_train == m["train_size"]
    assert same_multiset(x, y, digits.x_train, digits.y_train)
    for r, (_xr, yr, attrs) in enumerate(parts):
        entry = m["ranks"][r]
        assert attrs["rank"] == r and attrs["world_size"] == ranks
        assert attrs["scheme"] == m["scheme"] and attrs["source"] == "digits"
        assert attrs["source_sha256"] == digits.sha256 and attrs["seed"] == 3
        assert np.array_equal(attrs["class_counts"], np.bincount(yr, minlength=10))
        assert entry["class_counts"] == np.bincount(yr, minlength=10).tolist()
        assert entry["size"] == len(yr) >= 1
    with h5py.File(tmp_path / "test.h5", "r") as f:
        assert f["x"].shape[1:] == (1, 8, 8) and f["x"].dtype == np.uint8
        assert f["y"].shape[0] == m["test"]["size"] == len(digits.y_test)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_same_seed_same_arrays_other_seed_differs(tmp_path, digits):
    a = build_partitions("digits", 4, "dirichlet:0.5", 7, tmp_path / "a")
    b = build_partitions("digits", 4, "dirichlet:0.5", 7, tmp_path / "b")
    c = build_partitions("digits", 4, "dirichlet:0.5", 8, tmp_path / "c")
    for (xa, ya, _), (xb, yb, _) in zip(read_ranks(tmp_path / "a"), read_ranks(tmp_path / "b")):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert [e["sha256"] for e in a["ranks"]] == [e["sha256"] for e in b["ranks"]]
    assert [e["sha256"] for e in a["ranks"]] != [e["sha256"] for e in c["ranks"]]
    assert a["test"]["sha256"] == c["test"]["sha256"]  # the test split does not depend on seed


def test_shards_give_exactly_k_classes(tmp_path, digits):
    m1 = build_partitions("digits", 10, "shards:1", 0, tmp_path / "k1")
    held = [np.flatnonzero(e["class_counts"]).tolist() for e in m1["ranks"]]
    assert all(len(h) == 1 for h in held)
    assert sorted(h[0] for h in held) == list(range(10))
    assert sum(e["size"] for e in m1["ranks"]) == digits.n_train
    m2 = build_partitions("digits", 8, "shards:2", 0, tmp_path / "k2")
    held = [set(np.flatnonzero(e["class_counts"]).tolist()) for e in m2["ranks"]]
    assert all(len(h) == 2 for h in held)
    assert set().union(*held) == set(range(10))


def test_shards_with_too_few_slots_explains(tmp_path):
    with pytest.raises(
        DataPrepError,
        match=r"shards:2 with 4 ranks gives 8 class slots.*10 "
        r"classes",
    ):
        build_partitions("digits", 4, "shards:2", 0, tmp_path)
    with pytest.raises(DataPrepError, match="only 10 classes"):
        build_partitions("digits", 4, "shards:11", 0, tmp_path)
    assert not (tmp_path / "partition.json").exists()


def test_skew_schemes_skew_what_they_promise(tmp_path):
    counts = {}
    for scheme in ("iid", "dirichlet:0.1", "quantity:0.3"):
        m = build_partitions("digits", 8, scheme, 1, tmp_path / scheme.replace(":", "_"))
        counts[scheme] = skew_metrics(np.array([e["class_counts"] for e in m["ranks"]]))
    assert counts["dirichlet:0.1"]["mean_tv"] > 3 * counts["iid"]["mean_tv"]
    assert counts["quantity:0.3"]["mean_tv"] < 0.5  # sizes skewed, labels not
    assert counts["quantity:0.3"]["size_max_over_mean"] > counts["iid"]["size_max_over_mean"] + 0.3
    assert max(counts["iid"]["sizes"]) - min(counts["iid"]["sizes"]) <= 1


def test_min_per_rank(tmp_path, digits):
    m = build_partitions("digits", 64, "dirichlet:0.05+quantity:0.05", 2, tmp_path / "a", min_per_rank=5)
    assert min(m["sizes"]) >= 5 and sum(m["sizes"]) == digits.n_train
    m0 = build_partitions("digits", 64, "quantity:0.05", 2, tmp_path / "b", min_per_rank=0)
    assert sum(m0["sizes"]) == digits.n_train and min(m0["sizes"]) == 0  # empty ranks allowed
    with h5py.File(tmp_path / "b" / m0["ranks"][m0["sizes"].index(0)]["file"], "r") as f:
        assert f["x"].shape == (0, 1, 8, 8)
    with pytest.raises(DataPrepError, match="at least 100 each"):
        build_partitions("digits", 64, "iid", 0, tmp_path / "c", min_per_rank=100)


def test_refuse_overwrite_noop_and_force(tmp_path):
    out = tmp_path / "p"
    m = build_partitions("digits", 4, "iid", 0, out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert build_partitions("digits", 4, "iid", 0, out) == m  # identical request: no-op
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    with pytest.raises(DataPrepError, match=r"already holds a different partition.*--force"):
        build_partitions("digits", 2, "dirichlet:0.5", 0, out)
    with pytest.raises(DataPrepError, match="different partition"):
        build_partitions("digits", 4, "iid", 1, out)  # only the seed differs
    assert json.loads((out / "partition.json").read_text()) == m  # untouched
    m2 = build_partitions("digits", 2, "dirichlet:0.5", 0, out, force=True)
    assert m2["world_size"] == 2
    assert sorted(p.name for p in out.glob("rank_*.h5")) == ["rank_00000.h5", "rank_00001.h5"]


def test_failure_mid_build_leaves_no_partition(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr("data_prep.partition.write_test_file", boom)
    with pytest.raises(OSError, match="injected"):
        build_partitions("digits", 3, "iid", 0, tmp_path / "p")
    assert list((tmp_path / "p").iterdir()) == []  # no manifest, no rank files, no temp dir


def test_synthetic_streams_deterministically(tmp_path, monkeypatch):
    # Small writer chunks force many chunk/rank boundaries on a small dataset.
    monkeypatch.setattr(writer, "MAX_OPEN_FILES", 2)
    kw = dict(num_samples=40000, num_test=300, shape=(2, 3, 3), num_classes=5)
    m = build_partitions("synthetic", 5, "dirichlet:0.5", 4, tmp_path / "a", **kw)
    src = open_source("synthetic", seed=4, **kw)
    parts = read_ranks(tmp_path / "a")
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    full = np.concatenate([c for _, c in src.train_chunks()])
    assert same_multiset(x, y, full, src.y_train)
    assert m["x_dtype"] == "uint8" and m["sample_shape"] == [2, 3, 3] and len(y) == 40000
    # Class-conditional: class means are far apart relative to their spread.
    means = np.stack([full[src.y_train == c].reshape(-1, 18).mean(0) for c in range(5)])
    assert np.abs(means[0] - means[1]).mean() > 10
    b = build_partitions("synthetic", 5, "dirichlet:0.5", 4, tmp_path / "b", **kw)
    assert [e["sha256"] for e in m["ranks"]] == [e["sha256"] for e in b["ranks"]]
    floats = dict(num_samples=50, num_test=10, shape=(7,), num_classes=3, dtype="float32")
    f = build_partitions("synthetic", 2, "iid", 4, tmp_path / "f", **floats)
    assert f["x_dtype"] == "float32" and f["sample_shape"] == [7]
    with h5py.File(tmp_path / "f" / "rank_00000.h5", "r") as h:
        assert h["x"].dtype == np.float32 and 0 <= h["x"][...].min() and h["x"][...].max() <= 1


def test_scheme_spec_errors():
    assert parse_partition("quantity:0.5+dirichlet:0.1").name == "dirichlet:0.1+quantity:0.5"
    assert parse_partition("DIRICHLET:1.0").name == "dirichlet:1"
    for bad, msg in [
        ("dirichlet", "expected iid"),
        ("dirichlet:-1", "positive"),
        ("dirichlet:abc", "not a number"),
        ("shards:0", "at least 1"),
        ("shards:2+quantity:1", "expected iid"),
        ("zipf:2", "expected iid"),
    ]:
        with pytest.raises(DataPrepError, match=msg):
            parse_partition(bad)


def test_inspect_writes_png_and_metrics(tmp_path, capsys):
    import matplotlib.image as mpimg

    build_partitions("digits", 5, "dirichlet:0.2", 0, tmp_path)
    assert inspect_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TV" in out and "H(bits)" in out and len(out.splitlines()) >= 3 + 5
    png = tmp_path / "partition.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0.05  # not a blank canvas
    assert not list(tmp_path.glob(".*"))
    assert inspect_main([str(tmp_path / "nope")]) == 2


def test_metrics_extremes():
    m = skew_metrics(np.array([[5, 0], [0, 5]]))
    assert m["tv_distance"] == [0.5, 0.5] and m["entropy_bits"] == [0.0, 0.0]
    # JS([1,0] || [.5,.5]) = H(.75,.25) - (0 + 1) / 2 bits
    h = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    assert m["js_divergence_bits"] == pytest.approx([h - 0.5, h - 0.5])
    iid = skew_metrics(np.array([[5, 5], [5, 5]]))
    assert iid["mean_tv"] == 0 and iid["entropy_bits"] == [1.0, 1.0]


def test_cli_success_and_clear_error(tmp_path):
    # synthetic keeps the subprocess light (no scikit-learn import)
    cmd = [
        sys.executable,
        *"-m data_prep.partition --dataset synthetic --num-samples 300".split(),
        *"--num-test 30 --shape 6 --num-classes 10 --ranks 3 --seed 1".split(),
    ]

    def partition(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd + list(extra), capture_output=True, text=True, env=mpi_env(), cwd=ROOT, timeout=60
        )

    ok = partition("--scheme", "shards:4", "--out", str(tmp_path / "p"))
    assert ok.returncode == 0, ok.stderr
    assert "300 training samples over 3 ranks" in ok.stdout
    m = json.loads((tmp_path / "p" / "partition.json").read_text())
    assert all(np.count_nonzero(e["class_counts"]) == 4 for e in m["ranks"])
    bad = partition("--scheme", "shards:3", "--out", str(tmp_path / "q"))
    assert bad.returncode == 2 and "error: partition shards:3 with 3 ranks" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "q").exists()


def test_prefetch_propagates_errors_and_stops_early():
    def chunks(fail_at):
        for i in range(10):
            if i == fail_at:
                raise OSError(f"source read failed at chunk {i}")
            yield i, np.zeros(3)

    with pytest.raises(OSError, match="chunk 4"):
        list(writer._prefetch(chunks(4)))
    it = writer._prefetch(chunks(None))
    assert next(it)[0] == 0
    it.close()  # the consumer stops early: the producer thread must end, not block forever
    assert [i for i, _ in writer._prefetch(chunks(None))] == list(range(10))


def test_every_partition_file_honours_the_umask(tmp_path):
    """partition.json used to be written 0600 (mkstemp) while the rank files were 0644."""
    old = os.umask(0o022)
    try:
        build_partitions("digits", 2, "iid", 0, tmp_path / "p")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "p").iterdir()}
    assert modes == {
        "partition.json": 0o644,
        "rank_00000.h5": 0o644,
        "rank_00001.h5": 0o644,
        "test.h5": 0o644,
    }


def test_feature_shift_gives_each_rank_its_own_domain(tmp_path):
    """feature:mixed: IID labels, rank r's images through its own transform (training and its
    own test split); test.h5 is the union of the domain splits."""
    m = build_partitions("digits", 4, "feature:mixed", 3, tmp_path / "f")
    assert m["scheme"] == "feature:mixed" and len(m["domains"]) == 4
    assert [d["rotate_quarter_turns"] for d in m["domains"]] == [0, 1, 2, 3]
    assert m["domains"][0]["contrast"] == 1.0 and m["domains"][0]["noise"] == 0.0
    assert m["domains"][0]["value_max"] == 16.0
    build_partitions("digits", 4, "iid", 3, tmp_path / "i")
    with h5py.File(tmp_path / "f" / "rank_00000.h5") as f0, h5py.File(tmp_path / "i" / "rank_00000.h5") as i0:
        assert np.array_equal(f0["x"][...], i0["x"][...])  # domain 0 is the identity
        assert np.array_equal(f0["y"][...], i0["y"][...])
    with h5py.File(tmp_path / "f" / "rank_00003.h5") as f3, h5py.File(tmp_path / "i" / "rank_00003.h5") as i3:
        assert np.array_equal(f3["y"][...], i3["y"][...])  # same labels, other inputs
        assert not np.array_equal(f3["x"][...], i3["x"][...])
        assert f3["x"][...].max() <= 16
    splits = m["domain_tests"]
    assert [e["file"] for e in splits] == [f"test_rank_{r:05d}.h5" for r in range(4)]
    assert sum(e["size"] for e in splits) == m["test"]["size"]
    with h5py.File(tmp_path / "f" / "test.h5") as t:
        union = sorted(map(bytes, t["x"][...]))
    parts = []
    for e in splits:
        with h5py.File(tmp_path / "f" / e["file"]) as f:
            parts += list(map(bytes, f["x"][...]))
    assert sorted(parts) == union
    again = build_partitions("digits", 4, "feature:mixed", 3, tmp_path / "g")
    assert [e["sha256"] for e in again["ranks"]] == [e["sha256"] for e in m["ranks"]]
    with pytest.raises(DataPrepError, match="domain kind must be one of"):
        parse_partition("feature:blur")


def test_synthetic_pieces_are_the_block_drawn_whole(monkeypatch):
    """Bounded pieces (memory) must not change the data: the same bytes as one whole draw."""
    from data_prep import synthetic

    kw = dict(num_samples=70, num_test=9, shape=(3, 5, 7), num_classes=4)  # 105 B per row
    whole = synthetic.SyntheticSource(seed=3, **kw)
    ref = list(whole.train_chunks())
    assert len(ref) == 1 and ref[0][1].shape == (70, 3, 5, 7)
    monkeypatch.setattr(synthetic, "PIECE_BYTES", 4 * 105 + 3)  # 4 rows, not word-aligned
    pieces = list(synthetic.SyntheticSource(seed=3, **kw).train_chunks())
    assert [s for s, _ in pieces] == list(range(0, 70, 4))
    assert np.array_equal(np.concatenate([x for _, x in pieces]), ref[0][1])
    assert np.array_equal(synthetic.SyntheticSource(seed=3, **kw).test()[0], whole.test()[0])
