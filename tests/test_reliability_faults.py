"""The fault suite: every reliability guarantee under a real mpiexec, with timeouts.

Faults are real: signals are sent to rank processes by pid, a rank is SIGKILLed, checkpoint
files are corrupted on disk. Only NaNs and a collective-ordering bug are injected by the
test driver (tests/mpi_programs/fault_driver.py), on one rank.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.mpi_helpers import FAULT_DRIVER, Job, alive, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.faults]

TRAIN = ["--norm", "bn,fedbn", "--steps", "8", "--global-batch-size", "64", "--save-model"]


@pytest.fixture(scope="module")
def reference(parts, tmp_path_factory):
    """An uninterrupted run that also checkpoints every 3 steps (and at the scheme boundary)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    run_mpi(
        2,
        [
            "-m",
            FAULT_DRIVER,
            "--data-dir",
            str(parts["n2"]),
            *TRAIN,
            "--checkpoint-every",
            "3",
            "--out",
            str(out),
        ],
        timeout=240,
        check=True,
    )
    return out


def _same_tensors(a: Path, b: Path) -> None:
    x, y = torch.load(a), torch.load(b)
    assert x.keys() == y.keys()
    for k in x:  # bitwise, not approximately
        assert x[k].numpy().tobytes() == y[k].numpy().tobytes(), f"{a.name}: {k} differs"


def _same_results(ref: Path, out: Path) -> None:
    for f in ("bn/model.pt", "fedbn/model.pt", "fedbn/model_rank00000.pt", "fedbn/model_rank00001.pt"):
        _same_tensors(ref / f, out / f)
    a = json.loads((ref / "summary.json").read_text())["runs"]
    b = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["norm"] for r in b] == ["bn", "fedbn"]
    for ra, rb in zip(a, b):
        assert ra["test_accuracy"] == rb["test_accuracy"] and ra["steps"] == rb["steps"]
        assert ra["per_rank_accuracy"] == rb["per_rank_accuracy"]
        assert [e["train_loss"] for e in ra["epochs_log"]] == [e["train_loss"] for e in rb["epochs_log"]]


def test_sigterm_on_one_rank_checkpoints_and_resume_is_bitwise(parts, reference, tmp_path):
    out = tmp_path / "out"
    args = ["--data-dir", str(parts["n2"]), *TRAIN, "--out", str(out)]
    job = Job(2, args, tmp_path, env={"FAULT_STEP_SLEEP": "0.1"})
    # mid-way through the SECOND scheme; one rank only, as a node-local preemption would
    rc, stdout, stderr, elapsed, _ = job.signal_at_step("fedbn", 3, [1], signal.SIGTERM, 60)
    assert rc == 128 + signal.SIGTERM, stderr
    assert elapsed < 30
    assert stderr.count("SIGTERM received on rank 1") == 1, stderr  # printed once, by rank 0
    assert "resume with --resume auto" in stderr and "Traceback" not in stderr
    metas = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("ckpt-*/meta.json")]
    newest = max(metas, key=lambda m: m["position"]["step"] if m["position"]["norm"] else -1)
    assert newest["position"]["norm"] == "fedbn" and 3 <= newest["position"]["step"] < 8
    assert not (out / "fedbn" / "model.pt").exists()

    proc = run_mpi(2, ["-m", FAULT_DRIVER, *args, "--resume", "auto"], timeout=240, check=True)
    assert "resuming from" in proc.stdout and "scheme fedbn at step" in proc.stdout
    assert "bn epoch" not in proc.stdout.replace("fedbn epoch", "")  # bn was not retrained
    _same_results(reference, out)


def test_corrupt_checkpoint_auto_falls_back_path_refuses(parts, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))
    assert len(ckpts) == 2  # KEEP = 2
    victim = ckpts[-1] / "rank_00001.pt"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated, as by a crash or full disk
    args = ["-m", FAULT_DRIVER, "--data-dir", str(parts["n2"]), *TRAIN, "--out", str(out)]

    bad = run_mpi(2, [*args, "--resume", str(ckpts[-1])], timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("is corrupt") == 1 and "rank_00001.pt: rank 1 on " in bad.stderr
    assert ": sha256 differs" in bad.stderr
    assert "Traceback" not in bad.stderr and "epoch" not in bad.stdout

    good = run_mpi(2, [*args, "--resume", "auto"], timeout=240, check=True)
    assert f"checkpoint {ckpts[-1]} is corrupt" in good.stdout and "falling back" in good.stdout
    assert f"resuming from {ckpts[0]}" in good.stdout
    shutil.copytree(reference / "bn", out / "bn", dirs_exist_ok=True)  # bn was done before
    _same_results(reference, out)


def test_sigusr1_on_all_ranks_stops_at_one_step(parts, tmp_path):
    out = tmp_path / "out"
    job = Job(
        2,
        [
            "--data-dir",
            str(parts["n2"]),
            *"--norm gn --steps 200 --global-batch-size 64 --out".split(),
            str(out),
        ],
        tmp_path,
        env={"FAULT_STEP_SLEEP": "0.05"},
    )
    rc, stdout, stderr, elapsed, _ = job.signal_at_step("gn", 2, [0, 1], signal.SIGUSR1, 60)
    assert rc == 128 + signal.SIGUSR1, stderr
    assert elapsed < 30
    assert stderr.count("SIGUSR1 received on rank 0") == 1, stderr
    (meta,) = [json.loads(p.read_text()) for p in out.glob("checkpoints/ckpt-*/meta.json")]
    assert meta["position"]["norm"] == "gn" and 2 <= meta["position"]["step"] < 200
    assert set(meta["files"]) == {"shared.pt", "rank_00000.pt", "rank_00001.pt"}


def test_sigkill_of_one_rank_brings_job_down_without_orphans(parts, tmp_path):
    job = Job(
        2,
        [
            "--data-dir",
            str(parts["n2"]),
            *"--norm gn --steps 400 --global-batch-size 64 --out".split(),
            str(tmp_path / "out"),
        ],
        tmp_path,
        env={"FAULT_STEP_SLEEP": "0.05"},
    )
    rc, _, stderr, elapsed, pids = job.signal_at_step("gn", 2, [1], signal.SIGKILL, 30)
    assert rc != 0 and elapsed < 30, f"rc={rc} after {elapsed:.1f}s"
    end = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "rank processes survived the job"


# The default watchdog beats every 2 s; --stall-timeout 1 beats every 0.125 s, so a heartbeat
# lands inside the error exit's 1 s pause, barrier and MPI_Finalize in nearly every run (before
# the watchdog was stopped ahead of the exit, Open MPI aborted with 'MPI_Isend() ... after
# MPI_FINALIZE', exit code 14, in about one default run in thirty).
@pytest.mark.parametrize("watchdog", ["", "--stall-timeout 1"], ids=["default-watchdog", "fast-heartbeat"])
def test_nan_loss_on_one_rank_stops_every_rank(parts, tmp_path, watchdog):
    proc = run_mpi(
        2,
        [
            "-m",
            FAULT_DRIVER,
            "--data-dir",
            str(parts["n2"]),
            *f"--norm gn --steps 6 --global-batch-size 64 {watchdog} --out".split(),
            str(tmp_path / "o"),
        ],
        env={"FAULT_NAN": "1:3:loss"},
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    # a NaN loss poisons that rank's gradient too; the rank and step are what matter
    assert proc.stderr.count("non-finite loss and gradient on rank 1 on ") == 1, proc.stderr
    assert " at optimizer step 3" in proc.stderr
    assert "--on-nan skip" in proc.stderr and "Traceback" not in proc.stderr
    assert "FINALIZE" not in proc.stderr.upper(), proc.stderr


def test_nan_gradient_skip_mode_skips_that_step_everywhere(parts, tmp_path):
    out = tmp_path / "o"
    proc = run_mpi(
        2,
        [
            "-m",
            FAULT_DRIVER,
            "--data-dir",
            str(parts["n2"]),
            *"--norm bn --steps 5 --global-batch-size 64 --on-nan skip".split(),
            *"--save-model --out".split(),
            str(out),
        ],
        env={"FAULT_NAN": "1:2:grad"},
        timeout=120,
        check=True,
    )
    # the loss stayed finite: the rank is found from its local gradient, before the average
    assert proc.stdout.count("non-finite gradient on rank 1 on ") == 1, proc.stdout
    assert " at optimizer step 2" in proc.stdout
    (rec,) = json.loads((out / "summary.json").read_text())["runs"]
    assert rec["skipped_steps"] == 1 and rec["steps"] == 5
    assert math.isfinite(rec["epochs_log"][-1]["train_loss"])
    state = torch.load(out / "bn" / "model.pt")
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_check_collectives_names_both_sides_of_a_mismatch(parts, tmp_path):
    proc = run_mpi(
        2,
        [
            "-m",
            FAULT_DRIVER,
            "--data-dir",
            str(parts["n2"]),
            *"--norm gn --steps 2 --global-batch-size 64 --check-collectives".split(),
            "--out",
            str(tmp_path / "o"),
        ],
        env={"FAULT_EXTRA_BARRIER": "1"},
        timeout=120,
    )
    assert proc.returncode == 4, proc.stderr
    err = proc.stderr
    assert err.count("collective mismatch") == 1
    assert re.search(r"rank 0 on [^:]+: Allreduce\(SUM\) \(2,\) int64 on world at evaluate\.py", err), err
    assert re.search(r"rank 1 on [^:]+: Barrier on world at fault_driver\.py", err), err


@pytest.mark.parametrize(
    "batching,norms,extra",
    [("equal", "bn,syncbn,fedbn,gn", ["--check-collectives"]), ("proportional", "syncbn,fedbn,bn", [])],
)
def test_empty_and_one_sample_ranks_never_hang(parts, tmp_path, batching, norms, extra):
    out = tmp_path / "o"
    run_mpi(
        3,
        [
            "-m",
            "disdl_mpi.run",
            "--data-dir",
            str(parts["n3e"]),
            "--norm",
            norms,
            "--steps",
            "3",
            "--global-batch-size",
            "48",
            "--batching",
            batching,
            *extra,
            "--out",
            str(out),
        ],
        timeout=240,
        check=True,
    )
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["norm"] for r in runs] == norms.split(",")
    for r in runs:
        assert r["steps"] == 3 and 0.0 <= r["test_accuracy"] <= 1.0
        assert math.isfinite(r["epochs_log"][-1]["train_loss"])
