"""Test-set evaluation: sharded across ranks with the counts reduced, or per rank (fedbn)."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Sequence

import numpy as np
import torch
from mpi4py import MPI

# Evaluation batches hold at most this many bytes of float32 input (and at most 1024 samples):
# a CNN's activations are tens of times its input, and 1024 images of 224x224 would need GBs.
EVAL_INPUT_BYTES = 16 << 20


def eval_batch_size(sample_shape: tuple[int, ...]) -> int:
    per_sample = 4 * int(np.prod(sample_shape, dtype=np.int64))
    return int(max(1, min(1024, EVAL_INPUT_BYTES // max(1, per_sample))))


@torch.no_grad()
def count_correct(
    model: torch.nn.Module,
    x: Any,
    y: torch.Tensor,
    batch_size: int | None = None,
    lo: int = 0,
    hi: int | None = None,
) -> int:
    """Correct predictions on rows [lo, hi) of ``x``, one bounded batch at a time (``x`` may
    be ``StandardizedInputs``: only the batch is ever converted to float32)."""
    model.eval()
    batch_size = batch_size or eval_batch_size(tuple(x.shape[1:]))
    hi = x.shape[0] if hi is None else hi
    correct = 0
    for start in range(lo, hi, batch_size):
        stop = min(hi, start + batch_size)
        logits = model(x[start:stop])
        correct += int((logits.argmax(1) == y[start:stop]).sum())
    return correct


def evaluate_sharded(
    model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, comm: MPI.Comm
) -> float:
    """Global test accuracy: every rank scores its own shard (``x_test``, ``y_test``: the rows
    ``data.layout.shard_bounds`` gives it), the counts are summed."""
    correct = count_correct(model, x_test, y_test)
    counts = np.array([correct, len(y_test)], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
    return float(counts[0]) / max(1, int(counts[1]))


def evaluate_per_rank(
    model: torch.nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    comm: MPI.Comm,
    members: Sequence[ContextManager] = (),
) -> tuple[float, list[float]]:
    """Each isolated rank scores the whole test set with its own model; returns (mean, per-rank
    in rank order). ``members``: one context per isolated rank this process holds, within which
    ``model`` is that rank's (``Segments.members()`` under virtual ranks); none: the process is
    one rank."""
    mine = []
    for view in members or [contextlib.nullcontext()]:
        with view:
            mine.append(count_correct(model, x_test, y_test) / max(1, x_test.shape[0]))
    per_rank = [float(a) for part in comm.allgather(mine) for a in part]
    return float(np.mean(per_rank)), per_rank
