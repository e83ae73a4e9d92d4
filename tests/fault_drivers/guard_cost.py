"""Side-by-side cost of the reliability machinery (``mpiexec -n N python guard_cost.py``).

Prints rank 0's JSON: the per-step agreement (one Allreduce of 3 int64) next to a bare
Barrier, a 4 KiB Allreduce raw vs through --check-collectives' CheckedComm, and one CNN
backward with and without the local NaN/Inf gradient probe. Medians of interleaved repeats.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from disdl_mpi.comm.collective_check import CheckedComm, CollectiveChecker
from disdl_mpi.reliability.guards import GradFiniteProbe, StepGuard
from disdl_mpi.models import build_model
from disdl_mpi.norms import get_scheme


def per_call(fn, reps: int) -> float:
    MPI.COMM_WORLD.Barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> int:
    comm = MPI.COMM_WORLD
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    guard = StepGuard(comm, None)
    checked = CheckedComm(comm, CollectiveChecker(comm))
    buf = np.zeros(1024, dtype=np.float32)
    rounds: dict[str, list[float]] = {k: [] for k in ("barrier", "guard", "allreduce_4k",
                                                      "allreduce_4k_checked")}
    for _ in range(5):  # interleaved, so load changes hit every variant alike
        rounds["barrier"].append(per_call(comm.Barrier, reps))
        rounds["guard"].append(per_call(lambda: guard.decide(False, False), reps))
        rounds["allreduce_4k"].append(per_call(
            lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), reps))
        rounds["allreduce_4k_checked"].append(per_call(
            lambda: checked.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), reps))
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, get_scheme("gn").layer)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    probe = None

    def backward():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if probe is not None:
            probe.take()

    fb = {"fwd_bwd": [], "fwd_bwd_probe": []}
    for _ in range(5):
        probe = None
        fb["fwd_bwd"].append(per_call(backward, 200))
        probe = GradFiniteProbe(model)
        fb["fwd_bwd_probe"].append(per_call(backward, 200))
        probe.close()
    rounds.update(fb)
    if comm.Get_rank() == 0:
        print(json.dumps({k: round(statistics.median(v) * 1e6, 1) for k, v in rounds.items()}
                         | {"unit": "us per call (median of 5)", "ranks": comm.Get_size(),
                            "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
