"""End-to-end runs of the main job under a real mpiexec."""
from __future__ import annotations

import json
import time

import pytest

from tests.mpi_helpers import run_mpi

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def digits_partitions(tmp_path_factory):
    """Default-style digits partitions (Dirichlet 0.1) for 1, 2 and 4 ranks."""
    from data_prep.partition import build_partitions
    base = tmp_path_factory.mktemp("parts")
    dirs = {}
    for n in (1, 2, 4):
        dirs[n] = base / f"n{n}"
        build_partitions("digits", n, "dirichlet:0.1", 0, dirs[n])
    return dirs


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_run_writes_sane_summary(ranks, digits_partitions, tmp_path):
    out = tmp_path / "out"
    proc = run_mpi(ranks, ["-m", "disdl_mpi.run", "--data-dir", str(digits_partitions[ranks]),
                           "--norm", "bn,gn,none", "--epochs", "2", "--out", str(out),
                           "--save-model"], timeout=180, check=True)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["norm"] for r in summary["runs"]] == ["bn", "gn", "none"]
    for rec in summary["runs"]:
        assert rec["world_size"] == ranks
        assert rec["epochs"] == 2 and rec["steps"] > 0
        assert 0.0 <= rec["test_accuracy"] <= 1.0
        assert rec["samples_per_s"] > 0
        assert rec["phases"]["compute"] > 0 and rec["phases"]["comm"] >= 0
        assert rec["dataset"] == "digits" and rec["partition"].startswith("dirichlet")
        assert "MPICH" in rec["mpi_library"] or rec["mpi_library"]
        assert (out / rec["norm"] / "metrics.csv").read_text().startswith("epoch,")
        assert (out / rec["norm"] / "model.pt").exists()
    # After two epochs on digits every scheme beats chance (10 classes) by a wide margin.
    assert max(r["test_accuracy"] for r in summary["runs"]) > 0.5
    assert (out / "summary.md").exists() and (out / "summary.csv").exists()
    # Only rank 0 prints the final table, exactly once.
    assert proc.stdout.count("test_acc") == 1


def test_run_builds_missing_partition(tmp_path):
    """Rank 0 builds the default partition while the others wait."""
    data = tmp_path / "built"
    proc = run_mpi(2, ["-m", "disdl_mpi.run", "--data-dir", str(data), "--norm", "gn",
                       "--steps", "3", "--out", str(tmp_path / "o")], timeout=120, check=True)
    manifest = json.loads((data / "partition.json").read_text())
    assert manifest["world_size"] == 2 and manifest["scheme"].startswith("dirichlet")
    assert sorted(p.name for p in data.glob("rank_*.h5")) == ["rank_00000.h5", "rank_00001.h5"]
    assert "building partition" in proc.stdout


CRASH_ON_RANK_1 = """
import sys
import disdl_mpi.run as run
from disdl_mpi.step import summed_cross_entropy
from disdl_mpi.trainer import TrainHooks
from mpi4py import MPI
def failing(logits, labels):
    if MPI.COMM_WORLD.Get_rank() == 1:
        raise RuntimeError("injected failure on rank 1")
    return summed_cross_entropy(logits, labels)
sys.exit(run.main(sys.argv[1:], hooks=TrainHooks(loss_fn=failing)))
"""


def test_exception_on_one_rank_aborts_job_fast(digits_partitions, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_ON_RANK_1)
    start = time.monotonic()
    proc = run_mpi(4, [str(script), "--data-dir", str(digits_partitions[4]), "--norm", "gn",
                       "--epochs", "50", "--out", str(tmp_path / "o")], timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "[rank 1]" in proc.stderr and "injected failure on rank 1" in proc.stderr
    assert elapsed < 45, f"job took {elapsed:.1f}s to die"


def test_bad_config_is_reported_once_before_training(tmp_path):
    proc = run_mpi(2, ["-m", "disdl_mpi.run", "--norm", "bogus", "--lr", "-1",
                       "--out", str(tmp_path / "o")], timeout=60)
    assert proc.returncode != 0
    err = proc.stderr
    assert err.count("unknown scheme 'bogus'") == 1
    assert "--lr must be positive" in err
    assert "epoch" not in proc.stdout
