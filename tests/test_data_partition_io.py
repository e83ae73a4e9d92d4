"""load_partition under real mpiexec: the happy path, and every bad input failing fast on
every rank with a message that names file, rank and field."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import h5py
import numpy as np
import pytest

from data_prep.partition import build_partitions
from tests.mpi_helpers import run_mpi
from tests.partition_helpers import content_sha256

pytestmark = pytest.mark.mpi

FAST_S = 25  # generous for a shared, loaded 2-core machine; a hang hits run_mpi's timeout


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    build_partitions("digits", 2, "dirichlet:0.5", 0, root / "u8")
    floats = dict(num_samples=64, num_test=16, shape=(5,), num_classes=3, dtype="float32")
    build_partitions("synthetic", 2, "iid", 0, root / "f32", **floats)
    return root


def load(n: int, data_dir, timeout: float = 60):
    start = time.monotonic()
    proc = run_mpi(n, ["-m", "tests.mpi_programs.load_partition", str(data_dir)], timeout=timeout)
    return proc, time.monotonic() - start


def copy(base, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(base / name, dst)
    return dst


def test_each_rank_loads_its_own_partition(base):
    d = base / "u8"
    proc, _ = load(2, d)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((d / "partition.json").read_text())
    lines = sorted(l for l in proc.stdout.splitlines() if l.startswith("LOADED"))
    assert len(lines) == 2
    digest = hashlib.sha256((d / "partition.json").read_bytes()).hexdigest()
    for r, line in enumerate(lines):
        with h5py.File(d / f"rank_{r:05d}.h5", "r") as f:
            want = content_sha256(f["x"][...], f["y"][...])
        assert f"rank={r} sha={want}" in line
        assert f"sizes={manifest['sizes']}" in line and f"manifest={digest}" in line
        assert f"test={manifest['test']['size']}" in line and "shape=(1, 8, 8)" in line


def rewrite(path, **arrays):
    """Replace datasets in an existing HDF5 file (keeping its attributes)."""
    with h5py.File(path, "r+") as f:
        for key, value in arrays.items():
            del f[key]
            f.create_dataset(key, data=value)


def flip_data_bytes(path):
    with h5py.File(path, "r") as f:
        offset = f["x"].id.get_offset()  # x is contiguous (data_prep.writer)
    with open(path, "r+b") as fh:
        fh.seek(offset + 10)
        b = fh.read(4)
        fh.seek(offset + 10)
        fh.write(bytes(v ^ 0xFF for v in b))


def case_missing_and_corrupt_header(d):
    (d / "rank_00001.h5").unlink()
    with open(d / "rank_00000.h5", "r+b") as fh:
        fh.write(b"\0" * 64)
    return 2, [
        ("rank_00001.h5", "rank 1", "field 'file'", "missing"),
        ("rank_00000.h5", "rank 0", "field 'file'", "cannot be opened"),
    ]


def case_truncated(d):
    p = d / "rank_00001.h5"
    p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 5])
    return 2, [("rank_00001.h5", "rank 1", "field 'file'", "truncated")]


def case_flipped_bytes(d):
    flip_data_bytes(d / "rank_00001.h5")
    return 2, [("rank_00001.h5", "rank 1", "field 'sha256'", "modified or corrupted")]


def case_dtype_and_labels(d):
    with h5py.File(d / "rank_00000.h5", "r") as f:
        x0 = f["x"][...]
    rewrite(d / "rank_00000.h5", x=x0.astype(np.int16))
    with h5py.File(d / "rank_00001.h5", "r+") as f:
        f["y"][0] = 10
    return 2, [
        ("rank_00000.h5", "rank 0", "field 'x'", "dtype int16, expected uint8"),
        ("rank_00001.h5", "rank 1", "field 'y'", "outside [0, 10)"),
    ]


def case_shape(d):
    with h5py.File(d / "rank_00001.h5", "r") as f:
        x1 = f["x"][...]
    rewrite(d / "rank_00001.h5", x=x1.reshape(len(x1), 1, 4, 16))
    return 2, [
        ("rank_00001.h5", "rank 1", "field 'x'", "sample shape (1, 4, 16)"),
        ("rank_00001.h5", "rank 1", "field 'x'", "differs across ranks"),
    ]


def case_swapped(d):
    a, b = d / "rank_00000.h5", d / "rank_00001.h5"
    tmp = d / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    return 2, [
        ("rank_00000.h5", "rank 0", "field 'rank'", "expected 0"),
        ("rank_00001.h5", "rank 1", "field 'rank'", "expected 1"),
    ]


def case_test_mismatch(d):
    with h5py.File(d / "test.h5", "r+") as f:
        xt = f["x"][...]
        f.attrs["num_classes"] = 12
    rewrite(d / "test.h5", x=xt.reshape(len(xt), 64))
    return 2, [
        ("test.h5", "ranks 0-1", "field 'num_classes'", "expected 10"),
        ("test.h5", "ranks 0-1", "field 'x'", "sample shape (64,)"),
    ]


def case_world_size(d):
    return 3, [("partition.json", "ranks 0-2", "field 'world_size'", "has 2 ranks but the job has 3")]


def case_manifest_missing(d):
    (d / "partition.json").unlink()
    return 2, [("partition.json", "ranks 0-1", "field 'manifest'", "missing")]


def case_manifest_not_json(d):
    p = d / "partition.json"
    p.write_text(p.read_text()[:200])
    return 2, [("partition.json", "ranks 0-1", "field 'manifest'", "not valid JSON")]


def case_manifest_field(d):
    p = d / "partition.json"
    m = json.loads(p.read_text())
    del m["sample_shape"]
    p.write_text(json.dumps(m))
    return 2, [("partition.json", "ranks 0-1", "field 'sample_shape'", "missing")]


def case_nan_inf(d):
    for r, bad in ((0, np.inf), (1, np.nan)):
        with h5py.File(d / f"rank_{r:05d}.h5", "r+") as f:
            f["x"][0, 2] = bad
    return 2, [
        ("rank_00000.h5", "rank 0", "field 'x'", "NaN/Inf"),
        ("rank_00001.h5", "rank 1", "field 'x'", "NaN/Inf"),
    ]


CASES = [
    ("u8", case_missing_and_corrupt_header),
    ("u8", case_truncated),
    ("u8", case_flipped_bytes),
    ("u8", case_dtype_and_labels),
    ("u8", case_shape),
    ("u8", case_swapped),
    ("u8", case_test_mismatch),
    ("u8", case_world_size),
    ("u8", case_manifest_missing),
    ("u8", case_manifest_not_json),
    ("u8", case_manifest_field),
    ("f32", case_nan_inf),
]


@pytest.mark.parametrize("name,case", CASES, ids=[c.__name__[5:] for _, c in CASES])
def test_bad_partition_fails_fast_on_every_rank(base, tmp_path, name, case):
    d = copy(base, name, tmp_path)
    n, expected = case(d)
    proc, elapsed = load(n, d)
    assert proc.returncode != 0, proc.stdout
    assert "LOADED" not in proc.stdout  # no rank went on with a bad partition
    assert elapsed < FAST_S, f"took {elapsed:.1f}s"
    err = proc.stderr
    assert "Traceback" not in err, err
    assert err.count("invalid partition") == 1, err  # one message, from rank 0 only
    lines = err.splitlines()
    for parts in expected:
        # file, rank and field named together on one line
        assert any(all(p in line for p in parts) for line in lines), (parts, err)


def test_run_with_truncated_rank_file_exits_fast(tmp_path):
    """The training entry point on a 4-rank partition with one truncated file: non-zero exit
    within 30 s, naming the file, instead of three ranks waiting forever for the fourth."""
    d = tmp_path / "p4"
    build_partitions("digits", 4, "iid", 0, d)
    bad = d / "rank_00002.h5"
    bad.write_bytes(bad.read_bytes()[:1000])
    start = time.monotonic()
    proc = run_mpi(
        4,
        [
            *"-m disdl_mpi.run --data-dir".split(),
            str(d),
            *"--steps 1 --norm bn --out".split(),
            str(tmp_path / "out"),
            *"--progress none".split(),
        ],
        timeout=90,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout
    # 30 s is the bound asked for (about 5 s on an idle 2-core machine, mostly 4 torch
    # imports). When neighbours oversubscribe the CPUs several times over, start-up alone can
    # exceed it; then only the hang guard applies (run_mpi's 90 s timeout fails a hung job).
    overloaded = os.getloadavg()[0] > 3 * (os.cpu_count() or 1)
    assert elapsed < (85 if overloaded else 30), f"took {elapsed:.1f}s"
    assert any(
        "rank_00002.h5" in line and "rank 2" in line and "field 'file'" in line
        for line in proc.stderr.splitlines()
    ), proc.stderr


def test_empty_rank_loads_when_allowed(tmp_path):
    """--min-per-rank 0 may leave a rank with no samples; it must still load (and hash)."""
    d = tmp_path / "empty"
    m = build_partitions(
        "synthetic", 2, "iid", 0, d, min_per_rank=0, num_samples=1, num_test=4, shape=(1, 2, 2), num_classes=2
    )
    assert sorted(m["sizes"]) == [0, 1]
    proc, _ = load(2, d)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"sizes={m['sizes']}") == 2


def test_a_shard_of_the_test_set_is_checked_whole_and_kept_in_part(tmp_path, monkeypatch):
    """_read_rows keeps rows [lo, hi) but hashes and checks every row, in bounded blocks."""
    from disdl_mpi.data import partition_io
    from disdl_mpi.data.layout import ContentHash

    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 3, 4, 4)).astype(np.float32)
    x[2, 0, 0, 0] = np.nan  # outside the kept rows: must still be found
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:
        f["x"] = x
    monkeypatch.setattr(partition_io, "_READ_BLOCK_BYTES", 5 * 3 * 4 * 4 * 4)  # 5 rows a block
    whole = ContentHash()
    whole.add_x(x)
    with h5py.File(path, "r") as f:
        h = ContentHash()
        kept, bad = partition_io._read_rows(f["x"], (11, 23), h)
    assert np.array_equal(kept, x[11:23], equal_nan=True) and bad == 1
    y = np.arange(37)
    assert h.finish(y) == whole.finish(y)


@pytest.mark.mpi
def test_ranks_hold_their_test_shard_and_score_it_as_before(base, tmp_path):
    """bn's accuracy is the same whether the ranks hold the whole test set (fedbn in the run
    needs it) or only their shard; the shard is what a rank loads otherwise."""
    from disdl_mpi.data.layout import shard_bounds

    data = base / "u8"
    acc = {}
    for name, norms in (("shard", "bn"), ("whole", "bn,fedbn")):
        out = tmp_path / name
        run_mpi(
            2,
            [
                *"-m disdl_mpi.run --data-dir".split(),
                str(data),
                "--norm",
                norms,
                *"--steps 6 --out".split(),
                str(out),
            ],
            timeout=180,
            check=True,
        )
        runs = json.loads((out / "summary.json").read_text())["runs"]
        acc[name] = next(r["test_accuracy"] for r in runs if r["norm"] == "bn")
    assert acc["shard"] == acc["whole"]
    code = (
        "import sys; from mpi4py import MPI; from disdl_mpi.data.partition_io import "
        "load_partition; d = load_partition(MPI.COMM_WORLD, sys.argv[1], test_shard=True); "
        "print('rows', MPI.COMM_WORLD.Get_rank(), d.test.rows, len(d.test.x), len(d.test.y), "
        "d.test.total, flush=True)"
    )
    proc = run_mpi(2, ["-c", code, str(data)], timeout=60, check=True)
    n = json.loads((data / "partition.json").read_text())["test"]["size"]
    held = sorted(line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("rows "))
    for r, (rank, rest) in enumerate(held):
        lo, hi = shard_bounds(n, r, 2)
        assert rank == str(r) and rest == f"({lo}, {hi}) {hi - lo} {hi - lo} {n}", held
