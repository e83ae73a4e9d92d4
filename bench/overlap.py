"""Nonblocking allreduce overlap, in the style of OSU's ``osu_iallreduce``.

    mpiexec -n 2 python -m bench.overlap -b 64K -e 16M

For each size, side by side in one job (time_variants: interleaved rounds, max over ranks):

- ``pure``: the reduction alone;
- ``compute``: the stand-in for backward alone: ``--slices`` pieces of matrix work, calibrated
  so that together they take as long as ``pure`` (OSU's choice: the most there is to hide);
- ``overall``: both, interleaved the way training interleaves them;
- overlap % = 100 × (1 − (overall − compute) / pure), clipped to [0, 100].

Two engines: ``disdl`` is ``GradientAllreducer`` with one bucket per slice, fed by
``grad_ready`` after each slice exactly as the autograd hook feeds it, so its progress strategy
(test the oldest request from every hook) is the one measured; ``mpi`` is one
``Iallreduce`` of the whole buffer with ``Test`` after each slice, as osu_iallreduce does.
Without an asynchronous progress thread MPICH advances a request only inside MPI calls, which
is why where the tests fall matters.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from bench.harness import add_size_range, main_rows, sizes, time_variants
from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.comm.world import mpi_library
from disdl_mpi.options import add_json, program_parser


def build_parser() -> argparse.ArgumentParser:
    p = program_parser("python -m bench.overlap", __doc__)
    add_size_range(p, "64K", "16M")
    p.add_argument(
        "--slices", type=int, default=8, help="pieces of compute, each followed by one bucket (default 8)"
    )
    p.add_argument("--iters", "-n", type=int, default=20)
    p.add_argument("--warmup", "-w", type=int, default=3)
    add_json(p, "write the rows as JSON")
    return p


class Work:
    """Matrix multiplications in ``slices`` equal pieces; ``reps`` sets their total length."""

    def __init__(self) -> None:
        self.a = torch.randn(64, 64)
        self.c = torch.empty(64, 64)
        self.reps = 1

    def piece(self) -> None:
        for _ in range(self.reps):
            torch.mm(self.a, self.a, out=self.c)

    def calibrate(self, seconds: float, slices: int, comm: MPI.Comm, tries: int = 5) -> None:
        """Choose ``reps`` so that ``slices`` pieces take ``seconds`` (rank 0's measure).

        The fastest of ``tries`` timings sets the rate: a rank descheduled during one timing
        (likely on an oversubscribed node) would otherwise make the stand-in far too short."""
        self.reps = 40
        times = []
        for _ in range(tries):
            t0 = time.perf_counter()
            self.piece()
            times.append(time.perf_counter() - t0)
        per_rep = max(1e-9, min(times) / self.reps)
        reps = max(1, int(round(seconds / slices / per_rep)))
        self.reps = comm.bcast(reps, root=0)


class Engines:
    """The pure, compute-only and overlapped variants of both engines at one size."""

    def __init__(self, comm: MPI.Comm, nbytes: int, slices: int) -> None:
        self.comm, self.work, self.slices = comm, Work(), slices
        count = max(slices, nbytes // 4)
        per = count // slices
        self.model = nn.Module()
        self.params = []
        for i in range(slices):
            p = nn.Parameter(torch.zeros(per + (count - per * slices if i == 0 else 0)))
            self.model.register_parameter(f"p{i}", p)
            self.params.append(p)
        # One bucket per slice: the cap is one slice's bytes (buckets fill in reverse order).
        self.red = GradientAllreducer(self.model, comm, bucket_mb=(per * 4 + 1) / 2**20, overlap=True)
        self.buf = np.ones(count, dtype=np.float32)

    def disdl(self, compute: bool) -> None:
        self.red.begin_step(1.0)
        for p in reversed(self.params):  # the order backward produces gradients
            if compute:
                self.work.piece()
            self.red.grad_ready(p)
        self.red.finish_step()

    def mpi(self, compute: bool) -> None:
        req = self.comm.Iallreduce(MPI.IN_PLACE, self.buf, op=MPI.SUM)
        for _ in range(self.slices):
            if compute:
                self.work.piece()
            req.Test()
        req.Wait()

    def compute(self) -> None:
        for _ in range(self.slices):
            self.work.piece()


def overlap_pct(overall: float, compute: float, pure: float) -> float:
    """OSU's overlap: how much of the pure communication time the compute hid."""
    if pure <= 0:
        return 0.0
    return float(min(100.0, max(0.0, 100.0 * (1.0 - (overall - compute) / pure))))


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict]:
    rows = []
    if comm.Get_rank() == 0:
        print(
            f"# disdl-mpi overlap (osu_iallreduce style): {comm.Get_size()} ranks, "
            f"{mpi_library()}, {args.slices} slices, iters {args.iters}"
        )
        print(
            f"# {'engine':>6} {'bytes':>10} {'overall_us':>11} {'compute_us':>11} "
            f"{'pure_us':>9} {'overlap_%':>9}"
        )
    for nbytes in sizes(args.min_bytes, args.max_bytes, args.factor, 4):
        e = Engines(comm, nbytes, args.slices)
        for engine in ("disdl", "mpi"):
            step = getattr(e, engine)
            # the closures run inside this iteration, with this engine's step
            pure = time_variants(comm, {"pure": lambda: step(False)}, rounds=args.iters, warmup=args.warmup)  # noqa: B023
            e.work.calibrate(pure.median("pure"), args.slices, comm)
            t = time_variants(
                comm,
                {"pure": lambda: step(False), "compute": e.compute, "overall": lambda: step(True)},  # noqa: B023
                rounds=args.iters,
                warmup=args.warmup,
            )
            med = {k: t.median(k) for k in ("overall", "compute", "pure")}
            row = {
                "engine": engine,
                "bytes": nbytes,
                "ranks": comm.Get_size(),
                "slices": args.slices,
                **{f"{k}_us": v * 1e6 for k, v in med.items()},
                "overlap_pct": overlap_pct(med["overall"], med["compute"], med["pure"]),
            }
            rows.append(row)
            if comm.Get_rank() == 0:
                print(
                    f"  {engine:>6} {nbytes:>10} {row['overall_us']:>11.1f} "
                    f"{row['compute_us']:>11.1f} {row['pure_us']:>9.1f} "
                    f"{row['overlap_pct']:>9.1f}",
                    flush=True,
                )
        e.red.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    return main_rows(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
