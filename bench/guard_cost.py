"""Side-by-side cost of the reliability machinery: ``mpiexec -n N python -m bench.guard_cost``.

Prints rank 0's row as JSON (and writes it to ``--json FILE``): the per-step agreement (one
Allreduce of 3 int64) next to a bare Barrier, a 4 KiB Allreduce raw vs through
--check-collectives' CheckedComm, and one CNN forward+backward with and without the local
NaN/Inf gradient probe, and a training-like step (forward, backward, a 4 KiB Allreduce, the
watchdog's phase marks) with the stall watchdog off, on as by default (a heartbeat every 2 s)
and with a 50 ms heartbeat. Medians of 5 interleaved rounds (the watchdog rows: of alternating
blocks, since a thread is on or off for a whole block), max over ranks.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from bench.harness import time_variants, write_rows
from disdl_mpi.comm.collective_check import CheckedComm, CollectiveChecker
from disdl_mpi.models import build_model
from disdl_mpi.norms import get_scheme
from disdl_mpi.options import add_json, program_parser
from disdl_mpi.reliability.guards import GradFiniteProbe, StepGuard
from disdl_mpi.reliability.watchdog import StallPolicy, StallWatchdog


def main(argv: list[str] | None = None) -> int:
    p = program_parser("python -m bench.guard_cost", __doc__)
    p.add_argument("reps", nargs="?", type=int, default=2000, help="calls per timed block")
    add_json(p)
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    guard = StepGuard(comm, None)
    checked = CheckedComm(comm, CollectiveChecker(comm))
    buf = np.zeros(1024, dtype=np.float32)
    coll = time_variants(
        comm,
        {
            "barrier": comm.Barrier,
            "guard": lambda: guard.decide(False, False),
            "allreduce_4k": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
            "allreduce_4k_checked": lambda: checked.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
        },
        iters=args.reps,
        rounds=5,
    )
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, get_scheme("gn").layer)
    probed = copy.deepcopy(model)  # the same network, with the probe's hooks on it
    probe = GradFiniteProbe(probed)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def fwd_bwd() -> None:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def fwd_bwd_probe() -> None:
        probed.zero_grad()
        F.cross_entropy(probed(x), y).backward()
        probe.take()

    comp = time_variants(comm, {"fwd_bwd": fwd_bwd, "fwd_bwd_probe": fwd_bwd_probe}, iters=200, rounds=5)
    watched = watchdog_cost(comm, fwd_bwd, buf, steps=max(50, args.reps // 10))
    if comm.Get_rank() == 0:
        out = {k: round(coll.median(k) * 1e6, 1) for k in coll.wall}
        out |= {k: round(comp.median(k) * 1e6, 1) for k in comp.wall}
        out |= {k: round(v * 1e6, 1) for k, v in watched.items()}
        row = out | {
            "unit": "us per call (median of 5)",
            "ranks": comm.Get_size(),
            "torch_threads": torch.get_num_threads(),
        }
        print(json.dumps(row))
        if args.json_path:
            write_rows(args.json_path, "bench.guard_cost", [row])
    return 0


def watchdog_cost(comm: MPI.Comm, fwd_bwd, buf: np.ndarray, *, steps: int) -> dict[str, float]:
    """Seconds per training-like step with the watchdog off, at its default heartbeat, and at
    a 50 ms one: alternating blocks of ``steps`` steps, 5 of each, the median per variant."""
    policies = {
        "step_no_watchdog": None,
        "step_watchdog_default": StallPolicy.default(),
        "step_watchdog_50ms": StallPolicy.fixed(0.4),  # interval = 0.4 / 8
    }
    seen: dict[str, list[float]] = {k: [] for k in policies}
    for r in range(5):
        for name in list(policies) if r % 2 == 0 else list(policies)[::-1]:
            dog = StallWatchdog(comm, policies[name]) if policies[name] else None
            mark = dog.enter if dog else (lambda step, phase: None)

            def step(n: int = 0, mark=mark) -> None:
                mark(n, "forward")
                fwd_bwd()
                mark(n, "allreduce")
                comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
                mark(n, "optimizer")

            t = time_variants(comm, {name: step}, iters=steps, warmup=2)
            if dog:
                dog.enter(-1, "done")  # never stalls: the blocks end together
                comm.Barrier()
                dog.close()
            seen[name].append(t.median(name))
    return {k: float(np.median(v)) for k, v in seen.items()}


if __name__ == "__main__":
    sys.exit(main())
