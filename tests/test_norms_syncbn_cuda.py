"""syncbn on CUDA: torch's fused SyncBN kernels give the CPU path's values and gradients, and
the device paths' host synchronizations are the counted ones (issue 24, item 3; skipped
without a GPU, run by bench/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from disdl_mpi.norms.sync_batch_norm import SyncBatchNorm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(layer: SyncBatchNorm, x: torch.Tensor, dy: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return (
        y.detach().cpu(),
        x.grad.cpu(),
        layer.weight.grad.cpu(),
        layer.bias.grad.cpu(),
        layer.running_var.cpu(),
    )


@pytest.mark.parametrize("shape", [(16, 8, 5, 5), (9, 6), (1, 4, 3, 3)])
@pytest.mark.parametrize("convention", ["local_mean", "global"])
def test_fused_kernels_match_the_cpu_path(shape, convention):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g) * 4 + 30  # |mean| >> std: where cancellation would show
    dy = torch.randn(shape, generator=g)
    got = {}
    for name, device, fused in (("cpu", "cpu", False), ("generic", "cuda", False), ("fused", "cuda", True)):
        layer = SyncBatchNorm(shape[1], MPI.COMM_SELF, convention=convention).to(device)
        layer.fused_cuda = fused
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        got[name] = _run(layer, x.to(device), dy.to(device))
    for name in ("generic", "fused"):
        for ours, ref in zip(got[name], got["cpu"]):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=name)


def test_a_device_path_makes_no_synchronization_of_its_own():
    """torch's sync debug mode raises on any synchronizing call the layer makes itself; the
    torch path (none expected) is checked without a process group by a stand-in that sums
    over one rank (identity)."""
    layer = SyncBatchNorm(8, MPI.COMM_SELF).cuda()
    layer.reduce = lambda t: None  # one rank, a device collective: no host contact
    x = torch.randn(16, 8, 4, 4, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
