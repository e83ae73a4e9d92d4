"""Refusals and the stall watchdog under a real mpiexec: a bad configuration, a busy results
folder, a full disk during a checkpoint, a stopped rank. Each ends every rank non-zero with a
message that names what is wrong, and leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.mpi_helpers import Job, alive, run_job, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.faults]


def test_bad_configuration_is_refused_before_training(parts, tmp_path):
    proc = run_job(parts["n2"], "--model nope --global-batch-size 1 --checkpoint-every 0", tmp_path / "o")
    assert proc.returncode == 2
    for msg in (
        "unknown model 'nope'",
        "--global-batch-size 1 is smaller than the 2 ranks",
        "--checkpoint-every must be",
    ):
        assert proc.stderr.count(msg) == 1, proc.stderr
    assert "epoch" not in proc.stdout and "Traceback" not in proc.stderr

    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_mpi(
        2, ["-m", "disdl_mpi.run", "--data-dir", str(parts["n2"]), "--out", str(blocker / "out")], timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.count("results folder is not writable") == 1

    proc = run_job(parts["n2"], "--dataset mnist", tmp_path / "o2")
    assert proc.returncode == 2
    assert proc.stderr.count("field 'dataset' is 'digits'") == 1 and "epoch" not in proc.stdout


def test_a_second_run_into_a_busy_out_is_refused_and_a_dead_holder_is_taken_over(parts, tmp_path):
    out = tmp_path / "out"
    args = ["--data-dir", str(parts["n2"]), "--norm", "gn", "--global-batch-size", "64", "--out", str(out)]
    first = Job(2, [*args, "--steps", "400"], tmp_path, env={"FAULT_STEP_SLEEP": "0.05"})
    try:
        pids = first.rank_pids()
        first.wait_for_step("gn", 2)
        second = run_mpi(2, ["-m", "disdl_mpi.run", *args, "--steps", "2"], timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"--out {out} is in use by another run" in second.stderr
        assert f"pid {pids[0]}, started " in second.stderr and "host " in second.stderr
        assert second.stderr.count("in use by another run") == 1
        assert not (out / "checkpoints").exists() or not list(out.glob("checkpoints/.tmp*"))
    finally:
        first.kill()
    end = time.monotonic() + 10
    while alive(pids[0]) and time.monotonic() < end:
        time.sleep(0.1)
    third = run_mpi(2, ["-m", "disdl_mpi.run", *args, "--steps", "2"], timeout=120, check=True)
    assert f"took over the lock of a run that is gone (pid {pids[0]}" in third.stdout
    assert json.loads((out / "summary.json").read_text())["runs"][0]["steps"] == 2
    assert not (out / ".lock").exists()  # released at the end


def test_a_full_disk_during_a_checkpoint_names_the_folder_and_leaves_no_partial(parts, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], check=True)
    try:
        proc = run_mpi(
            2,
            [
                *"-m disdl_mpi.run --data-dir".split(),
                str(parts["n2"]),
                *"--norm gn --model resnet20 --steps 3 --checkpoint-every 1".split(),
                *"--global-batch-size 32 --out".split(),
                str(disk / "out"),
            ],
            timeout=180,
        )
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "checkpoint not written" in proc.stderr
        assert f"checkpoint folder {disk / 'out' / 'checkpoints'}" in proc.stderr
        assert "No space left on device" in proc.stderr
        assert not list((disk / "out" / "checkpoints").glob(".tmp-ckpt-*"))
        assert not list((disk / "out" / "checkpoints").rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_stopped_rank_is_named_by_the_stall_watchdog(parts, tmp_path):
    """SIGSTOP one rank mid-training: with --stall-timeout the others name it and where they
    wait, and the job ends with exit code 5 instead of hanging; nothing survives."""
    job = Job(
        2,
        [
            "--data-dir",
            str(parts["n2"]),
            *"--norm gn --steps 400 --global-batch-size 64 --stall-timeout 3".split(),
            "--out",
            str(tmp_path / "out"),
        ],
        tmp_path,
        env={"FAULT_STEP_SLEEP": "0.05"},
    )
    rc, _, stderr, elapsed, pids = job.signal_at_step("gn", 3, [1], signal.SIGSTOP, 60)
    assert rc == 5, stderr
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert "stall: rank 1 on " in stderr and "silent for over 3 s (--stall-timeout 3)" in stderr, stderr
    assert "rank 1 on " in stderr and ": has not arrived" in stderr and "rank 0 on " in stderr, stderr
    assert ": waiting" in stderr, stderr
    assert "step " in stderr and "phase " in stderr
    end = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    for p in pids:
        if alive(p):
            os.kill(p, signal.SIGKILL)
    assert not [p for p in pids if alive(p)], "a rank survived the stalled job"


@pytest.mark.parametrize("busy,ends", [(4.0, False), (12.0, True)])
def test_a_slow_rank_that_still_talks_is_reported_not_lost(tmp_path, busy, ends):
    """A rank in a long local phase keeps its heartbeat: reported after 1 s, never 'silent',
    and the job ends only when the stuck limit (6 s here) passes."""
    proc = run_mpi(2, ["-m", "tests.mpi_programs.watchdog_check", str(busy)], timeout=60)
    text = proc.stdout + proc.stderr
    assert (
        "stall: no progress for 1 s; still waiting" in text or "stall: no progress for 2 s; still" in text
    ), text
    assert "silent for over" not in text, text
    if ends:
        assert proc.returncode == 5, text
        assert re.search(r"stall: no progress for [67] s \(", text), text
        assert "rank 1 on " in text and "waiting" in text and "phase eval" in text, text
    else:
        assert proc.returncode == 0 and "finished" in text, text


def test_resume_of_a_missing_folder_says_it_is_missing(parts, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    proc = run_job(parts["n2"], f"--norm gn --steps 2 --resume {missing}", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert f"{missing} does not exist" in proc.stderr and "corrupt" not in proc.stderr, proc.stderr


def test_a_job_suspended_as_a_whole_and_resumed_is_not_a_stall(tmp_path):
    """SIGSTOP of every rank for longer than every threshold (SLURM's scontrol suspend does
    this), then SIGCONT: each watchdog sees the gap in its own ticks, and the job finishes."""
    from tests.mpi_helpers import mpi_command, mpi_env

    pid_dir = tmp_path / "pids"
    proc = subprocess.Popen(
        mpi_command(2, ["-m", "tests.mpi_programs.watchdog_suspend", "14"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=mpi_env({"FAULT_PIDS": str(pid_dir)}),
        start_new_session=True,
    )
    try:
        end = time.monotonic() + 60
        while len(list(pid_dir.glob("rank*.pid"))) < 2 and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(2)
        pids = [int(f.read_text()) for f in sorted(pid_dir.glob("rank*.pid"))]
        for p in pids:
            os.kill(p, signal.SIGSTOP)
        time.sleep(12)  # past report (1 s), lost (2 s) and stuck (4 s) limits, and the 10 s gap
        for p in pids:
            os.kill(p, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    assert "finished after" in out and "stall:" not in err, out + err
