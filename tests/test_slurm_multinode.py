"""The batch scripts on a real 2-node SLURM: one slurmd per emulated node (bench.cluster --slurm).

Each node is a network namespace with its own hostname and core; the ranks' traffic crosses the
emulated 1 Gbit/s links over TCP. Needs root: skipped with the reason elsewhere, a failure in CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import in_ci
from tests.emulated_cluster import cluster_cli, require_root
from tests.mpi_helpers import ROOT, alive
from tests.slurm_cluster import SlurmCluster, script_env
from tests.slurm_daemons import SlurmUnavailable, ensure_installed

pytestmark = [pytest.mark.multinode, pytest.mark.slurm, pytest.mark.mpi]

NAME = "dsl"
NODES = [f"{NAME}-n0", f"{NAME}-n1"]
SLURM_DIR = ROOT / "slurm"
JOB_TIMEOUT = 300
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "-t", "10"]


def _cluster(*args: str) -> subprocess.CompletedProcess:
    return cluster_cli(NAME, *args)


@pytest.fixture(scope="module")
def slurm2():
    require_root("multi-node SLURM tests")
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI=true but SLURM cannot be installed: {exc}")
        pytest.skip(f"SLURM unavailable: {exc}")
    _cluster("down")
    up = _cluster("up", "--nodes", "2", "--link", "1gbit", "--slurm")
    assert up.returncode == 0, up.stdout + up.stderr
    from bench.cluster.netns import ClusterState
    from bench.cluster.slurm import SlurmOnCluster

    s = SlurmOnCluster(ClusterState.load(NAME))
    yield SlurmCluster(root=s.root, node=NODES[0], cpus=1, client_prefix=s.client([]), base_env=s.env())
    _cluster("down")


def _summary(out_dir: Path) -> dict:
    path = out_dir / "summary.json"
    assert path.is_file(), f"no {path}; folder holds {sorted(p.name for p in out_dir.glob('*'))}"
    return json.loads(path.read_text())


def _ranks_in(ns: str, marker: bytes = b"disdl_mpi.run") -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    found = []
    for pid in map(int, out.split()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker in fh.read() and alive(pid):
                    found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_train_runs_one_rank_on_each_of_two_nodes(
    slurm2: SlurmCluster, tmp_path: Path, launcher: str
) -> None:
    job = slurm2.run_batch("train.sbatch", TWO_NODES, cwd=tmp_path, LAUNCHER=launcher)
    assert job.returncode == 0 and job.state in ("COMPLETED", ""), job.describe()
    summary = _summary(tmp_path / "results" / str(job.job_id))
    machine = summary["machine"]
    # the job's own output says where every rank ran: two different nodes
    assert machine["hostnames"] == NODES and machine["nodes"] == 2, machine
    assert f"ranks by node: {NODES[0]}: 0; {NODES[1]}: 1" in job.output, job.describe()
    assert machine["cluster"] == NAME  # the emulated network's MPI settings reached the ranks
    assert summary["runs"][0]["world_size"] == 2 and f"launcher {launcher}" in job.output


@pytest.mark.timeout(3 * JOB_TIMEOUT)
def test_usr1_preempts_requeues_and_resumes_bitwise_across_nodes(
    slurm2: SlurmCluster, tmp_path: Path
) -> None:
    env = script_env(STEPS="40", CHECKPOINT_EVERY="1", EXTRA_ARGS="--save-model")
    ref = slurm2.sbatch(SLURM_DIR / "train.sbatch", TWO_NODES, env=env, cwd=tmp_path, timeout=JOB_TIMEOUT)
    assert ref.returncode == 0, ref.describe()
    job, out_dir = slurm2.preempt_after_first_checkpoint(
        SLURM_DIR / "train.sbatch", TWO_NODES, env=env, cwd=tmp_path, timeout=JOB_TIMEOUT
    )
    assert job.returncode == 0, job.describe()
    assert "got SIGUSR1" in job.output and "(restart 1)" in job.output, job.describe()
    assert "resuming from" in job.output, job.describe()
    assert _summary(out_dir)["machine"]["hostnames"] == NODES
    got = torch.load(out_dir / "gn" / "model.pt", weights_only=True)
    want = torch.load(tmp_path / "results" / str(ref.job_id) / "gn" / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "the resumed model differs"


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_a_rank_killed_on_the_second_node_ends_the_whole_job(slurm2: SlurmCluster, tmp_path: Path) -> None:
    pending = slurm2.submit(
        SLURM_DIR / "train.sbatch",
        TWO_NODES,
        env=script_env(STEPS="100000", CHECKPOINT_EVERY=""),
        cwd=tmp_path,
    )
    deadline, victims = time.monotonic() + 120, []
    while not victims and time.monotonic() < deadline:
        if "epoch" in pending.output() or "data " in pending.output():
            victims = _ranks_in(NODES[1])
        if pending.proc.poll() is not None:
            pytest.fail(f"the job ended early\n{pending.wait(10).describe()}")
        time.sleep(0.3)
    assert victims, f"no rank seen on {NODES[1]}\n{pending.output()}"
    os.kill(victims[0], signal.SIGKILL)
    job = pending.wait(120)
    assert job.returncode != 0 and job.state in ("FAILED", ""), job.describe()
    # srun names the node and the task: "srun: error: dsl-n1: task 1: Killed"
    assert f"{NODES[1]}: task 1" in job.output, job.describe()
    time.sleep(1)
    assert _ranks_in(NODES[0]) == [] and _ranks_in(NODES[1]) == [], "a rank survived"


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_scaling_over_one_and_two_nodes(slurm2: SlurmCluster, tmp_path: Path) -> None:
    env = script_env(STEPS="2", RANKS="1 2", LAUNCHER="mpirun")
    job = slurm2.sbatch(SLURM_DIR / "scaling.sbatch", TWO_NODES, env=env, cwd=tmp_path, timeout=JOB_TIMEOUT)
    assert job.returncode == 0, job.describe()
    out_dir = tmp_path / "results" / str(job.job_id)
    nodes = {}
    for path in sorted(out_dir.rglob("summary.json")):
        s = json.loads(path.read_text())
        nodes[s["runs"][0]["world_size"]] = s["machine"]["hostnames"]
    assert nodes == {1: NODES[:1], 2: NODES}, f"{nodes}\n{job.describe()}"
    assert (out_dir / "report.html").is_file(), job.describe()


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_accuracy_quick_grid_across_two_nodes(slurm2: SlurmCluster, tmp_path: Path) -> None:
    env = script_env(NORMS="gn", PARTITIONS="iid", SEEDS="1", QUICK="1", EPOCHS="1", LAUNCHER="mpirun")
    job = slurm2.sbatch(SLURM_DIR / "accuracy.sbatch", TWO_NODES, env=env, cwd=tmp_path, timeout=JOB_TIMEOUT)
    assert job.returncode == 0, job.describe()
    summaries = [
        json.loads(p.read_text()) for p in (tmp_path / "results" / str(job.job_id)).rglob("summary.json")
    ]
    assert summaries and all(s["machine"]["hostnames"] == NODES for s in summaries), job.describe()
