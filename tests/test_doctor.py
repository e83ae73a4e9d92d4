"""python -m disdl_mpi.doctor: the installation's facts, a 2-rank self-test, one verdict line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from disdl_mpi.comm.cuda_aware import CudaAwareness, env_signal, explain, mpi_family
from tests.mpi_helpers import ROOT, mpi_env, run_mpi


def test_doctor_under_mpiexec_runs_the_self_test(tmp_path):
    out = tmp_path / "doctor.json"
    proc = run_mpi(2, ["-m", "disdl_mpi.doctor", "--json", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(out.read_text())
    assert facts["world_size"] == 2 and facts["self_test"] == "passed"
    assert "MPICH" in facts["mpi_library"] or "Open MPI" in facts["mpi_library"]
    assert facts["cuda_aware_reason"] and isinstance(facts["cuda_aware"], bool)
    assert facts["hdf5"] and facts["torch"]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("YES: this installation can run disdl-mpi (CPU; self-test passed on 2 ranks)")
    assert proc.stdout.count("YES:") == 1  # only rank 0 prints


def _doctor_alone(**env: str) -> subprocess.CompletedProcess:
    """The doctor as a plain process (no launcher), with ``env`` added to the MPI environment."""
    return subprocess.run(
        [sys.executable, "-m", "disdl_mpi.doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**mpi_env(), **env},
    )


def test_doctor_alone_says_how_to_run_the_self_test():
    proc = _doctor_alone()
    assert proc.returncode == 0, proc.stderr
    assert "run under mpiexec -n 2 for the allreduce self-test" in proc.stdout


def test_doctor_flags_an_mpiexec_of_another_mpi():
    # What a mismatched launcher leaves behind: it announced 2 ranks, MPI sees a world of 1.
    proc = _doctor_alone(OMPI_COMM_WORLD_SIZE="2")
    assert proc.returncode == 1, proc.stdout
    assert (
        proc.stdout.strip()
        .splitlines()[-1]
        .startswith("NO: the launcher started 2 ranks but MPI sees a world of 1")
    )


@pytest.mark.parametrize(
    "library, family, advice",
    [
        ("Intel(R) MPI Library 2021.16 for Linux* OS", "intel", "I_MPI_OFFLOAD=1"),
        ("Open MPI v5.0.11, package: Open MPI", "openmpi", "--with-cuda"),
        ("MPICH Version: 5.0.2", "mpich", "MPIR_CVAR_ENABLE_GPU=1"),
        ("MVAPICH2 Version 2.3.7", "mvapich", "MV2_USE_CUDA=1"),
        ("Some MPI 1.0", "other", "site MPI"),
    ],
)
def test_the_verdict_names_the_mpi_family_and_what_would_make_it_cuda_aware(library, family, advice):
    assert mpi_family(library) == family
    no = explain(CudaAwareness(False, "MPIX_Query_cuda_support()=0"), library)
    assert no.startswith("not CUDA-aware (MPIX_Query_cuda_support()=0)") and advice in no
    yes = explain(CudaAwareness(True, "environment I_MPI_OFFLOAD=1"), library)
    assert yes.startswith("CUDA-aware (environment I_MPI_OFFLOAD=1)")


def test_intel_mpis_offload_variable_is_a_cuda_aware_signal():
    assert env_signal({"I_MPI_OFFLOAD": "1"}) == "I_MPI_OFFLOAD"
