"""syncbn's host synchronizations, counted on CPU by instrumentation (issue 24, item 3).

Per BN layer per pass (forward, backward) the collective makes 0 (torch.distributed, e.g.
NCCL), 1 (CUDA-aware MPI: the stream synchronized) or 2 (host-staged: one copy each way)
host synchronizations, and the layer itself none: its per-channel arithmetic stays on the
device. A named device path runs the same calls on CPU tensors, so the count here is the one a
GPU run makes; the layer's own host reads are caught by patching the Tensor methods that read a
value back (item, bool, float, int, tolist, numpy).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from disdl_mpi.comm import stats_allreduce
from disdl_mpi.comm.stats_allreduce import StatsAllreduce
from disdl_mpi.comm.torch_group import start_process_group, stop_process_group
from disdl_mpi.models import build_model
from disdl_mpi.norms.sync_batch_norm import SyncBatchNorm, SyncBN

PER_CALL = {"cpu": 0, "host-staged": 2, "cuda-aware": 1, "torch": 0}
READS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")


@contextlib.contextmanager
def host_reads_outside_the_collective():
    """Record every Tensor value read made outside StatsAllreduce.__call__."""
    seen: list[str] = []
    inside = [0]
    saved = {name: getattr(torch.Tensor, name) for name in READS}
    call = StatsAllreduce.__call__

    def counting(name):
        def read(self, *a, **k):
            if not inside[0]:
                seen.append(name)
            return saved[name](self, *a, **k)

        return read

    def collective(self, t):
        inside[0] += 1
        try:
            return call(self, t)
        finally:
            inside[0] -= 1

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        StatsAllreduce.__call__ = collective
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        StatsAllreduce.__call__ = call


@pytest.fixture(scope="module")
def gloo_group():
    start_process_group(MPI.COMM_SELF, "gloo")
    yield
    stop_process_group()


def _train_step(scheme: SyncBN, model_name: str = "cnn") -> int:
    torch.manual_seed(0)
    model = build_model(model_name, (1, 8, 8), 10, scheme.layer)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    F.cross_entropy(model(x), y).backward()
    return sum(isinstance(m, SyncBatchNorm) for m in model.modules())


@pytest.mark.parametrize("path", list(PER_CALL))
def test_each_layer_makes_its_paths_host_syncs_per_pass_and_no_others(path, gloo_group):
    scheme = SyncBN(MPI.COMM_SELF, stats_path=path)
    with host_reads_outside_the_collective() as reads:
        layers = _train_step(scheme)
    assert layers >= 3
    assert scheme.reduce.calls == 2 * layers  # one packed collective per layer per pass
    assert scheme.host_syncs() == PER_CALL[path] * 2 * layers
    assert reads == [], f"the layer read tensors back on the host: {reads}"


def test_every_path_gives_the_same_model_gradients(gloo_group):
    grads = {}
    for path in PER_CALL:
        scheme = SyncBN(MPI.COMM_SELF, stats_path=path)
        torch.manual_seed(0)
        model = build_model("resnet20", (3, 8, 8), 10, scheme.layer)
        x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
        F.cross_entropy(model(x), y).backward()
        grads[path] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for path, g in grads.items():
        assert torch.equal(g, grads["cpu"]), path


def test_the_reported_path_follows_device_and_awareness():
    cpu = torch.zeros(3, dtype=torch.float64)
    assert StatsAllreduce(MPI.COMM_SELF).path_for(cpu) == "cpu"
    assert StatsAllreduce(MPI.COMM_SELF, path="torch").path_for(cpu) == "torch"
    with pytest.raises(ValueError, match="one of"):
        StatsAllreduce(MPI.COMM_SELF, path="nccl")
    assert stats_allreduce.PATHS == tuple(PER_CALL)
