"""MPI driver: syncbn equals batch_norm on the concatenated global batch (run under mpiexec).

Usage: mpiexec -n N python -m mpi4py -m tests.mpi_programs.syncbn_check
Every rank builds the same global batch from a fixed seed, keeps its own slice (sizes are
unequal and include 0), and compares outputs, input gradients, the rank-summed weight/bias
gradients and the running statistics against torch.nn.functional.batch_norm on the whole
batch. Any mismatch raises, which aborts the job with a non-zero exit code.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from mpi4py import MPI

from disdl_mpi.comm.mpi_ops import allreduce_
from disdl_mpi.models import build_model
from disdl_mpi.norms import get_scheme
from disdl_mpi.norms.local_layers import LocalBatchNorm
from disdl_mpi.norms.sync_batch_norm import SyncBatchNorm

TOL = {torch.float32: 1e-5, torch.float64: 1e-11}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-30)
    return (a - b).abs().max().item() / scale if b.numel() else 0.0


def check(what: str, got: torch.Tensor, ref: torch.Tensor, dtype, rank: int) -> None:
    err = rel_err(got, ref)
    if not err <= TOL[dtype]:
        raise AssertionError(f"[rank {rank}] {what}: relative error {err:.3e} > {TOL[dtype]:.0e}")


def sizes_for(world: int) -> list[list[int]]:
    """Unequal per-rank batch sizes, including empty ranks and a rank with one sample."""
    if world == 2:
        return [[5, 0], [1, 6], [3, 11]]  # 1: a single value per channel on a rank
    base = [[5, 0, 2, 9], [4, 7, 1, 0, 3]]  # kept short: 4 oversubscribed ranks are slow here
    return [(s * world)[:world] for s in base]


def layer_case(comm, sizes: list[int], shape_tail: tuple, dtype, convention: str, offset: float) -> None:
    rank = comm.Get_rank()
    n_total = sum(sizes)
    c = shape_tail[0]
    g = torch.Generator().manual_seed(1000 + n_total + len(shape_tail))
    x_all = torch.randn(n_total, *shape_tail, generator=g, dtype=dtype) * 2.5 + offset
    x_all += torch.arange(c, dtype=dtype).view([1, c] + [1] * (len(shape_tail) - 1))
    dy_all = torch.randn(n_total, *shape_tail, generator=g, dtype=dtype)
    w0 = torch.rand(c, generator=g, dtype=dtype) + 0.5
    b0 = torch.randn(c, generator=g, dtype=dtype)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]

    layer = SyncBatchNorm(c, comm, convention=convention).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(w0)
        layer.bias.copy_(b0)
    rm = torch.zeros(c, dtype=dtype)
    rv = torch.ones(c, dtype=dtype)
    for step in range(3):  # several steps: the shift (running mean) and running stats move
        xr = x_all * (1 + 0.1 * step)
        x_ref = xr.clone().requires_grad_()
        w_ref = w0.clone().requires_grad_()
        b_ref = b0.clone().requires_grad_()
        y_ref = F.batch_norm(x_ref, rm, rv, w_ref, b_ref, training=True, momentum=0.1, eps=1e-5)
        y_ref.backward(dy_all)

        x = xr[lo:hi].clone().requires_grad_()
        layer.weight.grad = None
        layer.bias.grad = None
        y = layer(x)
        n_r = hi - lo
        # local_mean: this rank backpropagates the mean over its own samples, i.e. dy scaled
        # by N/n_r; the allreducer later weights its parameter gradients by n_r/N.
        scale = (n_total / n_r if n_r else 1.0) if convention == "local_mean" else 1.0
        y.backward(dy_all[lo:hi] * scale)
        weight = (n_r / n_total) if convention == "local_mean" else 1.0
        tag = f"{convention} {dtype} sizes={sizes} shape={shape_tail} step={step}"
        check(f"output {tag}", y.detach(), y_ref.detach()[lo:hi], dtype, rank)
        if n_r:
            check(
                f"input grad {tag}",
                x.grad * (n_r / n_total if convention == "local_mean" else 1.0),
                x_ref.grad[lo:hi],
                dtype,
                rank,
            )
        else:
            assert y.shape == x.shape and x.grad is not None and x.grad.numel() == 0, tag
        gw = (layer.weight.grad * weight).clone()
        gb = (layer.bias.grad * weight).clone()
        allreduce_(gw, comm)
        allreduce_(gb, comm)
        check(f"weight grad {tag}", gw, w_ref.grad, dtype, rank)
        check(f"bias grad {tag}", gb, b_ref.grad, dtype, rank)
        check(f"running_mean {tag}", layer.running_mean, rm, dtype, rank)
        check(f"running_var {tag}", layer.running_var, rv, dtype, rank)
    # Running statistics are bit-identical on every rank.
    gathered = comm.allgather(torch.cat([layer.running_mean, layer.running_var]).tolist())
    assert all(v == gathered[0] for v in gathered), "running stats differ across ranks"
    # Eval mode uses the running statistics and communicates nothing (a lone rank may call it).
    layer.eval()
    if rank == 0:
        xe = x_all[:3]
        ye = F.batch_norm(xe, rm, rv, w0, b0, training=False, eps=1e-5)
        check("eval output", layer(xe).detach(), ye, dtype, rank)


def model_case(comm, sizes: list[int]) -> None:
    """The trainer's convention end to end on a CNN: local-mean cross-entropy per rank, gradients
    weighted by n_r/N and summed, equals one process with BN on the concatenated batch."""
    rank, n_total = comm.Get_rank(), sum(sizes)
    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(n_total, 1, 8, 8, generator=g)
    y_all = torch.randint(0, 10, (n_total,), generator=g)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    scheme = get_scheme("syncbn", comm=comm)
    assert scheme.collective_forward
    torch.manual_seed(3)
    model = build_model("cnn", (1, 8, 8), 10, scheme.layer)
    torch.manual_seed(3)
    ref = build_model("cnn", (1, 8, 8), 10, LocalBatchNorm)
    F.cross_entropy(ref(x_all), y_all).backward()

    logits = model(x_all[lo:hi])
    loss = F.cross_entropy(logits, y_all[lo:hi], reduction="sum") / max(1, hi - lo)
    loss.backward()  # an empty rank backpropagates too: it must join the backward allreduces
    for (name, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
        grad = p.grad * ((hi - lo) / n_total) if p.grad is not None else torch.zeros_like(p)
        grad = grad.clone()
        allreduce_(grad, comm)
        err = rel_err(grad, pr.grad)
        if not err <= 2e-5:  # float32 through 3 conv layers: some round-off accumulates
            raise AssertionError(f"[rank {rank}] model grad {name} sizes={sizes}: rel err {err}")
    assert scheme.comm_seconds() > 0.0
    scheme.close()


def main() -> int:
    comm = MPI.COMM_WORLD.Dup()
    world = comm.Get_size()
    cases = 0
    for sizes in sizes_for(world):
        for tail in [(3, 4, 5), (6,)]:
            layer_case(comm, sizes, tail, torch.float32, "global", offset=3.0)
            layer_case(comm, sizes, tail, torch.float32, "local_mean", offset=3.0)
            layer_case(comm, sizes, tail, torch.float64, "global", offset=100.0)
            layer_case(comm, sizes, tail, torch.float64, "local_mean", offset=100.0)
            cases += 4
    model_case(comm, sizes_for(world)[-1])
    comm.Barrier()
    if comm.Get_rank() == 0:
        print(f"syncbn exact on {world} ranks: {cases} layer cases, 1 model case OK")
    comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
