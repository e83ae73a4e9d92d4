"""The accuracy study driver (bench.accuracy): outputs, resume, determinism, bad input.

The study launches real ``mpiexec -n 2`` jobs of ``disdl_mpi.run`` on the embedded digits data;
settings are tiny (2 epochs of a few large steps) so the whole file stays well under a minute
of training on a 2-core machine.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.mpi_helpers import ROOT, mpi_env

# 2 ranks, 2 epochs of 3 steps: enough to beat chance clearly, small enough to be quick.
TINY = ["--ranks", "2", "--epochs", "2", "--run-args", "--global-batch-size 512",
        "--progress", "lines", "--timeout", "120"]


def study(out, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m bench.accuracy`` as a user would, with a hard timeout."""
    return subprocess.run([sys.executable, "-m", "bench.accuracy", *TINY, "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT), env=mpi_env())


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def png_ok(path) -> tuple[int, ...]:
    """The file is a real PNG that decodes to a non-empty image; returns its shape."""
    import matplotlib.image as mpimg
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img)) > 0.01, f"{path} is blank"
    return img.shape


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """One --quick study: 2 schemes x 2 skews x 1 seed = 2 MPI jobs."""
    out = tmp_path_factory.mktemp("acc") / "study"
    proc = study(out, "--quick", "--norm", "bn,gn", "--skew", "iid", "dirichlet:0.1",
                 "--seeds", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.mpi
def test_quick_study_writes_all_outputs(quick_study):
    out, proc = quick_study
    rows = read_rows(out / "accuracy.csv")
    assert [(r["norm"], r["skew"], r["seed"]) for r in rows] == [
        ("bn", "iid", "0"), ("gn", "iid", "0"), ("bn", "dirichlet:0.1", "0"),
        ("gn", "dirichlet:0.1", "0")]
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert r["epochs"] == "2" and float(r["wall_s"]) > 0 and r["ranks"] == "2"
    # IID after 2 epochs is far above chance (10 classes).
    assert max(float(r["test_accuracy"]) for r in rows if r["skew"] == "iid") > 0.3
    # The measured skew orders the partitions: Dirichlet 0.1 is far from IID.
    tv = {r["skew"]: float(r["label_skew_tv"]) for r in rows}
    assert tv["dirichlet:0.1"] > tv["iid"] + 0.2
    md = (out / "accuracy.md").read_text()
    bn_iid = next(float(r["test_accuracy"]) for r in rows
                  if (r["norm"], r["skew"]) == ("bn", "iid"))
    assert f"IID-BatchNorm reference ({100 * bn_iid:.1f} %" in md
    for name in ("| bn |", "| gn |", "iid", "dirichlet:0.1", "±", "train_s"):
        assert name in md
    png_ok(out / "accuracy.png")
    png_ok(out / "curves.png")
    points = json.loads((out / "points.json").read_text())["points"]
    assert all(len(p["curve"]) == 2 for p in points)
    assert "[job 2/2]" in proc.stdout and "4/4 points done" in proc.stdout


@pytest.mark.mpi
def test_rerun_skips_done_points_and_trains_only_missing_schemes(quick_study, tmp_path):
    src, _ = quick_study
    out = tmp_path / "study"
    shutil.copytree(src, out)
    before = (out / "accuracy.csv").read_text()
    again = study(out, "--quick", "--norm", "bn,gn", "--skew", "iid", "dirichlet:0.1",
                  "--seeds", "1")
    assert again.returncode == 0, again.stderr
    assert "4 already done, 0 job(s) to run" in again.stdout
    assert not list(out.glob("runs/*/a1")), "a done point was launched again"
    assert (out / "accuracy.csv").read_text() == before
    # Adding a scheme launches one job per (skew, seed) with only that scheme.
    more = study(out, "--quick", "--norm", "bn,gn,none", "--skew", "iid", "--seeds", "1")
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-2000:]
    assert "2 already done, 1 job(s) to run" in more.stdout
    job = json.loads((out / "runs" / "iid-s0" / "a1" / "job.json").read_text())
    assert job["norms"] == ["none"]
    rows = read_rows(out / "accuracy.csv")
    assert [r["norm"] for r in rows] == ["bn", "gn", "none"]
    old = {r["norm"]: r["test_accuracy"] for r in read_rows(src / "accuracy.csv")
           if r["skew"] == "iid"}
    assert {r["norm"]: r["test_accuracy"] for r in rows if r["norm"] != "none"} == old


@pytest.mark.mpi
def test_same_seed_and_world_size_give_identical_accuracy(quick_study, tmp_path):
    src, _ = quick_study
    proc = study(tmp_path / "again", "--quick", "--norm", "bn,gn", "--skew", "dirichlet:0.1",
                 "--seeds", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first = {p["norm"]: p for p in json.loads((src / "points.json").read_text())["points"]
             if p["skew"] == "dirichlet:0.1"}
    second = {p["norm"]: p for p in
              json.loads((tmp_path / "again" / "points.json").read_text())["points"]}
    assert set(first) == set(second) == {"bn", "gn"}
    for norm in first:
        # Exact equality: every epoch's test accuracy, not only the last.
        assert second[norm]["curve"] == first[norm]["curve"], norm
        assert second[norm]["test_accuracy"] == first[norm]["test_accuracy"], norm


def test_dry_run_plans_quick_defaults(tmp_path):
    proc = study(tmp_path / "s", "--quick", "--dry-run", timeout=60)
    assert proc.returncode == 0, proc.stderr
    planned = [ln for ln in proc.stdout.splitlines() if ln.startswith("would run:")]
    # --quick: 1 seed x the 2 quick skews, every registered scheme in one job each.
    assert [ln.split(":")[1].strip() for ln in planned] == ["iid-s0", "dirichlet-0.1-s0"]
    from disdl_mpi.norms import available_norms
    assert planned[0].split(": ")[2].split(" (")[0] == ",".join(available_norms())
    assert not (tmp_path / "s" / "runs").exists()


@pytest.mark.parametrize("extra, message", [
    (["--norm", "bn,bogus"], "unknown scheme 'bogus'"),
    (["--skew", "dirichlet:-1"], "--skew"),
    (["--launcher", "mpiexec -np 2"], "has no '{n}'"),
    (["--run-args", "--seed 3"], "must not set --seed"),
    (["--skew", "shards:2"], "shards:2"),  # 2 ranks x 2 classes cannot cover 10 classes
])
def test_bad_input_fails_before_any_job(tmp_path, extra, message):
    proc = study(tmp_path / "s", *extra, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "s").glob("runs/*/a*"))


def test_failed_and_hung_jobs_are_reported_not_waited_for(tmp_path):
    # A launcher that exits 1 and one that hangs (killed by --timeout): the study goes on,
    # reports each job with its log, and exits non-zero.
    failing = study(tmp_path / "f", "--norm", "gn", "--skew", "iid", "--seeds", "1",
                    "--launcher", "false {n}", timeout=60)
    assert failing.returncode == 1 and "exit code 1" in failing.stderr
    assert (tmp_path / "f" / "runs" / "iid-s0" / "a0" / "log.txt").exists()
    hung = study(tmp_path / "h", "--norm", "gn", "--skew", "iid", "--seeds", "1",
                 "--launcher", "bash -c 'sleep 60' {n}", "--timeout", "2", timeout=60)
    assert hung.returncode == 1 and "timed out after 2 s" in hung.stderr


def test_label_skew_and_summary_statistics():
    from bench.accuracy import label_skew_tv
    from bench.accuracy_report import mean_std, strongest_skew
    iid = {"ranks": [{"class_counts": [5, 5]}, {"class_counts": [5, 5]}]}
    disjoint = {"ranks": [{"class_counts": [10, 0]}, {"class_counts": [0, 10]}]}
    assert label_skew_tv(iid) == 0.0
    assert label_skew_tv(disjoint) == pytest.approx(0.5)
    m, s, n = mean_std([0.5, 0.7, 0.9])
    assert (m, n) == (pytest.approx(0.7), 3) and s == pytest.approx(0.2)
    rows = [{"skew": "a", "label_skew_tv": 0.1}, {"skew": "b", "label_skew_tv": 0.6},
            {"skew": "c", "label_skew_tv": 0.4}]
    assert strongest_skew(rows, ["a", "b", "c"]) == "b"
