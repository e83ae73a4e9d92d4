"""``--comm``: the gradient allreducer and syncbn's collective through a torch.distributed group
(gloo here; NCCL on a GPU) give the models the MPI path gives (issue 24, item 4)."""

from __future__ import annotations

import json

import pytest
import torch
from mpi4py import MPI

from disdl_mpi.comm.torch_group import MULTI_RANK_VAR, nccl_admits, resolve_comm
from disdl_mpi.errors import UserError
from tests.mpi_helpers import run_job

pytestmark = pytest.mark.mpi
SCHEMES = ["bn", "syncbn", "bn-carry"]


def _train(out, data, comm: str, extra: str = ""):
    opts = f"--norm {','.join(SCHEMES)} --steps 8 --save-model --comm {comm} {extra}"
    proc = run_job(data, opts, out, timeout=240, check=True)
    models = {p.parent.name: torch.load(p, weights_only=True) for p in out.glob("*/model.pt")}
    return proc, models, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("overlap", ["--overlap", "--no-overlap"])
def test_gloo_gives_the_models_of_mpi(tmp_path, digits_partition, overlap):
    data = digits_partition(2)
    _, ref, _ = _train(tmp_path / "mpi", data, "mpi", overlap)
    proc, got, summary = _train(tmp_path / "gloo", data, "gloo", overlap)
    assert "data path: gloo" in proc.stdout
    assert {r["norm"]: r["allreduce_path"] for r in summary["runs"]} == dict.fromkeys(SCHEMES, "torch-gloo")
    assert sorted(got) == sorted(ref) == sorted(SCHEMES)
    for scheme in SCHEMES:
        for name, t in ref[scheme].items():
            if t.is_floating_point():
                torch.testing.assert_close(
                    got[scheme][name], t, rtol=1e-5, atol=1e-5, msg=f"{scheme}: {name}"
                )
            else:
                assert torch.equal(got[scheme][name], t), f"{scheme}: {name}"


def test_auto_is_mpi_on_the_cpu_and_nccl_is_refused_there():
    cpu = torch.device("cpu")
    assert resolve_comm("auto", cpu, MPI.COMM_SELF)[0] == "mpi"
    assert resolve_comm("gloo", cpu, MPI.COMM_SELF)[0] == "gloo"
    with pytest.raises(UserError, match="needs a CUDA device"):
        resolve_comm("nccl", cpu, MPI.COMM_SELF)


def test_nccl_admits_ranks_sharing_a_gpu_only_from_2_30_with_the_variable():
    assert nccl_admits(1, 1, (2, 21, 5), False) == (True, "")
    ok, why = nccl_admits(2, 1, (2, 21, 5), True)
    assert not ok and "one GPU per rank" in why
    ok, why = nccl_admits(2, 1, (2, 30, 3), False)
    assert not ok and f"{MULTI_RANK_VAR}=1" in why
    ok, why = nccl_admits(2, 1, (2, 30, 3), True)
    assert ok and "admitted by NCCL 2.30.3" in why
