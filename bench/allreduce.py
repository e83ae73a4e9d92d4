"""nccl-tests/OSU-style allreduce table: raw MPI vs disdl_mpi's allreducer vs gloo/NCCL.

    mpiexec -n 2 python -m bench.allreduce --min-bytes 1K --max-bytes 16M --factor 4

Backends, interleaved per message size so the noisy shared machine affects all alike:
  mpi    mpi4py ``Allreduce`` on a numpy array (in place, or ``--out-of-place``): the ceiling;
  disdl  GradientAllreducer on a one-parameter "model" of that size, through the real bucketing
         and staging path (gradient marked ready as the autograd hook would; weight 1, a sum);
         ``--compress fp16`` sends it as float16;
  gloo   torch.distributed ``all_reduce`` on CPU tensors; nccl the same on CUDA (--device cuda).
Per size: ``--iters`` timed samples, each from a barrier: one call, or ``--block K`` calls back
to back (then a sample is their mean, free of the barrier's skew); the slowest rank's time per
call; the table gives the mean (time_us, algbw, busbw = algbw * 2(n-1)/n as nccl-tests defines
it) and min/p50/p95/p99/max and the coefficient of variation. Then every backend is checked
(nccl-tests' -c, on by default): rank r contributes (r+1) + (i mod 7) at element i, and the
result must be the exact sum; ``#wrong`` counts mismatching elements on any rank (for fp16 on
the wire the maximum relative error is reported instead). ``--min-busbw G`` exits 1 when a
size's busbw (of ``disdl``, else the first backend) is below G GB/s: a health check for jobs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from bench.harness import (
    add_block,
    add_size_range,
    exit_cleanly,
    parse_list,
    sizes,
    time_variants,
    write_rows,
)
from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.comm.torch_group import nccl_usable, over_torch, start_process_group
from disdl_mpi.comm.world import install_abort_handler, mpi_library, rank_info
from disdl_mpi.device import select_device
from disdl_mpi.options import add_json, program_parser

BACKENDS = ("mpi", "disdl", "gloo", "nccl")
DTYPES = {
    "float32": (np.float32, torch.float32),
    "float16": (np.float16, torch.float16),
    "float64": (np.float64, torch.float64),
}


def build_parser() -> argparse.ArgumentParser:
    p = program_parser("python -m bench.allreduce", __doc__)
    add_size_range(p, "1K", "16M")
    p.add_argument(
        "--backends",
        default=None,
        help="comma list of mpi, disdl, gloo (CPU), nccl (CUDA); default "
        "mpi,disdl,gloo on the CPU, mpi,disdl,nccl on CUDA",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the disdl and nccl buffers live (cuda: the allreducer's real "
        "CUDA-aware or host-staged path)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--iters", "-n", type=int, default=20)
    p.add_argument("--warmup", "-w", type=int, default=5)
    add_block(p)
    p.add_argument("--bucket-mb", type=float, default=1.0, help="allreducer bucket cap (disdl)")
    p.add_argument("--compress", choices=["none", "fp16"], default="none", help="disdl's wire format")
    p.add_argument("--cuda-aware", choices=["auto", "yes", "no"], default="auto", help="disdl on GPU buffers")
    p.add_argument("--out-of-place", action="store_true", help="raw MPI: separate send and receive buffers")
    p.add_argument(
        "--no-check", dest="check", action="store_false", help="skip checking every reduced buffer"
    )
    p.add_argument(
        "--min-busbw",
        type=float,
        default=None,
        metavar="GBPS",
        help="exit 1 when a size's busbw (disdl, else the first backend) is below "
        "this (GB/s): a health check for batch jobs",
    )
    add_json(p, "write the rows as JSON (the input of bench.studies.costmodel)")
    return p


class Op:
    """One backend at one size: ``run()`` is the timed call, ``check()`` the correctness test."""

    def __init__(
        self,
        backend: str,
        comm: MPI.Comm,
        count: int,
        np_dtype,
        t_dtype,
        device: torch.device,
        args: argparse.Namespace,
    ) -> None:
        self.backend, self.comm, self.red = backend, comm, None
        rank, n = comm.Get_rank(), comm.Get_size()
        pattern = (rank + 1) + (np.arange(count) % 7)
        self.expected = n * (n + 1) / 2 + n * (np.arange(count) % 7)
        if backend == "mpi":
            self.buf = np.ones(count, dtype=np_dtype)
            self.out = np.empty_like(self.buf) if args.out_of_place else None
            self._fill = lambda: self.buf.__setitem__(slice(None), pattern)
        elif backend == "disdl":
            model = nn.Module()
            model.weight = nn.Parameter(torch.zeros(count, dtype=t_dtype, device=device))
            self.red = GradientAllreducer(
                model,
                comm,
                bucket_mb=args.bucket_mb,
                overlap=True,
                compress=args.compress,
                cuda_aware=args.cuda_aware,
            )
            self.param = model.weight
            self._fill = lambda: self.param.grad.copy_(torch.from_numpy(pattern))
        else:
            self.tensor = torch.ones(count, dtype=t_dtype, device=device)
            self._fill = lambda: self.tensor.copy_(torch.from_numpy(pattern))

    def run(self) -> None:
        if self.backend == "mpi":
            if self.out is None:
                self.comm.Allreduce(MPI.IN_PLACE, self.buf, op=MPI.SUM)
            else:
                self.comm.Allreduce(self.buf, self.out, op=MPI.SUM)
        elif self.backend == "disdl":
            self.red.begin_step(1.0)
            self.red.grad_ready(self.param)  # what the post-accumulate-grad hook does
            self.red.finish_step()
        else:
            import torch.distributed as dist

            dist.all_reduce(self.tensor)

    def result(self) -> np.ndarray:
        if self.backend == "mpi":
            return self.buf if self.out is None else self.out
        t = self.param.grad if self.backend == "disdl" else self.tensor
        return t.detach().double().cpu().numpy()

    def check(self) -> tuple[int, float]:
        """Collective: (#wrong elements summed over ranks, max relative error over ranks)."""
        self._fill()
        self.run()
        got = np.array(self.result(), dtype=np.float64)
        wrong = int(np.count_nonzero(got != self.expected))
        rel = float(np.max(np.abs(got - self.expected) / self.expected)) if len(got) else 0.0
        return (self.comm.allreduce(wrong, op=MPI.SUM), self.comm.allreduce(rel, op=MPI.MAX))

    def close(self) -> None:
        if self.red is not None:
            self.red.close()


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict]:
    rank, n = comm.Get_rank(), comm.Get_size()
    cuda = args.device == "cuda"
    default = "mpi,disdl,nccl" if cuda else "mpi,disdl,gloo"
    backends = parse_list(args.backends or default, BACKENDS)
    device = select_device("cuda" if cuda else "cpu", rank_info(comm))
    skipped = ""
    if "nccl" in backends:
        usable, why = nccl_usable(comm)
        if not usable:
            backends = [b for b in backends if b != "nccl"]
            skipped = f"# nccl: skipped ({why})"
    np_dtype, t_dtype = DTYPES[args.dtype]
    elem = np.dtype(np_dtype).itemsize
    torch_backend = next((b for b in backends if over_torch(b)), None)
    if torch_backend is not None:
        start_process_group(comm, torch_backend)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    fp16_wire = args.compress == "fp16"
    rows: list[dict] = []
    if rank == 0:
        _print_header(args, n, skipped)
    for nbytes in sizes(args.min_bytes, args.max_bytes, args.factor, elem):
        for backend in backends:  # interleaved: every backend at this size, side by side
            where = device if backend in ("disdl", "nccl") else torch.device("cpu")
            op = Op(backend, comm, nbytes // elem, np_dtype, t_dtype, where, args)
            row = _measure(op, args, nbytes, nbytes // elem, n, sync)
            rows.append(row)
            if rank == 0:
                lossy = fp16_wire and backend == "disdl"
                check = (
                    "-" if not args.check else f"{row['max_rel_error']:.1e}" if lossy else str(row["wrong"])
                )
                print(
                    f"  {backend:>7} {nbytes:>11d} {args.dtype:>8} {row['time_us']:>10.1f} "
                    f"{row['algbw_gbps']:>8.3f} {row['busbw_gbps']:>8.3f} {row['min_us']:>9.1f} "
                    f"{row['p50_us']:>9.1f} {row['p95_us']:>9.1f} {row['p99_us']:>9.1f} "
                    f"{row['max_us']:>9.1f} {row['cv']:>6.2f} {check:>7}",
                    flush=True,
                )
    return rows


def _print_header(args: argparse.Namespace, n: int, skipped: str) -> None:
    print(
        f"# disdl-mpi allreduce: {n} ranks, {mpi_library()}, torch {torch.__version__}, "
        f"iters {args.iters} x {args.block} call(s), warmup {args.warmup}, "
        f"bucket_mb {args.bucket_mb}, "
        f"{'out-of-place' if args.out_of_place else 'in place'}, device {args.device}"
        + (", disdl with fp16 on the wire" if args.compress == "fp16" else "")
    )
    print(f"# {os.environ.get('DISDL_ALLREDUCE_SELECTION', 'MPI default algorithms')}")
    if skipped:
        print(skipped)
    print(
        f"# {'backend':>7} {'bytes':>11} {'dtype':>8} {'time_us':>10} {'algbw':>8} "
        f"{'busbw':>8} {'min_us':>9} {'p50_us':>9} {'p95_us':>9} {'p99_us':>9} "
        f"{'max_us':>9} {'cv':>6} {'#wrong':>7}"
    )


def _measure(op: Op, args: argparse.Namespace, nbytes: int, count: int, n: int, sync: Callable) -> dict:
    """Time ``op`` (collective), check its result when asked, and return its table row."""
    backend = op.backend
    t = time_variants(
        op.comm, {backend: op.run}, iters=args.block, rounds=args.iters, warmup=args.warmup, sync=sync
    )
    wrong, rel = op.check() if args.check else (None, None)
    op.close()
    calls = sorted(t.wall[backend])
    sec = float(np.mean(calls))
    algbw = nbytes / sec / 1e9
    row = {
        "backend": backend,
        "bytes": nbytes,
        "count": count,
        "dtype": args.dtype,
        "device": "cpu" if backend in ("mpi", "gloo") else args.device,
        "ranks": n,
        "block": args.block,
        "time_us": sec * 1e6,
        "algbw_gbps": algbw,
        "busbw_gbps": algbw * 2 * (n - 1) / n,
        "min_us": calls[0] * 1e6,
        "p50_us": t.percentile(backend, 50) * 1e6,
        "p95_us": t.percentile(backend, 95) * 1e6,
        "p99_us": t.percentile(backend, 99) * 1e6,
        "max_us": calls[-1] * 1e6,
        "cv": float(np.std(calls) / sec) if sec > 0 else 0.0,
        "in_place": not args.out_of_place or backend != "mpi",
        "selection": os.environ.get("DISDL_ALLREDUCE_SELECTION", "MPI default"),
    }
    if args.check:
        row["wrong"] = None if args.compress == "fp16" and backend == "disdl" else wrong
        row["max_rel_error"] = rel
    if op.red is not None:
        row["path"] = op.red.path
    return row


def health(rows: list[dict], min_busbw: float) -> list[str]:
    """Sizes whose busbw (disdl's, else the first backend's) is below ``min_busbw`` GB/s."""
    names = [r["backend"] for r in rows]
    watched = "disdl" if "disdl" in names else (names[0] if names else None)
    return [
        f"{r['backend']} at {r['bytes']} bytes: busbw {r['busbw_gbps']:.3f} GB/s < {min_busbw} GB/s"
        for r in rows
        if r["backend"] == watched and r["busbw_gbps"] < min_busbw
    ]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    install_abort_handler(comm)
    problem = None
    if args.iters < 1 or args.warmup < 0 or args.factor < 1 or args.min_bytes > args.max_bytes:
        problem = "need --iters >= 1, --warmup >= 0, --factor >= 1, --min-bytes <= --max-bytes"
    elif args.device == "cuda" and not torch.cuda.is_available():
        problem = "--device cuda, but torch sees no CUDA device"
    elif args.backends and "nccl" in args.backends and args.device != "cuda":
        problem = "the nccl backend needs --device cuda"
    if problem:
        if comm.Get_rank() == 0:
            print(f"error: {problem}", file=sys.stderr)
        exit_cleanly(comm, 2)
    torch.set_num_threads(1)
    rows = run(args, comm)
    code = 0
    if comm.Get_rank() == 0:
        if args.json_path:
            write_rows(args.json_path, "bench.allreduce", rows)
        wrong = [r for r in rows if r.get("wrong")]
        for r in wrong:
            print(
                f"error: {r['backend']} at {r['bytes']} bytes: {r['wrong']} wrong element(s)", file=sys.stderr
            )
        low = health(rows, args.min_busbw) if args.min_busbw is not None else []
        for line in low:
            print(f"error: --min-busbw: {line}", file=sys.stderr)
        code = 1 if wrong or low else 0
    exit_cleanly(comm, comm.bcast(code, root=0))


if __name__ == "__main__":
    sys.exit(main())
