"""bench.studies.scaling end to end: real mpiexec jobs at 1 and 2 ranks, tables, plots, resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.mpi_helpers import ROOT, mpi_env
from tests.output_checks import is_png

pytestmark = pytest.mark.mpi


def scaling(out, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "bench.studies.scaling",
        "--ranks",
        "1",
        "2",
        "--norm",
        "gn,none",
        "--mode",
        "weak",
        "--model",
        "mlp",
        "--steps",
        "3",
        "--batch-per-rank",
        "16",
        "--cores",
        "1",
        "--run-args",
        "--threads 1",
        "--timeout",
        "300",
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=mpi_env())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    proc = scaling(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_writes_table_and_plots(sweep):
    out, proc = sweep
    rows = list(csv.DictReader((out / "scaling.csv").open()))
    assert [(r["ranks"], r["norm"]) for r in rows] == [("1", "gn"), ("1", "none"), ("2", "gn"), ("2", "none")]
    for r in rows:
        assert float(r["samples_per_s"]) > 0 and r["mode"] == "weak"
        assert 0.0 <= float(r["comm_fraction"]) < 1.0
        assert float(r["step_s"]) > 0 and float(r["forward_s"]) > 0
        assert r["imbalance_method"] == "barrier-probe"
    # weak scaling: global batch = 16 per rank x ranks; speedup/efficiency vs 1 rank
    assert {r["ranks"]: r["global_batch_size"] for r in rows} == {"1": "16", "2": "32"}
    base = {r["norm"]: float(r["samples_per_s"]) for r in rows if r["ranks"] == "1"}
    for r in rows:
        want = float(r["samples_per_s"]) / base[r["norm"]]
        assert float(r["speedup"]) == pytest.approx(want, rel=1e-3)
        assert float(r["efficiency"]) == pytest.approx(want / int(r["ranks"]), rel=1e-3)
    # --cores 1: the 2-rank points are flagged as oversubscribed in the table and notes
    assert [r["oversubscribed"] for r in rows] == ["0", "0", "1", "1"]
    md = (out / "scaling.md").read_text()
    assert "oversubscribed: 2 ranks on 1 cores" in md and "| 2 (oversubscribed) | gn |" in md
    assert is_png(out / "scaling.png") and is_png(out / "breakdown.png")
    assert sorted(p.name for p in (out / "points").glob("*.json")) == ["n1.json", "n2.json"]
    assert "[" in proc.stdout and "n2: ok" in proc.stdout  # plain progress lines (no TTY)


def test_rerun_resumes_without_running_jobs(sweep):
    """All points stored: a rerun launches nothing and rebuilds the outputs from the store.

    (Partial resume, stale settings and failures are covered without MPI in
    test_studies_engine.py.)"""
    out, _ = sweep
    (out / "scaling.csv").unlink()
    log_mtime = (out / "logs" / "n2.log").stat().st_mtime_ns
    proc = scaling(out, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: 2 of 2 point(s) already done, 0 to run" in proc.stdout
    assert "start n" not in proc.stdout
    assert (out / "logs" / "n2.log").stat().st_mtime_ns == log_mtime
    assert len(list(csv.DictReader((out / "scaling.csv").open()))) == 4
    summary = json.loads((out / "scaling.json").read_text())
    assert summary["mode"] == "weak" and summary["machine"]["mpi_library"]


def test_partition_follows_the_seed_and_a_foreign_one_is_refused(tmp_path):
    """The data folder of a point is named by every setting that shapes it: another --seed
    builds another partition, never reuses the old one; a folder of that name holding a
    partition built otherwise is refused (the bug: the seed was left out of the name)."""
    from bench.studies.scaling import build_parser, data_dir, prepare_partition

    out = tmp_path / "s"
    args0 = build_parser().parse_args(["--ranks", "2", "--seed", "0", "--out", str(out)])
    args1 = build_parser().parse_args(["--ranks", "2", "--seed", "1", "--out", str(out)])
    d0, d1 = data_dir(args0, 2), data_dir(args1, 2)
    assert d0 != d1
    prepare_partition(args0, 2)
    prepare_partition(args1, 2)
    m0 = json.loads((d0 / "partition.json").read_text())
    m1 = json.loads((d1 / "partition.json").read_text())
    assert (m0["seed"], m1["seed"]) == (0, 1) and m0["ranks"] != m1["ranks"]
    # A folder with the seed-0 name that holds the seed-1 partition: refused, by the CLI too.
    (d0 / "partition.json").write_text((d1 / "partition.json").read_text())
    proc = scaling(out, "--seed", "0", "--ranks", "2", "--norm", "gn", timeout=120)
    assert proc.returncode == 2
    assert "field 'seed' is 1, the request has 0" in proc.stderr
    assert str(d0 / "partition.json") in proc.stderr
    assert not (out / "runs").exists()


def test_virtual_ranks_are_refused_before_any_job(tmp_path, capsys):
    from bench.studies.scaling import main

    assert main(["--ranks", "2", "--out", str(tmp_path / "s"), "--run-args", "--virtual-ranks 4"]) == 2
    err = capsys.readouterr().err
    assert "--virtual-ranks 4" in err and "per rank" in err
    assert not (tmp_path / "s" / "runs").exists()
