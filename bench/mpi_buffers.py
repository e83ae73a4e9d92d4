"""Does the memory behind an MPI buffer matter? The same allreduce from differently allocated buffers.

    mpiexec -n 2 python -m bench.mpi_buffers -b 256K -e 16M

For each size, side by side in one job (time_variants: interleaved rounds, max over ranks), an
in-place float32 sum of equal length, five ways, every buffer written before the first call:

- ``numpy``: ``np.zeros`` (numpy asks the kernel for transparent huge pages on large arrays);
- ``torch``: ``torch.zeros(...).numpy()`` (torch's CPU allocator: no huge-page advice);
- ``allreducer``: the bucket buffer of ``GradientAllreducer`` (what training reduces);
- blocking ``Allreduce`` and nonblocking ``Iallreduce`` + ``Wait`` on the numpy buffer;
- ``allreducer step``: the allreducer's whole step on its bucket (``begin_step``, the hook's
  ``grad_ready``, ``finish_step``), i.e. ``allreducer Iallreduce`` plus the Python around it.

This is the probe behind the allreducer's numpy-allocated buckets (docs/BENCHMARKS.md, issue 16):
it separates the MPI call (blocking or not) from the memory it reads, and the allreducer's fixed
cost from both. ``--block K`` times K calls back to back per sample (OSU's and nccl-tests' way)
instead of one call after a barrier: the per-call mean then carries no barrier skew, which is
what a few-µs difference needs. Buffers hold zeros, so repeated sums stay finite.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from bench.harness import add_block, add_size_range, main_rows, sizes, time_variants
from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.comm.world import mpi_library
from disdl_mpi.options import add_json, program_parser

VARIANTS = (
    "numpy Allreduce",
    "numpy Iallreduce",
    "torch Iallreduce",
    "allreducer Iallreduce",
    "allreducer step",
)


def build_parser() -> argparse.ArgumentParser:
    p = program_parser("python -m bench.mpi_buffers", __doc__)
    add_size_range(p, "256K", "16M")
    p.add_argument("--iters", "-n", type=int, default=30)
    p.add_argument("--warmup", "-w", type=int, default=5)
    add_block(p)
    add_json(p, "write the rows as JSON")
    return p


def calls(comm: MPI.Comm, count: int) -> tuple[dict[str, Callable[[], None]], GradientAllreducer]:
    """The variants at ``count`` float32 elements (every buffer written once)."""
    a = np.zeros(count, np.float32)
    t = torch.zeros(count).numpy()
    model = nn.Module()
    model.weight = nn.Parameter(torch.zeros(count))
    red = GradientAllreducer(model, comm)
    b = red.buckets[0].mpi_buf
    for buf in (a, t, b):
        buf[:] = 0.0  # a write faults every page in; zeros keep repeated sums finite

    param = model.weight  # looked up once: nn.Module's __getattr__ costs ~0.5 µs a call

    def step() -> None:
        red.begin_step(1.0)
        red.grad_ready(param)  # what the post-accumulate-grad hook does
        red.finish_step()

    return {
        "numpy Allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, a),
        "numpy Iallreduce": lambda: comm.Iallreduce(MPI.IN_PLACE, a).Wait(),
        "torch Iallreduce": lambda: comm.Iallreduce(MPI.IN_PLACE, t).Wait(),
        "allreducer Iallreduce": lambda: comm.Iallreduce(MPI.IN_PLACE, b).Wait(),
        "allreducer step": step,
    }, red


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict]:
    rows = []
    if comm.Get_rank() == 0:
        print(
            f"# bench.mpi_buffers: {comm.Get_size()} ranks, {mpi_library()}; "
            f"mean µs per in-place float32 sum (p50 in brackets), {args.block} call(s) "
            f"per sample"
        )
        print("# " + " ".join(f"{v:>24}" for v in ("bytes", *VARIANTS)))
    for nbytes in sizes(args.min_bytes, args.max_bytes, args.factor, 4):
        fns, red = calls(comm, nbytes // 4)
        t = time_variants(comm, fns, iters=args.block, rounds=args.iters, warmup=args.warmup)
        red.close()
        row = {"bytes": nbytes, "ranks": comm.Get_size()}
        for v in VARIANTS:
            row[f"{v} us"] = float(np.mean(t.wall[v])) * 1e6
            row[f"{v} p50 us"] = t.percentile(v, 50) * 1e6
        rows.append(row)
        if comm.Get_rank() == 0:
            cells = [f"{row[f'{v} us']:.1f} ({row[f'{v} p50 us']:.1f})" for v in VARIANTS]
            print("  " + " ".join(f"{c:>24}" for c in (str(nbytes), *cells)), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    return main_rows(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
