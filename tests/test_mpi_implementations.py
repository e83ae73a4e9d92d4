"""MPICH and Open MPI train the same model, bit for bit.

Runs where both are installed: ``make test MPI=openmpi`` sets DISDL_OPENMPI to the Open MPI
prefix, and the venv's own MPICH wheel is the other. On 2 ranks an allreduce sum has one order
(a + b), so any difference in the weights would be ours, not the MPI's reduction order.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
import torch

from tests.mpi_helpers import ROOT, mpi_env

OMPI = os.environ.get("DISDL_OPENMPI")
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(not OMPI, reason="needs both MPIs: make test MPI=openmpi")]


def _train(out: Path, data: Path, mpi: str) -> dict[str, torch.Tensor]:
    import subprocess

    if mpi == "openmpi":
        launcher = [f"{OMPI}/bin/mpiexec", "--oversubscribe"]
        env = mpi_env(
            {
                "MPI4PY_LIBMPI": f"{OMPI}/lib/libmpi.so.40",
                "OPAL_PREFIX": OMPI,
                "OMPI_ALLOW_RUN_AS_ROOT": "1",
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            }
        )
    else:
        launcher = [str(Path(sys.executable).parent / "mpiexec")]
        env = {k: v for k, v in mpi_env().items() if k not in ("MPI4PY_LIBMPI", "DISDL_LAUNCHER")}
    cmd = launcher + [
        *"-n 2".split(),
        sys.executable,
        *"-m disdl_mpi.run --data-dir".split(),
        str(data),
        *"--norm bn,syncbn,bn-carry --steps 12 --save-model --progress".split(),
        *"none --out".split(),
        str(out),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(ROOT), start_new_session=True
    )
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = (out / "summary.json").read_text()
    assert ("Open MPI" if mpi == "openmpi" else "MPICH") in summary  # the MPI we meant ran
    return {p.parent.name: torch.load(p, weights_only=True) for p in out.glob("*/model.pt")}


def test_mpich_and_open_mpi_give_bit_identical_models(tmp_path, digits_partition):
    data = digits_partition(2)
    a = _train(tmp_path / "mpich", data, "mpich")
    b = _train(tmp_path / "openmpi", data, "openmpi")
    assert sorted(a) == sorted(b) == ["bn", "bn-carry", "syncbn"]
    for scheme in a:
        for name, t in a[scheme].items():
            assert torch.equal(t, b[scheme][name]), f"{scheme}: {name} differs between MPIs"
