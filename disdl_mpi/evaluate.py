"""Test-set evaluation: sharded across ranks with the counts reduced, or per rank (fedbn)."""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, near-equal shard of ``n`` test samples for ``rank``."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@torch.no_grad()
def count_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  batch_size: int = 1024) -> int:
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start:start + batch_size])
        correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    return correct


def evaluate_sharded(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                     comm: MPI.Comm) -> float:
    """Global test accuracy: every rank scores its own shard, the counts are summed."""
    lo, hi = shard_bounds(x_test.shape[0], comm.Get_rank(), comm.Get_size())
    correct = count_correct(model, x_test[lo:hi], y_test[lo:hi])
    counts = np.array([correct, hi - lo], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
    return float(counts[0]) / max(1, int(counts[1]))


def evaluate_per_rank(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                      comm: MPI.Comm) -> tuple[float, list[float]]:
    """Each rank scores the whole test set with its own model; returns (mean, per-rank)."""
    acc = count_correct(model, x_test, y_test) / max(1, x_test.shape[0])
    per_rank = [float(a) for a in comm.allgather(acc)]
    return float(np.mean(per_rank)), per_rank
