"""nccl-tests-style allreduce bandwidth table: raw MPI vs disdl_mpi's allreducer vs gloo.

    mpiexec -n 2 python -m bench.allreduce --min-bytes 1K --max-bytes 16M --factor 4

Backends, interleaved per message size so the noisy shared machine affects all alike:
  mpi    mpi4py ``Allreduce`` in place on a numpy array (the ceiling);
  disdl  GradientAllreducer on a one-parameter "model" of that size, through the real bucketing
         and staging path (gradient marked ready as the autograd hook would; weight 1, a sum);
  gloo   torch.distributed ``all_reduce`` (gloo on CPU tensors).
time_us is the mean per iteration, the max over ranks; algbw = bytes / time; busbw = algbw *
2(n-1)/n (the bytes each link must carry in a ring allreduce, as nccl-tests defines it).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from bench.harness import exit_cleanly, init_torch_distributed, parse_list, time_variants
from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.files import write_json
from disdl_mpi.options import add_json
from disdl_mpi.comm.world import install_abort_handler, mpi_library, rank_info

BACKENDS = ("mpi", "disdl", "gloo", "nccl")
DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
          "float64": (np.float64, torch.float64)}


def parse_bytes(text: str) -> int:
    """'64', '4K', '1M', '1G' (powers of 1024) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 4096, 4K, 1M)")
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()]


def sizes(min_bytes: int, max_bytes: int, factor: float, elem: int) -> list[int]:
    out, b = [], max(min_bytes, elem)
    while b <= max_bytes:
        nb = max(elem, (b // elem) * elem)
        if not out or nb != out[-1]:
            out.append(nb)
        b = int(b * factor) if factor > 1 else max_bytes + 1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.allreduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-bytes", "-b", type=parse_bytes, default=parse_bytes("1K"))
    p.add_argument("--max-bytes", "-e", type=parse_bytes, default=parse_bytes("16M"))
    p.add_argument("--factor", "-f", type=float, default=4.0)
    p.add_argument("--backends", default=None,
                   help="comma list of mpi, disdl, gloo (CPU), nccl (CUDA); default "
                        "mpi,disdl,gloo on the CPU, mpi,disdl,nccl on CUDA")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the disdl and nccl buffers live (cuda: the allreducer's real "
                        "CUDA-aware or host-staged path)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--iters", "-n", type=int, default=20)
    p.add_argument("--warmup", "-w", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=1.0, help="allreducer bucket cap (disdl)")
    add_json(p, "write the rows as JSON (the input of bench.studies.costmodel)")
    return p


def _mpi_op(comm: MPI.Comm, count: int, np_dtype) -> Callable[[], None]:
    buf = np.ones(count, dtype=np_dtype)
    return lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def _disdl_op(comm: MPI.Comm, count: int, dtype: torch.dtype, bucket_mb: float,
              device: torch.device):
    model = nn.Module()
    model.weight = nn.Parameter(torch.zeros(count, dtype=dtype, device=device))
    red = GradientAllreducer(model, comm, bucket_mb=bucket_mb, overlap=True)
    p = model.weight

    def op() -> None:
        red.begin_step(1.0)
        red.grad_ready(p)  # what the post-accumulate-grad hook does after backward
        red.finish_step()
    return op, red


def _torch_op(count: int, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """torch.distributed's all_reduce: gloo on CPU tensors, NCCL on CUDA tensors."""
    import torch.distributed as dist
    t = torch.ones(count, dtype=dtype, device=device)
    return lambda: dist.all_reduce(t)


def run(args: argparse.Namespace, comm: MPI.Comm) -> list[dict]:
    rank, n = comm.Get_rank(), comm.Get_size()
    cuda = args.device == "cuda"
    default = "mpi,disdl,nccl" if cuda else "mpi,disdl,gloo"
    backends = parse_list(args.backends or default, BACKENDS)
    device = torch.device("cuda", rank_info(comm).local_rank % max(1, torch.cuda.device_count())) \
        if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    np_dtype, t_dtype = DTYPES[args.dtype]
    elem = np.dtype(np_dtype).itemsize
    torch_backend = next((b for b in backends if b in ("gloo", "nccl")), None)
    if torch_backend is not None:
        init_torch_distributed(comm, torch_backend)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    rows: list[dict] = []
    if rank == 0:
        print(f"# disdl-mpi allreduce: {n} ranks, {mpi_library()}, torch {torch.__version__}, "
              f"iters {args.iters}, warmup {args.warmup}, bucket_mb {args.bucket_mb}")
        print(f"# {os.environ.get('DISDL_ALLREDUCE_SELECTION', 'MPI default algorithms')}")
        print(f"# {'backend':>7} {'bytes':>12} {'count':>11} {'dtype':>8} {'time_us':>11} "
              f"{'algbw_gbps':>11} {'busbw_gbps':>11}")
    for nbytes in sizes(args.min_bytes, args.max_bytes, args.factor, elem):
        count = nbytes // elem
        for backend in backends:  # interleaved: every backend at this size, side by side
            red = None
            if backend == "mpi":
                op = _mpi_op(comm, count, np_dtype)
            elif backend == "disdl":
                op, red = _disdl_op(comm, count, t_dtype, args.bucket_mb, device)
            else:
                op = _torch_op(count, t_dtype, device if backend == "nccl" else torch.device("cpu"))
            sec = time_variants(comm, {backend: op}, iters=args.iters, warmup=args.warmup,
                                sync=sync).mean(backend)
            if red is not None:
                red.close()
            algbw = nbytes / sec / 1e9
            busbw = algbw * 2 * (n - 1) / n
            row = {"backend": backend, "bytes": nbytes, "count": count, "dtype": args.dtype,
                   "device": "cpu" if backend in ("mpi", "gloo") else args.device,
                   "ranks": n, "time_us": sec * 1e6, "algbw_gbps": algbw, "busbw_gbps": busbw,
                   "selection": os.environ.get("DISDL_ALLREDUCE_SELECTION", "MPI default")}
            if red is not None:
                row["path"] = red.path
            rows.append(row)
            if rank == 0:
                print(f"  {backend:>7} {nbytes:>12d} {count:>11d} {args.dtype:>8} "
                      f"{row['time_us']:>11.1f} {algbw:>11.3f} {busbw:>11.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    install_abort_handler(comm)
    problem = None
    if args.iters < 1 or args.warmup < 0 or args.factor < 1 or args.min_bytes > args.max_bytes:
        problem = ("need --iters >= 1, --warmup >= 0, --factor >= 1, --min-bytes <= "
                   "--max-bytes")
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
    if args.json_path and comm.Get_rank() == 0:
        write_json(args.json_path, rows)
    exit_cleanly(comm, 0)


if __name__ == "__main__":
    main()
