"""End-to-end runs of the main job under a real mpiexec."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from disdl_mpi.comm.world import mpi_library
from tests.mpi_helpers import run_job, run_mpi

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def digits_partitions(digits_partition):
    """Default-style digits partitions (Dirichlet 0.1) for 1, 2 and 4 ranks."""
    return {n: digits_partition(n) for n in (1, 2, 4)}


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_run_writes_sane_summary(ranks, digits_partitions, tmp_path):
    out = tmp_path / "out"
    proc = run_mpi(
        ranks,
        [
            *"-m disdl_mpi.run --data-dir".split(),
            str(digits_partitions[ranks]),
            *"--norm bn,gn,none --epochs 2 --out".split(),
            str(out),
            "--save-model",
        ],
        timeout=180,
        check=True,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [r["norm"] for r in summary["runs"]] == ["bn", "gn", "none"]
    for rec in summary["runs"]:
        assert rec["world_size"] == ranks
        assert rec["epochs"] == 2 and rec["steps"] > 0
        assert 0.0 <= rec["test_accuracy"] <= 1.0
        assert rec["samples_per_s"] > 0
        assert rec["phases"]["compute"] > 0 and rec["phases"]["comm"] >= 0
        assert rec["dataset"] == "digits" and rec["partition"].startswith("dirichlet")
        # the library the job ran on, as this process (same MPI4PY_LIBMPI) names it
        assert rec["mpi_library"] == mpi_library() and rec["mpi_library"] != "unknown MPI"
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
    proc = run_job(data, "--norm gn --steps 3", tmp_path / "o", check=True)
    manifest = json.loads((data / "partition.json").read_text())
    assert manifest["world_size"] == 2 and manifest["scheme"].startswith("dirichlet")
    assert sorted(p.name for p in data.glob("rank_*.h5")) == ["rank_00000.h5", "rank_00001.h5"]
    assert "building partition" in proc.stdout


def test_exception_on_one_rank_aborts_job_fast(digits_partitions, tmp_path):
    start = time.monotonic()
    proc = run_mpi(
        4,
        [
            *"-m tests.mpi_programs.crash_on_rank1 --data-dir".split(),
            str(digits_partitions[4]),
            *"--norm gn --epochs 50 --out".split(),
            str(tmp_path / "o"),
        ],
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "[rank 1 on " in proc.stderr and "injected failure on rank 1" in proc.stderr
    assert elapsed < 45, f"job took {elapsed:.1f}s to die"


def test_bad_config_is_reported_once_before_training(tmp_path):
    proc = run_mpi(
        2, ["-m", "disdl_mpi.run", "--norm", "bogus", "--lr", "-1", "--out", str(tmp_path / "o")], timeout=60
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert err.count("unknown scheme 'bogus'") == 1
    assert "--lr must be positive" in err
    assert "epoch" not in proc.stdout


def _on_a_terminal(cmd: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as its stdin/stdout/stderr, as typed at a prompt;
    returns (exit code, everything the terminal showed)."""
    import pty
    import select
    import subprocess

    from tests.mpi_helpers import ROOT, mpi_env

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd, stdin=slave, stdout=slave, stderr=slave, env=mpi_env(), cwd=str(ROOT), start_new_session=True
    )
    os.close(slave)
    shown, end = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return rc, shown.decode(errors="replace")


def test_progress_bar_on_a_terminal_lines_in_a_log_nothing_when_quiet(digits_partitions, tmp_path):
    """mpirun typed at a prompt shows a bar (the ranks' stdout is a pipe to the launcher,
    whose stdout is the terminal); the same run into a pipe logs one line per epoch;
    --progress none prints no progress at all."""
    from tests.mpi_helpers import mpi_command

    args = ["-m", "disdl_mpi.run", "--data-dir", str(digits_partitions[2]), "--norm", "gn", "--epochs", "2"]
    rc, shown = _on_a_terminal(mpi_command(2, [*args, "--out", str(tmp_path / "tty")]))
    assert rc == 0, shown[-3000:]
    if "Open MPI" in shown:
        # Its launcher forwards whole lines only, so a bar would never show: lines instead.
        assert "gn epoch   2/2  loss" in shown, shown[-3000:]
    else:
        assert re.search(r"\] (\d+)/\1 gn epoch 2/2", shown), shown[-3000:]  # a full bar
        assert "gn epoch   1/2  loss" not in shown
    piped = run_mpi(2, [*args, "--out", str(tmp_path / "pipe")], timeout=120, check=True)
    assert "gn epoch   1/2  loss" in piped.stdout and "gn epoch   2/2  loss" in piped.stdout
    assert not re.search(r"\] \d+/\d+ gn", piped.stdout)
    quiet = run_mpi(
        2, [*args, "--out", str(tmp_path / "quiet"), "--progress", "none"], timeout=120, check=True
    )
    assert "epoch" not in quiet.stdout and "test_acc" in quiet.stdout


def test_lr_schedule_and_time_to_accuracy_are_recorded(digits_partitions, tmp_path):
    out = tmp_path / "o"
    run_mpi(
        2,
        [
            *"-m disdl_mpi.run --data-dir".split(),
            str(digits_partitions[2]),
            *"--norm gn,bn-carry --epochs 3 --lr-schedule cosine".split(),
            *"--warmup-epochs 1 --target-accuracy 0.2 --out".split(),
            str(out),
        ],
        timeout=180,
        check=True,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lr_schedule"] == "cosine"
    for rec in summary["runs"]:
        assert rec["lr_schedule"] == "cosine" and rec["warmup_epochs"] == 1.0
        tta = rec["time_to_accuracy"]
        first = next(e for e in rec["epochs_log"] if e["test_accuracy"] >= 0.2)
        assert tta == {
            "target": 0.2,
            "epoch": first["epoch"],
            "step": first["step"],
            "train_s": first["wall_s"],
        }, rec


def test_feature_shift_records_each_ranks_own_domain_accuracy(digits_partition, tmp_path):
    data = digits_partition(2, "feature:mixed")
    out = tmp_path / "o"
    run_job(data, "--norm bn,fedbn --epochs 2", out, timeout=180, check=True)
    for rec in json.loads((out / "summary.json").read_text())["runs"]:
        dom = rec["domain_accuracy"]
        assert len(dom) == 2 and all(0.0 <= a <= 1.0 for a in dom), rec
        assert rec["domain_accuracy_mean"] == sum(dom) / 2
        assert rec["partition"] == "feature:mixed"
