"""The accuracy study driver (bench.studies.accuracy): outputs, resume, determinism, bad input.

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
import time

import numpy as np
import pytest

from tests.mpi_helpers import ROOT, mpi_env

# 2 ranks, 2 epochs of 12 steps: enough to beat chance clearly, small enough to be quick.
TINY = ["--ranks", "2", "--epochs", "2", "--progress", "lines", "--timeout", "180"]


def study(out, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m bench.studies.accuracy`` as a user would, with a hard timeout."""
    return subprocess.run(
        [sys.executable, "-m", "bench.studies.accuracy", *TINY, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=mpi_env(),
    )


def study_here(capsys, out, *extra: str) -> tuple[int, str, str]:
    """The driver in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from bench.studies.accuracy import main

    rc = main([*TINY, "--out", str(out), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


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
    proc = study(out, "--quick", "--norm", "bn,gn", "--partition", "iid", "dirichlet:0.1", "--seeds", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.mpi
def test_quick_study_writes_all_outputs(quick_study):
    out, proc = quick_study
    rows = read_rows(out / "accuracy.csv")
    assert [(r["norm"], r["skew"], r["seed"]) for r in rows] == [
        ("bn", "iid", "0"),
        ("gn", "iid", "0"),
        ("bn", "dirichlet:0.1", "0"),
        ("gn", "dirichlet:0.1", "0"),
    ]
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert r["epochs"] == "2" and float(r["wall_s"]) > 0 and r["ranks"] == "2"
    # IID after 2 epochs is far above chance (10 classes).
    assert max(float(r["test_accuracy"]) for r in rows if r["skew"] == "iid") > 0.3
    # The measured skew orders the partitions: Dirichlet 0.1 is far from IID.
    tv = {r["skew"]: float(r["label_skew_tv"]) for r in rows}
    assert tv["dirichlet:0.1"] > tv["iid"] + 0.2
    md = (out / "accuracy.md").read_text()
    bn_iid = next(float(r["test_accuracy"]) for r in rows if (r["norm"], r["skew"]) == ("bn", "iid"))
    assert f"IID-BatchNorm reference ({100 * bn_iid:.1f} %" in md
    for name in ("| bn |", "| gn |", "iid", "dirichlet:0.1", "±", "train_s"):
        assert name in md
    png_ok(out / "accuracy.png")
    png_ok(out / "curves.png")
    png_ok(out / "gap.png")
    points = json.loads((out / "points.json").read_text())["points"]
    assert all(len(p["curve"]) == 2 for p in points)
    assert "[job 2/2]" in proc.stdout and "4/4 points done" in proc.stdout


@pytest.mark.mpi
def test_rerun_skips_done_points(quick_study, tmp_path, capsys):
    src, _ = quick_study
    out = tmp_path / "study"
    shutil.copytree(src, out)
    before = (out / "accuracy.csv").read_text()
    rc, stdout, stderr = study_here(
        capsys, out, *"--quick --norm bn,gn --partition iid dirichlet:0.1 --seeds 1".split()
    )
    assert rc == 0, stderr
    assert "4 already done, 0 job(s) to run" in stdout
    assert not list(out.glob("runs/*/a1")), "a done point was launched again"
    assert (out / "accuracy.csv").read_text() == before
    # Other settings (more epochs) make the old points stale: all would be retrained.
    rc, stdout, _ = study_here(
        capsys,
        out,
        *"--quick --norm bn,gn --partition iid dirichlet:0.1 --seeds 1".split(),
        *"--epochs 3 --dry-run".split(),
    )
    assert "0 already done, 2 job(s) to run" in stdout


@pytest.mark.mpi
def test_interrupted_job_resumes_its_missing_scheme_with_identical_result(quick_study, tmp_path, capsys):
    """A job killed after its first scheme leaves summary.json (and the study's point store)
    with that scheme only; the rerun trains just the missing one, and (same seed, same world
    size) gets the very same accuracy, epoch by epoch, as the uninterrupted run did."""
    src, _ = quick_study
    out = tmp_path / "study"
    shutil.copytree(src, out)
    summary_path = out / "runs" / "dirichlet-0.1-s0" / "a0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    original = {r["norm"]: r for r in summary["runs"]}
    summary["runs"] = [r for r in summary["runs"] if r["norm"] == "bn"]
    summary_path.write_text(json.dumps(summary))
    # ... and the study's store holds no point for the scheme the killed job never finished.
    (out / "points" / "gn@dirichlet-0.1-s0.json").unlink()
    rc, stdout, stderr = study_here(
        capsys, out, *"--quick --norm bn,gn --partition iid dirichlet:0.1 --seeds 1".split()
    )
    assert rc == 0, stdout[-2000:] + stderr[-2000:]
    assert "3 already done, 1 job(s) to run" in stdout
    job = json.loads((summary_path.parent.parent / "a1" / "job.json").read_text())
    assert job["norms"] == ["gn"]
    assert "code" in job  # the commit that produced the result (None outside git)
    rerun = json.loads((summary_path.parent.parent / "a1" / "summary.json").read_text())
    assert [r["norm"] for r in rerun["runs"]] == ["gn"]
    # Exact equality, every epoch: two runs with the same seed and world size agree.
    got = [e["test_accuracy"] for e in rerun["runs"][0]["epochs_log"]]
    want = [e["test_accuracy"] for e in original["gn"]["epochs_log"]]
    assert got == want and len(got) == 2
    rows = {(r["norm"], r["skew"]): r["test_accuracy"] for r in read_rows(out / "accuracy.csv")}
    assert rows == {(r["norm"], r["skew"]): r["test_accuracy"] for r in read_rows(src / "accuracy.csv")}


def test_dry_run_plans_quick_defaults(tmp_path, capsys):
    rc, stdout, stderr = study_here(capsys, tmp_path / "s", "--quick", "--dry-run")
    assert rc == 0, stderr
    planned = [ln for ln in stdout.splitlines() if ln.startswith("would run:")]
    # --quick: 1 seed x the 2 quick skews, every registered scheme in one job each.
    assert [ln.split(":")[1].strip() for ln in planned] == ["iid-s0", "dirichlet-0.1-s0"]
    from disdl_mpi.norms import available_schemes

    assert planned[0].split(": ")[2].split(" (")[0] == ",".join(available_schemes())
    assert not (tmp_path / "s" / "runs").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--norm", "bn,bogus"], "unknown scheme 'bogus'"),
        (["--partition", "dirichlet:-1"], "--partition"),
        (["--skew", "dirichlet:-1"], "--skew"),  # the deprecated spelling is named as typed
        (["--launcher", "mpiexec -np 2"], "has no '{n}'"),
        (["--run-args", "--seed 3"], "must not set --seed"),
        (["--partition", "shards:2"], "shards:2"),  # 2 ranks x 2 classes cannot cover 10 classes
        (["--virtual-ranks", "3"], "--virtual-ranks 3 must be >= 1 and divide --ranks 2"),
        (["--run-args", "--virtual-ranks 2"], "must not set --virtual-ranks"),
    ],
)
def test_bad_input_fails_before_any_job(tmp_path, capsys, extra, message):
    rc, _, stderr = study_here(capsys, tmp_path / "s", *extra)
    assert rc == 2
    assert message in stderr and "Traceback" not in stderr
    assert not list((tmp_path / "s").glob("runs/*/a*"))


def test_failed_and_hung_jobs_are_reported_not_waited_for(tmp_path, capsys):
    # A launcher that exits 1 and one that hangs (killed by --timeout): the study goes on,
    # reports each job with its log, and exits non-zero.
    rc, _, err = study_here(
        capsys, tmp_path / "f", *"--norm gn --partition iid --seeds 1 --launcher".split(), "false {n}"
    )
    assert rc == 1 and "exit code 1" in err
    assert (tmp_path / "f" / "runs" / "iid-s0" / "a0" / "log.txt").exists()
    start = time.monotonic()
    rc, _, err = study_here(
        capsys,
        tmp_path / "h",
        *"--norm gn --partition iid --seeds 1 --launcher".split(),
        "bash -c 'sleep 60' {n}",
        *"--timeout 2".split(),
    )
    assert rc == 1 and "timed out after 2 s" in err
    assert time.monotonic() - start < 30


def test_label_skew_and_summary_statistics():
    from bench.studies.accuracy import label_skew_tv
    from bench.studies.accuracy_report import mean_std, strongest_skew

    iid = {"ranks": [{"class_counts": [5, 5]}, {"class_counts": [5, 5]}]}
    disjoint = {"ranks": [{"class_counts": [10, 0]}, {"class_counts": [0, 10]}]}
    assert label_skew_tv(iid) == 0.0
    assert label_skew_tv(disjoint) == pytest.approx(0.5)
    m, s, n = mean_std([0.5, 0.7, 0.9])
    assert (m, n) == (pytest.approx(0.7), 3) and s == pytest.approx(0.2)
    rows = [
        {"skew": "a", "label_skew_tv": 0.1},
        {"skew": "b", "label_skew_tv": 0.6},
        {"skew": "c", "label_skew_tv": 0.4},
    ]
    assert strongest_skew(rows, ["a", "b", "c"]) == "b"


@pytest.mark.parametrize(
    "cifar_dir, message",
    [(None, "set CIFAR_DIR"), ("/nonexistent-cifar", "has neither cifar-10-batches-py/")],
)
def test_cifar_sbatch_refuses_missing_data_before_any_work(tmp_path, cifar_dir, message):
    """The GPU-scale script checks the user-supplied data first (it cannot run here: no GPU,
    no CIFAR-10 files); run as a plain script with the variables sbatch would set."""
    env = {k: v for k, v in mpi_env().items() if k != "CIFAR_DIR"}
    env.update(SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=str(tmp_path), DISDL_HOME=str(ROOT))
    if cifar_dir:
        env["CIFAR_DIR"] = cifar_dir
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / "cifar10_resnet20.sbatch")],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "results").exists()


def test_markdown_time_table_has_every_scheme_and_domain_table():
    from bench.studies.accuracy_report import markdown

    rows = [
        {
            "norm": n,
            "skew": s,
            "seed": 0,
            "test_accuracy": a,
            "label_skew_tv": 0.1,
            "train_s": t,
            "wall_s": t + 1,
            "comm_s": 1.0,
            "compute_s": 3.0,
            "domain_accuracy_mean": 0.5 if s == "feature:mixed" else None,
        }
        for n, t in (("bn", 2.0), ("fedbn", 3.0))
        for s, a in (("iid", 0.9), ("feature:mixed", 0.7))
    ]
    md = markdown(rows, ["bn", "fedbn"], ["iid", "feature:mixed"], {"ranks": 2, "dataset": "d", "model": "m"})
    assert "| bn | 2.0 | 1.00 | 3.0 | 25 % |" in md and "| fedbn | 3.0 | 1.50 | 4.0 | 25 % |" in md
    assert "OWN domain" in md and "| fedbn | 50.0 ± 0.0 |" in md


def test_time_to_accuracy_and_gap_heatmap(tmp_path):
    from bench.studies.accuracy_plots import gap_heatmap
    from bench.studies.accuracy_report import markdown, time_to_accuracy

    rows = [
        {
            "norm": n,
            "skew": s,
            "seed": seed,
            "test_accuracy": c[-1],
            "label_skew_tv": 0.1,
            "train_s": 1.0,
            "wall_s": 2.0,
            "comm_s": 0.1,
            "compute_s": 0.9,
            "curve": c,
            "curve_wall_s": [10.0 * (i + 1) + seed for i in range(len(c))],
        }
        for n, s, c in (
            ("bn", "iid", [0.5, 0.8, 0.9]),
            ("bn", "shards:2", [0.3, 0.4, 0.5]),
            ("gn", "iid", [0.7, 0.85, 0.88]),
            ("gn", "shards:2", [0.6, 0.7, 0.86]),
        )
        for seed in (0, 1)
    ]
    reach = time_to_accuracy(rows, 0.8)
    assert reach[("bn", "iid")] == [(2, 20.0), (2, 21.0)]
    assert reach[("bn", "shards:2")] == [None, None]
    assert reach[("gn", "shards:2")] == [(3, 30.0), (3, 31.0)]
    md = markdown(
        rows,
        ["bn", "gn"],
        ["iid", "shards:2"],
        {"ranks": 2, "dataset": "d", "model": "m", "target_accuracy": 0.8},
    )
    assert "Time to 80 % test accuracy" in md
    assert "| bn | epoch 2.0, 20 s (2/2) | not reached (0/2) |" in md
    gap_heatmap(tmp_path / "gap.png", rows, ["bn", "gn"], ["iid", "shards:2"], "gap")
    png_ok(tmp_path / "gap.png")
    # Without the IID-BN reference there is no gap to draw.
    gap_heatmap(
        tmp_path / "none.png", [r for r in rows if r["norm"] == "gn"], ["gn"], ["iid", "shards:2"], "gap"
    )
    assert not (tmp_path / "none.png").exists()


def test_a_study_of_four_isolated_ranks_on_two_processes(tmp_path, capsys):
    """--virtual-ranks 2 with --ranks 4: jobs of 2 processes, each carrying 2 isolated ranks."""
    out = tmp_path / "s"
    rc, stdout, stderr = study_here(
        capsys,
        out,
        "--ranks",
        "4",
        "--virtual-ranks",
        "2",
        "--norm",
        "bn,syncbn",
        "--partition",
        "iid",
        "--seeds",
        "1",
        "--epochs",
        "1",
    )
    assert rc == 0, stderr
    points = json.loads((out / "points.json").read_text())
    assert points["header"]["processes"] == "2 x 2 virtual ranks"
    assert "--virtual-ranks" not in points["header"]["run_args"]  # a layout, not a fingerprint
    assert points["header"]["layouts"] == "2 points at 2 x 2 (processes x ranks each)"
    assert {(p["processes"], p["virtual_ranks"]) for p in points["points"]} == {(2, 2)}
    recs = [json.loads(p.read_text())["record"] for p in sorted((out / "points").glob("*.json"))]
    assert {(r["world_size"], r["processes"], r["virtual_ranks"]) for r in recs} == {(4, 2, 2)}
    log = next((out / "runs").glob("iid-s0/a*/log.txt")).read_text()
    assert "-n 2 " in log and "4 isolated ranks as 2 process(es) x 2 virtual ranks" in log
    assert "processes: 2 x 2 virtual ranks" in (out / "accuracy.md").read_text()


def test_points_are_shared_by_layouts_and_recovered_from_a_killed_driver(tmp_path, capsys):
    """A point made by 2 MPI processes is reused by a study of 1 process x 2 virtual ranks (the
    same training), and one whose driver died before storing it is recovered from its attempt."""
    out = tmp_path / "s"
    common = ["--ranks", "2", "--norm", "bn", "--partition", "iid", "--seeds", "1", "--epochs", "1"]
    rc, _, stderr = study_here(capsys, out, *common)
    assert rc == 0, stderr
    (point,) = (out / "points").glob("*.json")
    acc = json.loads(point.read_text())["record"]["test_accuracy"]
    point.unlink()  # as if the driver had been killed before it stored the point
    rc, stdout, stderr = study_here(capsys, out, *common, "--virtual-ranks", "2")
    assert rc == 0, stderr
    assert "1 already done, 0 job(s) to run" in stdout, stdout
    assert json.loads(point.read_text())["record"]["test_accuracy"] == acc
    assert len(list((out / "runs" / "iid-s0").glob("a*"))) == 1  # nothing retrained
    assert "1 points at 2 x 1" in (out / "accuracy.md").read_text()
