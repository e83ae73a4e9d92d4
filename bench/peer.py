"""Peer comparison: the same training loop synchronized by torch DDP and by disdl_mpi.

    mpiexec -n 2 python -m bench.peer --model cnn --steps 60

Three variants of one loop (same model, initial weights, batches, optimizer):
  local  no gradient synchronization at all: the compute-only floor;
  ddp    torch DistributedDataParallel (gloo on CPU, nccl on CUDA) as a tuned user sets it up:
         gradients as bucket views, the same bucket cap as ours, no buffer broadcast, and with
         ``--compress fp16`` DDP's own fp16 compression hook;
  disdl  disdl_mpi's GradientAllreducer (MPI), fp16 on the wire with ``--compress fp16``.
The norm (default ``bn``, local batch statistics) needs no communication of its own, so only
the gradient synchronization differs. The variants run in alternating blocks (``--rounds``) so
the shared machine's noise hits all of them. Step time is the mean over timed steps, the max
over ranks, with the per-step p50 and p95 (each step's slowest rank); comm share =
(step - local step) / step; ratio = disdl / ddp.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from bench.harness import exit_cleanly, time_variants, write_rows
from disdl_mpi.comm.allreducer import DEFAULT_BUCKET_MB, GradientAllreducer
from disdl_mpi.comm.torch_group import nccl_usable, start_process_group
from disdl_mpi.comm.world import install_abort_handler, mpi_library, rank_info
from disdl_mpi.device import select_device
from disdl_mpi.models import build_model
from disdl_mpi.norms import get_scheme
from disdl_mpi.options import add_json, program_parser
from disdl_mpi.step import sync_step

VARIANTS = ("local", "ddp", "disdl")


def build_parser() -> argparse.ArgumentParser:
    p = program_parser("python -m bench.peer", __doc__)
    p.add_argument("--model", default="cnn", help="cnn, mlp, resnet20 (disdl_mpi.models)")
    p.add_argument("--norm", default="bn", help="a norm without communication: bn, gn, ln, in")
    p.add_argument(
        "--dataset",
        choices=["digits", "synthetic"],
        default="digits",
        help="digits: sklearn's UCI digits, an iid shard per rank",
    )
    p.add_argument(
        "--data-dir", default=None, help="a data_prep partition directory instead (rank r reads its own file)"
    )
    p.add_argument("--sample-shape", default="1,8,8", help="synthetic sample shape, e.g. 3,32,32")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic classes")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    p.add_argument("--rounds", type=int, default=4, help="alternating blocks per variant")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB)
    p.add_argument(
        "--ddp-bucket-mb",
        type=float,
        default=None,
        help="DDP's bucket_cap_mb (default: the same as --bucket-mb)",
    )
    p.add_argument(
        "--compress",
        choices=["none", "fp16"],
        default="none",
        help="fp16 gradients on the wire: ours, and DDP's fp16_compress_hook",
    )
    p.add_argument("--no-overlap", dest="overlap", action="store_false", default=True)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    add_json(p)
    return p


def load_data(args, comm: MPI.Comm) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], int]:
    """This rank's samples (float32, standardized) and labels, sample shape, class count."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.data_dir:
        from disdl_mpi.data.partition_io import load_partition

        d = load_partition(comm, args.data_dir)
        x = d.train.x.astype(np.float32)
        return x, d.train.y.astype(np.int64), tuple(d.sample_shape), d.num_classes
    if args.dataset == "digits":
        from sklearn.datasets import load_digits

        ds = load_digits()
        x = (ds.images.astype(np.float32) / 16.0)[:, None]
        y = ds.target.astype(np.int64)
        classes = 10
    else:
        shape = tuple(int(s) for s in args.sample_shape.split(","))
        rng = np.random.default_rng(args.seed)
        n = max(64, args.batch_size * 4) * size
        x = rng.standard_normal((n, *shape), dtype=np.float32)
        y = rng.integers(0, args.num_classes, n).astype(np.int64)
        classes = args.num_classes
    x = (x - x.mean()) / (x.std() + 1e-6)
    return x[rank::size], y[rank::size], tuple(x.shape[1:]), classes


def batches(x: torch.Tensor, y: torch.Tensor, bs: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        yield x[idx], y[idx]


def make_step(
    variant: str, model: nn.Module, comm: MPI.Comm, args, device, n_global: int, sync: Callable[[], None]
) -> tuple[Callable, dict]:
    """One training step of the variant on a batch, and a dict it adds comm seconds and each
    step's time to (``sync`` waits for the device before the clock is read)."""
    stats: dict = {"total_s": 0.0, "exposed_s": 0.0, "step_s": []}
    if variant == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer sync in forward (disdl does none either); newer torch renamed the flag.
        flag = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else "broadcast_buffers"
        )
        net = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=args.ddp_bucket_mb,
            gradient_as_bucket_view=True,
            **{flag: False},
        )
        if args.compress == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            net.register_comm_hook(None, default_hooks.fp16_compress_hook)
    else:
        net = model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    reducer = None
    if variant == "disdl":
        reducer = GradientAllreducer(
            model, comm, bucket_mb=args.bucket_mb, overlap=args.overlap, compress=args.compress
        )
        stats["path"] = reducer.path

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        # DDP (and the unsynchronized "local" floor) average inside the model: no reducer.
        t0 = time.perf_counter()
        res = sync_step(net, opt, reducer, xb, yb, n_global)
        sync()
        stats["step_s"].append(time.perf_counter() - t0)
        if res.comm:
            stats["total_s"] += res.comm["total_s"]
            stats["exposed_s"] += res.comm["exposed_s"]

    return step, stats


def _step_percentiles(comm: MPI.Comm, step_s: list[float]) -> tuple[float, float]:
    """p50 and p95 of the steps, each step timed on its slowest rank (all ran the same steps)."""
    per_step = np.array(step_s, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, per_step, op=MPI.MAX)
    return float(np.percentile(per_step, 50)), float(np.percentile(per_step, 95))


def _check_in_sync(comm: MPI.Comm, variant: str, model: torch.nn.Module) -> None:
    """A synchronized variant must keep identical weights on every rank."""
    sums = comm.allgather(float(sum(p.detach().double().sum() for p in model.parameters())))
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"{variant}: ranks' weights diverged ({sums}): synchronization is broken")


def run(args, comm: MPI.Comm) -> dict:
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(max(1, args.threads))
    device = select_device(args.device, rank_info(comm))
    ddp_backend, why = "gloo", "CPU tensors"
    if device.type == "cuda":
        usable, why = nccl_usable(comm)
        ddp_backend = "nccl" if usable else "gloo"
    if rank == 0 and device.type == "cuda" and ddp_backend == "gloo":
        print(f"# DDP on gloo, not NCCL: {why}", flush=True)
    start_process_group(comm, ddp_backend)
    x, y, shape, classes = load_data(args, comm)
    if len(x) == 0:
        raise ValueError(f"rank {rank}: no training samples")
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y).to(device)
    torch.manual_seed(args.seed)
    base = build_model(args.model, shape, classes, get_scheme(args.norm).layer).to(device)
    models = {v: copy.deepcopy(base) for v in VARIANTS}
    per_round = max(1, args.steps // max(1, args.rounds))
    steps, comm_stats, calls = {}, {}, {}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for v in VARIANTS:
        steps[v], comm_stats[v] = make_step(v, models[v], comm, args, device, args.batch_size * size, sync)
        # warm-up batches, then per round fresh batches (the same for every variant)
        data = list(batches(xt, yt, args.batch_size, args.warmup, args.seed + rank))
        for r in range(max(1, args.rounds)):
            data += batches(xt, yt, args.batch_size, per_round, args.seed + 1000 * r + rank)
        feed = iter(data)
        calls[v] = lambda s=steps[v], f=feed: s(*next(f))
    # Warm-up (the allocator, DDP's first-iteration bucket rebuild), then count from zero.
    for v in VARIANTS:
        for _ in range(args.warmup):
            calls[v]()
        comm_stats[v].update(total_s=0.0, exposed_s=0.0, step_s=[])
    timings = time_variants(comm, calls, iters=per_round, rounds=max(1, args.rounds), sync=sync)
    n_steps = per_round * max(1, args.rounds)
    step_s = {v: timings.mean(v) for v in VARIANTS}
    pct = {v: _step_percentiles(comm, comm_stats[v]["step_s"]) for v in VARIANTS}
    for v in ("ddp", "disdl"):
        _check_in_sync(comm, v, models[v])
    share = {v: max(0.0, step_s[v] - step_s["local"]) / step_s[v] for v in ("ddp", "disdl")}
    return {
        "ddp_step_s": step_s["ddp"],
        "disdl_step_s": step_s["disdl"],
        **{f"{v}_step_p50_s": pct[v][0] for v in VARIANTS},
        **{f"{v}_step_p95_s": pct[v][1] for v in VARIANTS},
        "compress": args.compress,
        "ddp_gradient_as_bucket_view": True,
        "ratio": step_s["disdl"] / step_s["ddp"],
        "local_step_s": step_s["local"],
        "ddp_comm_share": share["ddp"],
        "disdl_comm_share": share["disdl"],
        "disdl_comm_total_s_per_step": comm.allreduce(comm_stats["disdl"]["total_s"] / n_steps, op=MPI.MAX),
        "disdl_comm_exposed_s_per_step": comm.allreduce(
            comm_stats["disdl"]["exposed_s"] / n_steps, op=MPI.MAX
        ),
        "allreduce_path": comm_stats["disdl"].get("path"),
        "ddp_backend": ddp_backend,
        "model": args.model,
        "norm": args.norm,
        "params": sum(p.numel() for p in base.parameters()),
        "ranks": size,
        "batch_size": args.batch_size,
        "steps": n_steps,
        "rounds": args.rounds,
        "bucket_mb": args.bucket_mb,
        "ddp_bucket_mb": args.ddp_bucket_mb,
        "overlap": args.overlap,
        "threads": args.threads,
        "device": str(device),
        "mpi_library": mpi_library(),
        "torch": torch.__version__,
    }


def pcts(res: dict, v: str) -> str:
    return f"p50 {res[f'{v}_step_p50_s'] * 1e3:8.3f}  p95 {res[f'{v}_step_p95_s'] * 1e3:8.3f} ms"


def report(res: dict) -> str:
    return "\n".join(
        [
            f"# bench.peer: {res['model']} ({res['params']} params), norm {res['norm']}, "
            f"{res['ranks']} ranks, batch {res['batch_size']}/rank, {res['steps']} steps x variant, "
            f"{res['device']}, {res['mpi_library']}",
            f"  (bucket cap: ours {res['bucket_mb']} MB, DDP {res['ddp_bucket_mb']} MB, DDP "
            f"gradient_as_bucket_view; fp16 on the wire: {res['compress'] == 'fp16'})",
            f"  local (no sync)   {res['local_step_s'] * 1e3:9.3f} ms/step   {pcts(res, 'local')}",
            f"  ddp ({res['ddp_backend']:>5})      {res['ddp_step_s'] * 1e3:9.3f} ms/step   "
            f"{pcts(res, 'ddp')}   comm share {res['ddp_comm_share']:6.1%}",
            f"  disdl ({res['allreduce_path']}) {res['disdl_step_s'] * 1e3:9.3f} ms/step   "
            f"{pcts(res, 'disdl')}   comm share {res['disdl_comm_share']:6.1%}   allreduce in flight "
            f"{res['disdl_comm_total_s_per_step'] * 1e3:.3f} ms, exposed "
            f"{res['disdl_comm_exposed_s_per_step'] * 1e3:.3f} ms",
            f"  ratio disdl/ddp   {res['ratio']:.3f}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.ddp_bucket_mb is None:
        args.ddp_bucket_mb = args.bucket_mb  # like for like: the same bucket cap
    comm = MPI.COMM_WORLD
    install_abort_handler(comm)
    if args.steps < 1 or args.batch_size < 1 or args.rounds < 1 or args.warmup < 0:
        if comm.Get_rank() == 0:
            print("error: need --steps, --batch-size, --rounds >= 1 and --warmup >= 0", file=sys.stderr)
        exit_cleanly(comm, 2)
    res = run(args, comm)
    if comm.Get_rank() == 0:
        print(report(res), flush=True)
        if args.json_path:
            write_rows(args.json_path, "bench.peer", [res])
    exit_cleanly(comm, 0)


if __name__ == "__main__":
    sys.exit(main())
