"""MPI driver: bn-recal sets BN running stats to the global statistics of the BN inputs.

Usage: mpiexec -n N python -m mpi4py -m tests.mpi_programs.recal_check
Ranks hold unequal (one empty) slices of one dataset. (1) A 1-layer model (BN on the input)
must end with running_mean/var equal to the concatenated data's mean and unbiased variance.
(2) A linear -> BN model must match the statistics of the concatenated linear outputs.
(3) A CNN: every rank ends with identical statistics, and the first BN layer's equal the
statistics of the first conv's outputs on the concatenated data.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI
from torch import nn

from disdl_mpi.norms import NormScheme, get_scheme


def close(a: torch.Tensor, b: torch.Tensor, what: str, rank: int, tol: float = 1e-5) -> None:
    err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
    if not err <= tol:
        raise AssertionError(f"[rank {rank}] {what}: relative error {err:.3e} > {tol:.0e}")


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    sizes = ([13, 0, 29, 6] * world)[:world]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    g = torch.Generator().manual_seed(5)
    n = sum(sizes)
    x_all = torch.randn(n, 3, 5, 5, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    x_all += torch.tensor([200.0, -2.0, 0.1]).view(1, 3, 1, 1)  # a large offset: stability
    flat = x_all[:, :, 0, 0].contiguous()
    scheme = get_scheme("bn-recal", comm=comm.Dup())
    assert type(scheme).recalibrate is not NormScheme.recalibrate  # it has its own hook

    # (1) BN directly on the input data.
    bn = scheme.layer(3)
    scheme.recalibrate(nn.Sequential(bn), x_all[lo:hi].numpy(), 4)
    xd = x_all.double().transpose(0, 1).reshape(3, -1)
    close(bn.running_mean.double(), xd.mean(1), "1-layer mean", rank)
    close(bn.running_var.double(), xd.var(1, unbiased=True), "1-layer var", rank)
    assert bn.num_batches_tracked.item() == 0, "recalibration must not count as training"

    # (2) Linear -> BN on flat features: stats of the concatenated linear outputs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), scheme.layer(5), nn.ReLU(), nn.Linear(5, 2))
    model.eval()
    scheme.recalibrate(model, flat[lo:hi], 7)
    assert not model.training, "recalibrate must restore the train/eval mode"
    with torch.no_grad():
        h = model[0](flat).double()
    close(model[1].running_mean.double(), h.mean(0), "linear->bn mean", rank)
    close(model[1].running_var.double(), h.var(0, unbiased=True), "linear->bn var", rank)

    # (3) CNN, first layer exact; later layers see inputs normalized with batch statistics,
    #     so compare against one process recalibrating with the same per-rank batches.
    from disdl_mpi.models import build_model

    torch.manual_seed(1)
    cnn = build_model("cnn", (3, 5, 5), 4, scheme.layer)
    scheme.recalibrate(cnn, x_all[lo:hi], 5)
    stats = torch.cat(
        [b.running_mean for b in cnn.modules() if isinstance(b, type(bn))]
        + [b.running_var for b in cnn.modules() if isinstance(b, type(bn))]
    )
    every = comm.allgather(stats.tolist())
    assert all(s == every[0] for s in every), "recalibrated stats differ across ranks"
    first = next(m for m in cnn.modules() if isinstance(m, type(bn)))
    with torch.no_grad():
        z = cnn.features[0][0](x_all).double().transpose(0, 1).reshape(first.num_features, -1)
    close(first.running_mean.double(), z.mean(1), "cnn first-layer mean", rank, tol=1e-4)
    close(first.running_var.double(), z.var(1), "cnn first-layer var", rank, tol=1e-4)
    assert scheme.comm_seconds() > 0
    if rank == 0:
        print(f"bn-recal global statistics OK on {world} ranks, sizes {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
