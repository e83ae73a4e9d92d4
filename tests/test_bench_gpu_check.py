"""bench/gpu_check.sh runs cleanly without a GPU: the doctor runs, every GPU step is skipped."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from tests.mpi_helpers import ROOT, mpi_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs for real")
def test_gpu_check_without_a_gpu_skips_cleanly(tmp_path):
    out = tmp_path / "gpu"
    env = mpi_env()
    if os.environ.get("DISDL_OPENMPI"):  # make test MPI=openmpi: that MPI's launcher
        env["MPIEXEC"] = os.path.join(os.environ["DISDL_OPENMPI"], "bin", "mpiexec")
    script = ROOT / "bench" / "gpu_check.sh"
    proc = subprocess.run(
        ["bash", str(script), str(out)], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()[1:])
    assert steps["doctor"] == "0" and steps["doctor_2ranks"] == "0", steps
    gpu_steps = re.search(r"GPU_STEPS=\(([^)]*)\)", script.read_text()).group(1).split()
    wanted = {"train_nccl", "same_model_nccl", "allreduce_cuda_aware", "norm_overhead_nccl", "peer_2ranks"}
    assert wanted <= set(gpu_steps)
    assert all(steps[s] == "skipped: no GPU" for s in gpu_steps), steps
    assert (out / "doctor_2ranks.json").is_file()
