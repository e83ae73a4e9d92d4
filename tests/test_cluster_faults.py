"""Faults across the network, on the emulated 2-node cluster (bench.cluster), with default options.

Real faults: node 1's ``eth0`` set down inside its namespace, node 1's processes SIGSTOPped, its
link re-rated by tbf to a crawl (``python -m bench.cluster link``). Each job ends with a message
naming the rank and its node within the watchdog's default (or keeps training while the link
moves data), leaves no process behind, and the failed run's last checkpoint resumes to a
bitwise-equal model. Needs root: skipped with the reason elsewhere, a failure in CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.cluster.netns import BURST_BYTES, pids
from tests.emulated_cluster import cluster_cli, require_root
from tests.mpi_helpers import FAULT_DRIVER, ROOT, mpi_env

pytestmark = [pytest.mark.cluster, pytest.mark.mpi, pytest.mark.faults, pytest.mark.timeout(900)]

NAME = "dfault"
NODE1 = f"{NAME}-n1"
# The watchdog's default: a rank silent this long while the others wait ends the job.
LOST_AFTER_S = 120
TRAIN = "--norm gn --steps 40 --global-batch-size 64 --checkpoint-every 10 --save-model"


def cluster(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return cluster_cli(NAME, *args, timeout=timeout)


@pytest.fixture(scope="module")
def two_nodes():
    require_root("cluster fault tests")
    cluster("down")
    up = cluster("up", "--nodes", "2", "--link", "1000mbit")
    assert up.returncode == 0, up.stderr
    yield
    cluster("down")


class ClusterJob:
    """``bench.cluster exec -n 2 -- python -m fault_driver ...`` in the background."""

    def __init__(self, data: Path, out: Path, options: str, env: dict | None = None):
        self.progress = out.parent / f"{out.name}.progress"
        argv = [sys.executable, "-m", FAULT_DRIVER, "--data-dir", str(data), *options.split()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.cluster", "exec", "--name", NAME, "-n", "2", "--", *argv]
            + ["--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=mpi_env({"FAULT_PROGRESS": str(self.progress), **(env or {})}),
            start_new_session=True,
        )

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.progress.read_text() if self.progress.exists() else ""
            if text.split() and int(text.split()[1]) >= step:
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended before step {step}: {self.proc.communicate()[1][-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"the job never reached step {step}")

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate()
            pytest.fail(f"the job was still running after {timeout:.0f} s: {err[-3000:]}")
        return self.proc.returncode, err


def _no_process_left(timeout: float = 20) -> list[int]:
    end = time.monotonic() + timeout
    left = pids(f"{NAME}-n0") + pids(NODE1)
    while left and time.monotonic() < end:
        time.sleep(0.2)
        left = pids(f"{NAME}-n0") + pids(NODE1)
    return left


def _same_model(a: Path, b: Path) -> None:
    x, y = torch.load(a), torch.load(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].numpy().tobytes() == y[k].numpy().tobytes(), f"{k} differs"


def test_a_node_that_loses_its_link_is_named_and_its_checkpoint_resumes_bitwise(two_nodes, parts, tmp_path):
    """Default options: the job ends with exit code 5 about LOST_AFTER_S after node 1 went
    silent, naming rank 1 and its node; nothing stays behind; with the link back, ``--resume
    auto`` of the failed run's last checkpoint trains to the model of an uninterrupted run."""
    ref = ClusterJob(parts["n2"], tmp_path / "ref", TRAIN)
    rc, err = ref.wait(300)
    assert rc == 0, err[-3000:]
    # 1 s a step: the fault lands long before the 40 steps could end
    job = ClusterJob(parts["n2"], tmp_path / "run", TRAIN, env={"FAULT_STEP_SLEEP": "1"})
    job.wait_for_step(12)
    down = time.monotonic()
    assert cluster("link", "--node", "1", "down").returncode == 0
    assert job.proc.poll() is None, "the job ended before its link went down"
    try:
        rc, err = job.wait(LOST_AFTER_S + 90)
        elapsed = time.monotonic() - down
        left = _no_process_left()
    finally:
        assert cluster("link", "--node", "1", "up").returncode == 0
    assert rc == 5, err[-3000:]
    assert LOST_AFTER_S - 10 < elapsed < LOST_AFTER_S + 40, f"ended after {elapsed:.0f} s"
    assert f"rank 1 on {NODE1} silent for over {LOST_AFTER_S} s" in err, err[-3000:]
    assert f"rank 0 on {NAME}-n0: waiting" in err and "no progress for" in err, err[-3000:]
    assert not left, f"processes left in the namespaces: {left}"
    resumed = ClusterJob(parts["n2"], tmp_path / "run", TRAIN + " --resume auto")
    rc, err = resumed.wait(300)
    assert rc == 0, err[-3000:]
    _same_model(tmp_path / "ref" / "gn" / "model.pt", tmp_path / "run" / "gn" / "model.pt")


def test_a_stopped_node_is_named_and_its_ranks_end_when_it_resumes(two_nodes, parts, tmp_path):
    """Every process of node 1 SIGSTOPped (a frozen node): rank 0 names rank 1 on node 1 and
    ends the job (here with --stall-timeout 10, inside the default); the frozen processes end
    by themselves once the node runs again (SIGCONT)."""
    job = ClusterJob(parts["n2"], tmp_path / "run", "--norm gn --epochs 400 --stall-timeout 10")
    job.wait_for_step(10)
    time.sleep(3)  # a few heartbeats (every 1.25 s here) so rank 0 has heard from rank 1
    frozen = pids(NODE1)
    assert frozen
    for p in frozen:
        os.kill(p, signal.SIGSTOP)
    start = time.monotonic()
    try:
        rc, err = job.wait(60)
        elapsed = time.monotonic() - start
    finally:
        for p in frozen:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert rc == 5, err[-3000:]
    assert elapsed < 30, f"ended after {elapsed:.0f} s"
    assert f"rank 1 on {NODE1} silent for over 10 s" in err, err[-3000:]
    assert f"rank 1 on {NODE1}: has not arrived" in err, err[-3000:]
    assert not _no_process_left(), "a frozen process did not end after SIGCONT"


def test_a_link_throttled_to_a_crawl_keeps_training(two_nodes, parts, tmp_path):
    """Node 1's link re-rated to 4 Mbit/s from step 3: with default options the job keeps
    making progress and finishes; its step time shows the crawl (at least 15 steps' gradients,
    beyond tbf's burst, crossed at 4 Mbit/s), so the bytes did take the throttled link."""
    rate = 4e6
    # a pause of 0.2 s after each step (outside its timed phases) so the crawl starts early
    job = ClusterJob(
        parts["n2"],
        tmp_path / "run",
        "--norm gn --steps 40 --global-batch-size 64",
        {"FAULT_STEP_SLEEP": "0.2"},
    )
    job.wait_for_step(3)
    assert cluster("link", "--node", "1", "4mbit").returncode == 0
    assert job.proc.poll() is None, "the job ended before its link was throttled"
    try:
        rc, err = job.wait(300)
    finally:
        assert cluster("link", "--node", "1", "1000mbit").returncode == 0
    assert rc == 0, err[-3000:]
    (run,) = json.loads((tmp_path / "run" / "summary.json").read_text())["runs"]
    assert run["steps"] == 40
    # one gradient across the slow link: tbf lets a full bucket (BURST_BYTES) pass at once, and
    # the 0.2 s pause refills it, so each step waits for the rest
    crawl_s = (run["grad_bytes"] - BURST_BYTES) * 8 / rate
    assert crawl_s > 0.05
    assert run["phases"]["step"] > crawl_s * 15, run["phases"]
