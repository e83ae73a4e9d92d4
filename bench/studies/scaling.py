"""Strong/weak scaling sweep of the training job over rank counts.

    python -m bench.studies.scaling --ranks 1 2 4 8 --norm bn,syncbn,gn --mode weak --out DIR

One MPI job per rank count (``python -m disdl_mpi.run --norm LIST``, all schemes in one job);
each finished job is stored at once in DIR/points/n<N>.json, so a rerun with the same settings
runs only the missing rank counts. Writes DIR/scaling.csv, .md, .json, scaling.png (throughput
and efficiency vs ranks) and breakdown.png (stacked per-step phases). With ``--with-allreduce``
it also runs ``bench.allreduce`` at every rank count >= 2 (DIR/allreduce/n<N>.json) and the
cost model (DIR/costmodel/).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from bench.studies.engine import JobResult, Point, PointStore, SweepError, add_launch_options, run_sweep
from bench.studies.scaling_report import csv_text, markdown, table
from data_prep.ensure import ensure_partition
from data_prep.errors import DataPrepError
from disdl_mpi.data.layout import partition_dir
from disdl_mpi.device import node_cores
from disdl_mpi.files import write_json, write_text
from disdl_mpi.norms import resolve_schemes
from disdl_mpi.observe.progress import Progress
from disdl_mpi.observe.timing import DETAIL_ENV
from disdl_mpi.options import add_norm, add_partition, add_progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.studies.scaling",
        description="Run the training job at several rank counts and tabulate/plot throughput, "
        "efficiency and the per-phase time breakdown.",
    )
    p.add_argument("--ranks", type=int, nargs="+", required=True, help="rank counts, e.g. 1 2 4")
    add_norm(p, default="bn,gn")
    p.add_argument(
        "--mode",
        choices=["strong", "weak"],
        default="weak",
        help="strong: fixed global batch; weak: fixed per-rank batch",
    )
    p.add_argument("--model", default="auto")
    p.add_argument("--dataset", default="digits", help="digits, or synthetic for bigger data")
    add_partition(p, "dirichlet:0.1")
    p.add_argument("--num-samples", type=int, help="synthetic: training samples (per rank in weak mode)")
    p.add_argument("--shape", help="synthetic: sample shape C,H,W or D")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per scheme")
    p.add_argument("--epochs", type=int, help="epochs per scheme (instead of --steps)")
    p.add_argument(
        "--global-batch-size",
        type=int,
        default=128,
        help="strong: the global batch at every rank count; weak: the global batch "
        "at the smallest rank count (per-rank batch = this / smallest ranks)",
    )
    p.add_argument("--batch-per-rank", type=int, help="weak: per-rank batch (overrides --global-batch-size)")
    p.add_argument("--seed", type=int, default=0)
    add_launch_options(p)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    p.add_argument(
        "--cores", type=int, default=node_cores(), help="cores per node, to flag oversubscribed rank counts"
    )
    p.add_argument(
        "--no-timing-detail",
        dest="timing_detail",
        action="store_false",
        help="skip the per-step imbalance probe (one Barrier per step)",
    )
    p.add_argument(
        "--with-allreduce",
        action="store_true",
        help="also run bench.allreduce at each rank count >= 2 and fit the cost "
        "model (DIR/allreduce, DIR/costmodel)",
    )
    p.add_argument(
        "--allreduce-args",
        default="--backends mpi,disdl --min-bytes 1K --max-bytes 16M --factor 4",
        help="options for bench.allreduce, one quoted string",
    )
    add_progress(p)
    p.add_argument("--out", type=Path, required=True)
    return p


def per_rank_batch(args: argparse.Namespace) -> int:
    if args.batch_per_rank:
        return args.batch_per_rank
    return max(1, args.global_batch_size // min(args.ranks))


def data_dir(args: argparse.Namespace, n: int) -> Path:
    """The partition of the point at ``n`` ranks: data_prep's naming rule under OUT/data."""
    return partition_dir(
        args.out / "data", args.dataset, args.partition, n, args.seed, **source_options(args, n)
    )


def source_options(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """Options of generated (synthetic) data; weak scaling grows the data with the ranks."""
    if args.dataset != "synthetic":
        return {}
    opts: dict[str, Any] = {}
    if args.num_samples:
        opts["num_samples"] = args.num_samples * (n if args.mode == "weak" else 1)
    if args.shape:
        opts["shape"] = tuple(int(v) for v in args.shape.split(","))
    return opts


def job_points(args: argparse.Namespace) -> list[Point]:
    """One training job per rank count."""
    points = []
    for n in sorted(set(args.ranks)):
        gbs = args.global_batch_size if args.mode == "strong" else per_rank_batch(args) * n
        run = [
            *"-m disdl_mpi.run --norm".split(),
            args.norm,
            "--model",
            args.model,
            "--data-dir",
            str(data_dir(args, n)),
            "--global-batch-size",
            str(gbs),
            "--seed",
            str(args.seed),
            *"--eval-every 0 --progress lines --out".split(),
            str(args.out / "runs" / f"n{n}"),
        ]
        run += ["--epochs", str(args.epochs)] if args.epochs else ["--steps", str(args.steps)]
        run += shlex.split(args.run_args)
        settings = {
            "norm": args.norm,
            "mode": args.mode,
            "model": args.model,
            "dataset": args.dataset,
            "partition": args.partition,
            "gbs": gbs,
            "steps": args.steps,
            "epochs": args.epochs,
            "seed": args.seed,
            "run_args": args.run_args,
            "detail": args.timing_detail,
            "num_samples": args.num_samples,
            "shape": args.shape,
        }
        env = {DETAIL_ENV: "1" if args.timing_detail else "0"}
        points.append(Point(key=f"n{n}", ranks=n, args=run, settings=settings, env=env))
    return points


def prepare_partition(args: argparse.Namespace, n: int) -> None:
    """Build (or check) the partition up front: a folder built with other settings (another
    seed, another spec) is refused by ensure_partition, never silently reused."""
    ensure_partition(data_dir(args, n), args.dataset, n, args.partition, args.seed, **source_options(args, n))


def collect_run(point: Point, job: JobResult, out: Path) -> dict:
    """The slim per-scheme records of one finished training job."""
    summary = json.loads((out / "runs" / point.key / "summary.json").read_text())
    keep = (
        "norm",
        "world_size",
        "samples_per_s",
        "steps",
        "phases",
        "phases_detail",
        "allreduce_path",
        "grad_bytes",
        "imbalance_method",
        "imbalance_wait_derived",
        "test_accuracy",
        "global_batch_size",
        "threads_per_rank",
        "model",
        "dataset",
        "partition",
        "device",
        "mpi_library",
    )
    records = [{k: r.get(k) for k in keep} for r in summary["runs"]]
    return {"records": records, "machine": summary.get("machine", {})}


def allreduce_points(args: argparse.Namespace) -> list[Point]:
    points = []
    for n in sorted(set(args.ranks)):
        if n < 2:
            continue
        target = args.out / "allreduce" / f"n{n}.json"
        extra = shlex.split(args.allreduce_args)
        points.append(
            Point(
                key=f"allreduce-n{n}",
                ranks=n,
                args=["-m", "bench.allreduce", "--json", str(target), *extra],
                settings={"allreduce_args": args.allreduce_args},
            )
        )
    return points


def run_costmodel(out: Path) -> Optional[Path]:
    from bench.studies.costmodel import fit_and_project

    files = sorted((out / "allreduce").glob("n*.json"))
    if not files:
        return None
    fit_and_project(files, out / "costmodel", scaling=out)
    return out / "costmodel"


def write_outputs(out: Path, args: argparse.Namespace, results: list[dict], argv: list[str]) -> None:
    """scaling.csv, .md, .json (with the command that made it), scaling.png and breakdown.png."""
    rows = table(results, args.mode, args.cores)
    machine = results[-1].get("machine", {})
    write_text(out / "scaling.csv", csv_text(rows))
    write_text(out / "scaling.md", markdown(rows, machine, args, args.cores))
    command = [sys.executable, "-m", "bench.studies.scaling", *argv]
    write_json(
        out / "scaling.json",
        {"mode": args.mode, "cores": args.cores, "machine": machine, "rows": rows, "command": command},
    )
    from bench.studies.plots import plot_breakdown, plot_scaling

    plot_scaling(rows, out / "scaling.png", cores=args.cores)
    plot_breakdown(rows, out / "breakdown.png", cores=args.cores)


def _virtual_ranks(run_args: str) -> str | int:
    """The --virtual-ranks value in ``run_args`` (1 when it is not set)."""
    words = shlex.split(run_args)
    for i, w in enumerate(words):
        if w == "--virtual-ranks" and i + 1 < len(words):
            return 1 if words[i + 1] == "1" else words[i + 1]
        if w.startswith("--virtual-ranks="):
            value = w.split("=", 1)[1]
            return 1 if value == "1" else value
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if any(n < 1 for n in args.ranks):
        print("error: --ranks must all be >= 1", file=sys.stderr)
        return 2
    try:
        resolve_schemes(args.norm)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    virtual = _virtual_ranks(args.run_args)
    if virtual != 1:
        print(
            f"error: --run-args sets --virtual-ranks {virtual}: the scaling study reports "
            "communication against compute per rank, and a process carrying several virtual ranks "
            "computes for all of them while it communicates once; run it with one MPI rank per "
            "isolated rank (bench.studies.accuracy takes --virtual-ranks)",
            file=sys.stderr,
        )
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    store = PointStore(out / "points")
    points = job_points(args)
    try:
        for pt in points:
            if not store.is_done(pt):
                prepare_partition(args, pt.ranks)
        sweeps = [(points, lambda p, j: collect_run(p, j, out))]
        if args.with_allreduce:
            sweeps.append(
                (allreduce_points(args), lambda p, j: {"file": str(out / "allreduce" / f"{p.key[10:]}.json")})
            )
        done = []
        for pts, collect in sweeps:
            progress = Progress(sum(not store.is_done(p) for p in pts), mode=args.progress)
            done.append(
                run_sweep(
                    pts,
                    store,
                    collect,
                    launcher=args.launcher,
                    timeout=args.timeout,
                    log_dir=out / "logs",
                    progress=progress,
                )
            )
        results = done[0]
    except (SweepError, DataPrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = sorted({p.ranks for p in points} - {r["ranks"] for r in results})
    if not results:
        print(f"error: no rank count finished; see {out / 'logs'}", file=sys.stderr)
        return 1
    write_outputs(out, args, results, argv if argv is not None else sys.argv[1:])
    if args.with_allreduce:
        from bench.studies.costmodel_inputs import CostModelError

        try:
            cm = run_costmodel(out)
            print(f"cost model: {cm}" if cm else "cost model: no allreduce results")
        except CostModelError as exc:
            print(f"cost model skipped: {exc}", file=sys.stderr)
    print(f"wrote {out / 'scaling.csv'}, scaling.md, scaling.png, breakdown.png")
    if missing:
        print(f"missing rank counts (failed; rerun to retry): {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
