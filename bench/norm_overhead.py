"""What every normalization scheme costs per training step, against bn, side by side in one MPI job.

    mpiexec -n 2 python -m bench.norm_overhead --models cnn,resnet20 --steps 40

Every registered scheme (or ``--norm``'s list; bn is always there, as the reference) gets its
own model (same seed, same data) in the same processes; steps rotate between the schemes, each
from a barrier, so noise from a shared machine hits all alike. A step is what the trainer does:
the scheme's ``before_step`` hook, forward, local-mean cross-entropy, backward with the
gradient allreducer (weighted, overlapped, with the scheme's payload), optimizer step,
``after_step``. bn-fix is timed twice: before its freeze at T* (local BN) and after it (the
recalibrated statistics frozen). Reports per scheme the median step (wall and this thread's CPU
time, the slowest rank), its ratio to bn, the seconds per step the scheme spent in its own
collectives and the host synchronizations they made (counted in the code, syncbn's). ``--comm
gloo|nccl`` carries gradients and syncbn's statistics through torch.distributed. Only rank 0
prints; ``--json`` writes the rows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from mpi4py import MPI

from bench.harness import exit_cleanly, time_variants, write_rows
from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.comm.torch_group import COMM_PATHS, over_torch, start_process_group
from disdl_mpi.comm.world import rank_info
from disdl_mpi.config import RunConfig
from disdl_mpi.device import select_device
from disdl_mpi.models import build_model
from disdl_mpi.norms import SCHEMES, NormScheme, get_scheme, norm_state_ids, resolve_schemes
from disdl_mpi.options import add_json, add_norm, program_parser
from disdl_mpi.step import sync_step

CPU = torch.device("cpu")
SHAPES = {"cnn": (1, 8, 8), "resnet20": (3, 32, 32), "mlp": (64,)}
NEVER = 1 << 40  # a bn-fix T* no run reaches: its layers stay local BN


@dataclass
class Variant:
    """One timed scheme: its scheme object, model and allreducer, and one training step."""

    scheme: NormScheme
    reducer: GradientAllreducer
    step: Callable[[], None]


def variants_of(names: list[str]) -> list[tuple[str, str, dict]]:
    """(label, scheme name, options) of every timed variant, bn first."""
    out = [("bn", "bn", {})]
    for name in names:
        if name == "bn":
            continue
        if name == "bn-fix":
            out += [
                ("bn-fix (before T*)", name, {"fix_at": NEVER}),
                ("bn-fix (after T*)", name, {"fix_at": 0, "fix_ramp": 0}),
            ]
        else:
            out.append((name, name, {}))
    return out


def build_variant(
    comm, name: str, opts: dict, model_name: str, x, y, n_global: int, device, cfg: RunConfig
) -> Variant:
    """The scheme's model and allreducer, set up as the trainer does (its options from ``cfg``,
    the run configuration of ``--comm``); bn-fix frozen at T* = 0."""
    cls = SCHEMES[name]
    scheme = get_scheme(name, comm=comm.Dup() if cls.communicates else None, **{**cls.options(cfg), **opts})
    torch.manual_seed(0)
    model = scheme.adapt_model(build_model(model_name, SHAPES[model_name], 10, scheme.layer)).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    local = norm_state_ids(model) if scheme.local_params else set()  # fedbn: never averaged
    reducer = GradientAllreducer(
        model,
        comm,
        payload=scheme.payload(model),
        skip=lambda _, p: id(p) in local,
        torch_group=True if over_torch(cfg.comm) else None,
    )
    scheme.before_step(model, x, len(x), 0, NEVER)  # bn-fix with fix_at=0 freezes here, once
    count = [1]

    def step() -> None:
        scheme.before_step(model, x, len(x), count[0], NEVER)
        sync_step(model, opt, reducer, x, y, n_global, forward_when_empty=scheme.collective_forward)
        scheme.after_step(model, count[0])
        count[0] += 1

    return Variant(scheme, reducer, step)


def measure(
    comm,
    model_name: str,
    names: list[str],
    steps: int,
    local_batch: int,
    warmup: int,
    device=CPU,
    cfg: RunConfig | None = None,
) -> list[dict]:
    """One row per variant: median step times (max over ranks), ratio to bn, own collectives."""
    cfg = cfg or RunConfig(comm="mpi")
    world = comm.Get_size()
    g = torch.Generator().manual_seed(100 + comm.Get_rank())
    x = torch.randn(local_batch, *SHAPES[model_name], generator=g).to(device)
    y = torch.randint(0, 10, (local_batch,), generator=g).to(device)
    built = {
        label: build_variant(comm, name, opts, model_name, x, y, local_batch * world, device, cfg)
        for label, name, opts in variants_of(names)
    }
    for v in built.values():
        for _ in range(warmup):
            v.step()
    comm0 = {label: v.scheme.comm_seconds() for label, v in built.items()}
    syncs0 = {label: v.scheme.host_syncs() for label, v in built.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = time_variants(comm, {label: v.step for label, v in built.items()}, iters=1, rounds=steps, sync=sync)
    rows = []
    bn_wall, bn_cpu = t.median("bn"), t.median("bn", "cpu")
    for label, v in built.items():
        own = comm.allreduce(v.scheme.comm_seconds() - comm0[label], op=MPI.MAX)
        syncs = comm.allreduce(v.scheme.host_syncs() - syncs0[label], op=MPI.MAX)
        wall, cpu = t.median(label), t.median(label, "cpu")
        rows.append({
            "model": model_name, "scheme": label, "ranks": world, "device": str(device),
            "local_batch": local_batch, "steps": steps,
            "step_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu,
            "x_bn": wall / bn_wall, "cpu_x_bn": cpu / bn_cpu,
            "own_comm_ms_per_step": 1e3 * own / steps,
            "host_syncs_per_step": syncs / steps, "comm": cfg.comm, "path": v.reducer.path,
            "step_ms_p10_p90": [1e3 * t.percentile(label, 10), 1e3 * t.percentile(label, 90)],
        })  # fmt: skip
        v.reducer.close()
        v.scheme.close()
        if v.scheme.comm is not None:  # the Dup made above, which the scheme does not own
            v.scheme.comm.Free()
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "median per step, each step's slowest rank; wall = elapsed, cpu = this thread's CPU "
        "time (robust to a busy machine; MPICH's polling waits count as CPU); own comm = the "
        "scheme's own collectives; syncs = its host synchronizations per step (counted)"
    )
    print(
        f"{'model':>9} {'scheme':>19} {'ranks':>5} {'wall ms':>8} {'x bn':>6} {'cpu ms':>8} "
        f"{'x bn':>6} {'own comm ms':>11} {'syncs':>6} {'path':>14}"
    )
    for r in rows:
        print(
            f"{r['model']:>9} {r['scheme']:>19} {r['ranks']:>5} {r['step_ms']:8.2f} {r['x_bn']:6.2f} "
            f"{r['cpu_ms']:8.2f} {r['cpu_x_bn']:6.2f} {r['own_comm_ms_per_step']:11.3f} "
            f"{r['host_syncs_per_step']:6.1f} {r['path']:>14}"
        )


def main(argv: list[str] | None = None) -> int:
    p = program_parser("python -m bench.norm_overhead", __doc__)
    p.add_argument("--models", default="cnn,resnet20", help="comma list: cnn, resnet20, mlp")
    add_norm(p, "all")
    p.add_argument("--steps", type=int, default=40, help="timed steps per scheme")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--local-batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: each rank on its node-local GPU"
    )
    p.add_argument("--comm", choices=COMM_PATHS, default="mpi", help="the data path (as the job's --comm)")
    p.add_argument("--cuda-aware", choices=["auto", "yes", "no"], default="auto", help="MPI on a GPU")
    add_json(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    comm = MPI.COMM_WORLD
    device = CPU
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but torch sees no CUDA device")
        device = select_device("cuda", rank_info(comm))
    try:
        names = resolve_schemes(args.norm)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    cfg = RunConfig(comm=args.comm, cuda_aware=args.cuda_aware)
    if over_torch(args.comm):
        start_process_group(comm, args.comm)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in SHAPES:
            raise SystemExit(f"error: unknown model '{name}'; choose from {', '.join(SHAPES)}")
        rows += measure(comm, name, names, args.steps, args.local_batch, args.warmup, device, cfg)
    if comm.Get_rank() == 0:
        print_table(rows)
        if args.json_path:
            write_rows(
                args.json_path,
                "bench.norm_overhead",
                rows,
                threads=args.threads,
                mpi=MPI.Get_library_version().splitlines()[0],
                torch=torch.__version__,
            )
    if over_torch(args.comm):
        exit_cleanly(comm, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
