"""Step-time overhead of syncbn over local bn, measured side by side in one MPI job.

    mpiexec -n 2 python -m bench.norm_overhead --models cnn,resnet20 --steps 40

Both models (same seed, same data) live in the same processes; steps alternate between the
schemes (ABBA order) so that noise from a shared machine hits both alike. A step is what the
trainer does: forward, local-mean cross-entropy, backward with the gradient allreducer
(weighted, overlapped), optimizer step. Reports median step times, the overhead, and the
seconds syncbn spent in its own collectives. Only rank 0 prints; ``--json`` writes atomically.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from bench.harness import time_variants, write_rows
from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.comm.world import rank_info
from disdl_mpi.device import select_device
from disdl_mpi.models import build_model
from disdl_mpi.norms import SCHEMES, get_scheme
from disdl_mpi.options import add_json, program_parser
from disdl_mpi.step import sync_step

CPU = torch.device("cpu")
SHAPES = {"cnn": (1, 8, 8), "resnet20": (3, 32, 32), "mlp": (64,)}


def measure(
    comm, model_name: str, steps: int, local_batch: int, warmup: int, device: torch.device = CPU
) -> dict:
    world = comm.Get_size()
    shape = SHAPES[model_name]
    g = torch.Generator().manual_seed(100 + comm.Get_rank())
    x = torch.randn(local_batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (local_batch,), generator=g).to(device)
    setups, calls = {}, {}
    for name in ("bn", "syncbn"):
        scheme = get_scheme(name, comm=comm.Dup() if SCHEMES[name].communicates else None)
        torch.manual_seed(0)
        model = build_model(model_name, shape, 10, scheme.layer).to(device)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        reducer = GradientAllreducer(model, comm)
        setups[name] = (scheme, model, reducer)
        # What the trainer does: one sync_step (weighted, overlapped allreduce) per call.
        calls[name] = lambda m=model, o=opt, r=reducer: sync_step(m, o, r, x, y, local_batch * world)
    for name in calls:
        for _ in range(warmup):
            calls[name]()
    comm0 = setups["syncbn"][0].comm_seconds()
    # One step per block, alternating (ABBA), each from a barrier; max over ranks.
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = time_variants(comm, calls, iters=1, rounds=steps, sync=sync)
    sync_comm = comm.allreduce(setups["syncbn"][0].comm_seconds() - comm0, op=MPI.MAX)
    for scheme, _, reducer in setups.values():
        reducer.close()
        if scheme.comm is not None:
            scheme.comm.Free()
    bn_med, sb_med = t.median("bn"), t.median("syncbn")
    bn_cpu, sb_cpu = t.median("bn", "cpu"), t.median("syncbn", "cpu")
    n_norm = sum(1 for m in setups["bn"][1].modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    return {
        "model": model_name,
        "sample_shape": list(shape),
        "ranks": world,
        "device": str(device),
        "local_batch": local_batch,
        "steps": steps,
        "norm_layers": n_norm,
        "bn_step_ms": 1e3 * bn_med,
        "syncbn_step_ms": 1e3 * sb_med,
        "overhead_pct": 100.0 * (sb_med / bn_med - 1.0),
        "bn_cpu_ms": 1e3 * bn_cpu,
        "syncbn_cpu_ms": 1e3 * sb_cpu,
        "cpu_overhead_pct": 100.0 * (sb_cpu / bn_cpu - 1.0),
        "syncbn_comm_ms_per_step": 1e3 * sync_comm / steps,
        "bn_step_ms_p10_p90": [1e3 * t.percentile("bn", 10), 1e3 * t.percentile("bn", 90)],
        "syncbn_step_ms_p10_p90": [1e3 * t.percentile("syncbn", 10), 1e3 * t.percentile("syncbn", 90)],
    }


def main(argv: list[str] | None = None) -> int:
    p = program_parser("python -m bench.norm_overhead", __doc__)
    p.add_argument("--models", default="cnn,resnet20", help="comma list: cnn, resnet20, mlp")
    p.add_argument("--steps", type=int, default=40, help="timed steps per scheme")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--local-batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: every rank on the GPU of its node-local rank",
    )
    add_json(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    comm = MPI.COMM_WORLD
    device = torch.device("cpu")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but torch sees no CUDA device")
        device = select_device("cuda", rank_info(comm))
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in SHAPES:
            raise SystemExit(f"error: unknown model '{name}'; choose from {', '.join(SHAPES)}")
        rows.append(measure(comm, name, args.steps, args.local_batch, args.warmup, device))
    if comm.Get_rank() == 0:
        print(
            "median per step over ranks' max; wall = elapsed, cpu = this thread's CPU time "
            "(robust to a busy machine; MPICH's polling waits count as CPU)"
        )
        print(
            f"{'model':>9} {'ranks':>5} {'batch/rank':>10} {'bn wall':>8} {'sync wall':>9} "
            f"{'overhead':>8} {'bn cpu':>8} {'sync cpu':>8} {'overhead':>8} "
            f"{'sync comm':>9}"
        )
        for r in rows:
            print(
                f"{r['model']:>9} {r['ranks']:>5} {r['local_batch']:>10} "
                f"{r['bn_step_ms']:8.2f} {r['syncbn_step_ms']:9.2f} "
                f"{r['overhead_pct']:7.1f}% {r['bn_cpu_ms']:8.2f} {r['syncbn_cpu_ms']:8.2f} "
                f"{r['cpu_overhead_pct']:7.1f}% {r['syncbn_comm_ms_per_step']:9.3f}"
            )
        print("(times in ms)")
        if args.json_path:
            write_rows(
                args.json_path,
                "bench.norm_overhead",
                rows,
                threads=args.threads,
                mpi=MPI.Get_library_version().splitlines()[0],
                torch=torch.__version__,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
