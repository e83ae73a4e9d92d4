"""bn-carry and bn-fix under a real mpiexec against a centralized computation.

Ranks hold unequal batches (rank 1 none at all). bn-carry: after one synchronized step every
rank's global statistics equal those of the union of all ranks' batches, the statistics rode
in the gradient allreduce's last bucket (no bucket added, no collective of their own). bn-fix:
the statistics frozen at T* equal those of the union of all ranks' training data.
"""

import sys

import torch
from mpi4py import MPI
from torch import nn

from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.comm.world import install_abort_handler
from disdl_mpi.norms import get_scheme
from disdl_mpi.step import sync_step


def union(comm, x):
    parts = comm.allgather(x.numpy())
    return torch.cat([torch.from_numpy(p) for p in parts])


def stats(x):
    dims = [0, 2, 3]
    return x.double().mean(dims), x.double().var(dims, unbiased=False)


def main() -> int:
    comm = MPI.COMM_WORLD
    install_abort_handler(comm)
    rank = comm.Get_rank()
    sizes = [5, 0, 9][: comm.Get_size()] + [3] * max(0, comm.Get_size() - 3)
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(sizes[rank], 2, 6, 6, generator=g) * (1 + rank)
    y = torch.randint(0, 4, (sizes[rank],), generator=g)

    # bn-carry
    scheme = get_scheme("bn-carry")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), scheme.layer(3), nn.Flatten(), nn.Linear(3 * 36, 4))
    plain = GradientAllreducer(model, comm)
    n_plain = len(plain.buckets)
    plain.close()
    reducer = GradientAllreducer(model, comm, payload=scheme.payload(model))
    assert len(reducer.buckets) == n_plain and reducer.buckets[-1].payload is not None
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the conv stays as it was
    with torch.no_grad():
        feats = model[0](x)
    sync_step(model, opt, reducer, x, y, sum(sizes))
    mean, var = stats(union(comm, feats))
    bn = model[1]
    assert torch.allclose(bn.global_mean.double(), mean, atol=1e-4), (bn.global_mean, mean)
    assert torch.allclose(bn.global_var.double(), var, rtol=1e-4, atol=1e-4), (bn.global_var, var)
    everyone = comm.allgather(bn.global_mean.tolist())
    assert all(e == everyone[0] for e in everyone), "ranks disagree"

    # bn-fix: frozen at T* with the statistics of every rank's data
    fix = get_scheme("bn-fix", comm=comm.Dup(), fix_at=0)
    torch.manual_seed(0)
    fmodel = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), fix.layer(3))
    fix.before_step(fmodel, x, 4, 0, 10)
    with torch.no_grad():
        fmean, fvar = stats(union(comm, fmodel[0](x)))
    n = float(sum(sizes) * 36)
    layer = fmodel[1]
    assert bool(layer.fixed)
    assert torch.allclose(layer.running_mean.double(), fmean, atol=1e-4)
    assert torch.allclose(layer.running_var.double(), fvar * n / (n - 1), rtol=1e-4, atol=1e-4)
    if rank == 0:
        print(
            f"bn-carry and bn-fix global statistics OK on {comm.Get_size()} ranks, sizes {sizes}", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
