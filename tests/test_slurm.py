"""The batch scripts in slurm/ submitted to a real private SLURM (see tests/slurm_cluster.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster

ROOT = Path(__file__).resolve().parent.parent
# the venv running pytest (sys.prefix, not the resolved interpreter symlink); jobs activate it
VENV = Path(sys.prefix)

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]


def test_cluster_runs_a_two_rank_pmi2_mpi_step(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The fixture itself: one node, 2 CPUs, an MPICH job started by srun's PMI2 plugin."""
    script = tmp_path / "hello.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"srun --mpi=pmi2 -n 2 {VENV}/bin/python -c "
        "'from mpi4py import MPI; c = MPI.COMM_WORLD; print(\"rank\", c.rank, \"of\", c.size)'\n")
    job = slurm_cluster.sbatch(script, ["-n", "2", "-t", "1"], cwd=tmp_path, timeout=60)
    assert job.returncode == 0, job.describe()
    lines = sorted(l for l in job.output.splitlines() if l.startswith("rank"))
    # both ranks in ONE world of 2: singletons (a broken PMI) would print "of 1" twice
    assert lines == ["rank 0 of 2", "rank 1 of 2"], job.describe()
