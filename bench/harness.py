"""What every in-job benchmark shares: one timing harness (:func:`time_variants`), the size
ladder and its options, the one JSON shape (:func:`write_rows`), starting torch.distributed
(gloo/nccl) next to MPI, and leaving it without gloo's abort at exit."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from disdl_mpi.comm.torch_group import flush_and_stop
from disdl_mpi.options import positive_int
from disdl_mpi.units import parse_size


def exit_cleanly(comm: MPI.Comm, code: int = 0) -> None:
    """Leave without gloo's 'terminate called without an active exception' abort.

    Stop the process group (a barrier, then destroy), then ``os._exit`` (skipping the
    interpreter teardown where gloo's threads abort); MPI is finalized by hand since atexit
    handlers will not run.
    """
    flush_and_stop(comm)
    sys.stdout.flush()
    MPI.Finalize()
    os._exit(code)


def main_rows(build_parser: Callable, run: Callable, argv: Optional[list[str]] = None) -> int:
    """The main of a benchmark that prints one table: parse the options, abort the whole job
    if a rank fails, one torch thread per rank, ``run(args, comm)`` -> rows, and rank 0
    writes them to ``--json`` when asked (:func:`write_rows`)."""
    import torch

    from disdl_mpi.comm.world import install_abort_handler

    parser = build_parser()
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    install_abort_handler(comm)
    torch.set_num_threads(1)
    rows = run(args, comm)
    if comm.Get_rank() == 0 and args.json_path:
        write_rows(args.json_path, parser.prog.split()[-1], rows)  # 'python -m bench.X'
    return 0


def write_rows(path: str | Path, program: str, rows: list[dict], **meta: Any) -> None:
    """The one JSON shape every in-job benchmark writes with ``--json FILE``:
    ``{"program": "bench.X", "rows": [...], ...meta}`` (atomically)."""
    from disdl_mpi.files import write_json

    write_json(path, {"program": program, "rows": rows, **meta})


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a benchmark's ``--json`` file (also the bare row list that bench.allreduce
    wrote before 2026-12-03, as in docs/benchmarks/)."""
    data = json.loads(Path(path).read_text())
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise ValueError(
            f"{path}: expected a benchmark's JSON ({{'rows': [...]}}), found {type(data).__name__}"
        )
    return rows


def parse_list(text: str, allowed: Optional[tuple[str, ...]] = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise SystemExit(f"unknown choice(s) {', '.join(bad)}; pick from {', '.join(allowed)}")
    return items


@dataclass
class Timings:
    """Seconds per call of each variant, one value per timed round, max over ranks."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]  # this thread's CPU time (robust to a busy machine)

    def median(self, name: str, clock: str = "wall") -> float:
        return statistics.median(getattr(self, clock)[name])

    def mean(self, name: str, clock: str = "wall") -> float:
        return statistics.fmean(getattr(self, clock)[name])

    def percentile(self, name: str, p: float, clock: str = "wall") -> float:
        s = sorted(getattr(self, clock)[name])
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def time_variants(
    comm: MPI.Comm,
    variants: dict[str, Callable[[], None]],
    *,
    iters: int = 1,
    warmup: int = 0,
    rounds: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> Timings:
    """The one timing loop of the in-job benchmarks (nccl-tests' harness, in spirit).

    1. warm-up: every variant runs ``warmup`` untimed calls;
    2. ``rounds`` timed rounds; each runs every variant's block of ``iters`` calls, in
       alternating order (A B, then B A: noise on a shared machine hits all variants alike),
       each block starting from a Barrier so the ranks start together;
    3. per-call seconds of each block, wall and CPU, reduced to the slowest rank (one
       Allreduce(MAX) at the end, so the timed blocks hold no extra collective).

    ``sync`` waits for queued device work (CUDA) before a clock is read.
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            comm.Barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(iters):
                variants[name]()
            sync()
            wall[name].append((time.perf_counter() - t0) / iters)
            cpu[name].append((time.thread_time() - c0) / iters)
    flat = np.array([v for n in names for v in (*wall[n], *cpu[n])], dtype=np.float64)
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.MAX)
    out_wall, out_cpu, i = {}, {}, 0
    for n in names:
        out_wall[n] = flat[i : i + rounds].tolist()
        out_cpu[n] = flat[i + rounds : i + 2 * rounds].tolist()
        i += 2 * rounds
    return Timings(out_wall, out_cpu)


# ---- the size ladder and its options (nccl-tests' -b/-e/-f), shared by every sweep ----


def parse_bytes(text: str) -> int:
    """'64', '4K', '1M', '1G' (powers of 1024) -> bytes, as argparse wants its errors."""
    try:
        return parse_size(text, "byte size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def sizes(min_bytes: int, max_bytes: int, factor: float, elem: int) -> list[int]:
    out, b = [], max(min_bytes, elem)
    while b <= max_bytes:
        nb = max(elem, (b // elem) * elem)
        if not out or nb != out[-1]:
            out.append(nb)
        b = int(b * factor) if factor > 1 else max_bytes + 1
    return out


def add_size_range(p: argparse.ArgumentParser, min_bytes: str, max_bytes: str) -> None:
    """nccl-tests' size options: -b first size, -e last size, -f multiplication factor."""
    p.add_argument("--min-bytes", "-b", type=parse_bytes, default=parse_bytes(min_bytes))
    p.add_argument("--max-bytes", "-e", type=parse_bytes, default=parse_bytes(max_bytes))
    p.add_argument("--factor", "-f", type=float, default=4.0)


def add_block(p: argparse.ArgumentParser) -> None:
    """--block K: calls timed back to back per sample (OSU's and nccl-tests' way); 1 times
    each call alone after a barrier, which gives per-call percentiles but carries the
    barrier's skew between ranks (a few µs)."""
    p.add_argument(
        "--block",
        type=positive_int,
        default=1,
        help="calls per timed sample (default 1: one call after a barrier)",
    )
