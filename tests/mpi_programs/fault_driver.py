"""Fault-injection wrapper around ``python -m disdl_mpi.run`` for the fault suite.

Launched as ``mpiexec -n N python -m tests.mpi_programs.fault_driver [run options]``. Faults come
from environment variables so the run's own command line stays exactly what users type:

- ``FAULT_PIDS=DIR``: every rank writes ``DIR/rank<R>.pid`` (the test signals/kills by pid).
- ``FAULT_PROGRESS=FILE``: rank 0 rewrites FILE with ``<scheme> <step>`` after every step.
- ``FAULT_STEP_SLEEP=S``: every rank sleeps S seconds per step (time for a test to react).
- ``FAULT_NAN=RANK:STEP:KIND``: on RANK, the STEP-th training loss (1-based) is made
  non-finite; KIND ``loss`` poisons the loss value, ``grad`` keeps the loss finite and
  poisons only its gradient.
- ``FAULT_EXTRA_BARRIER=RANK``: RANK calls one extra Barrier before its first evaluation, a
  real collective-ordering bug for ``--check-collectives`` to catch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

import disdl_mpi.run as run
from disdl_mpi.evaluate import evaluate_sharded
from disdl_mpi.step import summed_cross_entropy
from disdl_mpi.train_context import TrainHooks

RANK = MPI.COMM_WORLD.Get_rank()


def _pids() -> None:
    d = os.environ.get("FAULT_PIDS")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / f"rank{RANK}.pid").write_text(str(os.getpid()))


def _progress(hooks: TrainHooks) -> None:
    path = os.environ.get("FAULT_PROGRESS")
    pause = float(os.environ.get("FAULT_STEP_SLEEP", "0") or 0)
    if not path and not pause:
        return

    def on_step(step: int, total: int, label: str) -> None:
        if path and RANK == 0:
            tmp = Path(path + ".tmp")
            tmp.write_text(f"{label.split()[0]} {step}\n")
            os.replace(tmp, path)
        if pause:
            time.sleep(pause)

    hooks.on_step = on_step


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _nan(hooks: TrainHooks) -> None:
    spec = os.environ.get("FAULT_NAN")
    if not spec:
        return
    rank, step, kind = spec.split(":")
    if int(rank) != RANK:
        return
    calls = [0]

    def poisoned(logits, labels):
        loss = summed_cross_entropy(logits, labels)
        calls[0] += 1  # the training loss, once per step
        if calls[0] == int(step):
            return loss * float("nan") if kind == "loss" else _PoisonGrad.apply(loss)
        return loss

    hooks.loss_fn = poisoned


def _extra_barrier(hooks: TrainHooks) -> None:
    spec = os.environ.get("FAULT_EXTRA_BARRIER")
    if not spec or int(spec) != RANK:
        return
    done = [False]

    def buggy(model, x, y, comm):
        if not done[0]:
            done[0] = True
            comm.Barrier()
        return evaluate_sharded(model, x, y, comm)

    hooks.evaluate = buggy


if __name__ == "__main__":
    _pids()
    hooks = TrainHooks()
    _progress(hooks)
    _nan(hooks)
    _extra_barrier(hooks)
    sys.exit(run.main(sys.argv[1:], hooks=hooks))
