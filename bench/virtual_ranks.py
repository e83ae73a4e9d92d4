"""Many isolated ranks per process (``--virtual-ranks``), measured (issue 28).

    python -m bench.virtual_ranks --source-dir /usr/share/datasets/fashion-mnist \\
        --out docs/benchmarks/virtual_ranks --parts throughput,scale,accuracy

Three parts, each a set of ``python -m disdl_mpi.run`` jobs on Fashion-MNIST (default CNN) whose
summary.json is read back; side by side in one sitting, so the machine's noise is shared:

- ``throughput``: the same 8 isolated ranks (iid) as 8 processes x 1, 2 x 4 and 1 x 8, for each
  scheme in ``--norm``; samples/s over ``--steps`` steps and the summed peak memory.
- ``scale``: N = ``--ranks`` isolated ranks (iid) as ``--processes`` processes x N/P virtual
  ranks: summed peak resident memory (getrusage, every process) and samples/s.
- ``accuracy``: one accuracy point per N in ``--accuracy-ranks`` (dirichlet:0.1), schemes
  ``--accuracy-norm``, ``--epochs`` epochs, global batch ``--accuracy-batch`` (it must hold one
  sample per rank); as ``--processes`` processes.

Writes OUT/virtual_ranks.json and OUT/virtual_ranks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

from bench.studies.engine import launcher_command, run_job
from data_prep.ensure import ensure_partition
from disdl_mpi.files import write_json, write_text
from disdl_mpi.options import program_parser

GIB = 1 << 30


def int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def partition(args: argparse.Namespace, ranks: int, spec: str) -> Path:
    d = Path(args.data_root) / f"fashion-mnist-{spec.replace(':', '-')}-n{ranks}-s0"
    ensure_partition(d, "fashion-mnist", ranks, spec, 0, source_dir=args.source_dir)
    return d


def run(
    args: argparse.Namespace, data: Path, processes: int, k: int, options: list[str], tag: str
) -> list[dict]:
    """One job; its per-scheme records, each with the job's wall time."""
    out = Path(args.out) / "runs" / tag
    cmd = launcher_command(
        None,
        processes,
        ["-m", "disdl_mpi.run", "--data-dir", str(data), "--virtual-ranks", str(k), "--progress", "none"]
        + ["--out", str(out), *options],
    )
    job = run_job(cmd, log=out.with_suffix(".log"), timeout=args.timeout)
    if not job.ok:
        raise RuntimeError(f"{tag}: {job.why(args.timeout)}\n{job.tail()}")
    recs = json.loads((out / "summary.json").read_text())["runs"]
    return [
        {
            "norm": r["norm"],
            "isolated_ranks": r["world_size"],
            "processes": r["processes"],
            "virtual_ranks": r["virtual_ranks"],
            "samples_per_s": r["samples_per_s"],
            "test_accuracy": r["test_accuracy"],
            "peak_rss_sum_gib": sum(r["peak_rss_bytes"]) / GIB,
            "peak_rss_max_gib": max(r["peak_rss_bytes"]) / GIB,
            "train_s": r["train_s"],
            "steps": r["steps"],
            "job_s": job.wall_s,
        }
        for r in recs
    ]


def throughput(args: argparse.Namespace) -> list[dict]:
    data = partition(args, 8, "iid")
    rows = []
    for processes, k in ((8, 1), (2, 4), (1, 8)):
        opts = ["--norm", args.norm, "--steps", str(args.steps), "--eval-every", "0"]
        rows += run(args, data, processes, k, opts, f"throughput-p{processes}k{k}")
    return rows


def over_ranks(args: argparse.Namespace, ranks: list[int], spec: str, opts, tag: str) -> list[dict]:
    """One job per N in ``ranks``: ``--processes`` processes (1 if it does not divide N) x N/P
    virtual ranks on a partition ``spec`` of N ranks; ``opts(N)`` are the run's options."""
    rows = []
    for n in ranks:
        p = args.processes if n % args.processes == 0 else 1
        rows += run(args, partition(args, n, spec), p, n // p, opts(n), f"{tag}-n{n}")
    return rows


def scale(args: argparse.Namespace) -> list[dict]:
    def opts(n: int) -> list[str]:
        return [
            "--norm",
            "bn",
            "--steps",
            str(args.steps),
            "--eval-every",
            "0",
            "--global-batch-size",
            str(max(128, n)),
        ]

    return over_ranks(args, args.ranks, "iid", opts, "scale")


def accuracy(args: argparse.Namespace) -> list[dict]:
    def opts(n: int) -> list[str]:
        return ["--norm", args.accuracy_norm, "--epochs", str(args.epochs), "--eval-every", "0"] + [
            "--global-batch-size",
            str(args.accuracy_batch),
            "--lr-schedule",
            "cosine",
        ]

    return over_ranks(args, args.accuracy_ranks, "dirichlet:0.1", opts, "accuracy")


def markdown(result: dict) -> str:
    lines = [
        "# Virtual ranks: many isolated ranks per process",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; machine: {result['machine']}",
        "",
    ]
    head = (
        "| part | scheme | isolated ranks | processes x virtual | samples/s "
        "| peak RSS, summed (GiB) | test acc | job s |"
    )
    sep = "|---|---|---:|---|---:|---:|---:|---:|"
    lines += [head, sep]
    for part, rows in result["parts"].items():
        for r in rows:
            acc = f"{r['test_accuracy']:.4f}" if part == "accuracy" else "-"
            lines.append(
                f"| {part} | {r['norm']} | {r['isolated_ranks']} | {r['processes']} x {r['virtual_ranks']} | "
                f"{r['samples_per_s']:.0f} | {r['peak_rss_sum_gib']:.2f} | {acc} | {r['job_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = program_parser("python -m bench.virtual_ranks", __doc__)
    p.add_argument("--source-dir", required=True, help="Fashion-MNIST IDX files")
    p.add_argument("--out", required=True)
    p.add_argument("--data-root", default=None, help="where partitions are built (default OUT/data)")
    p.add_argument("--parts", default="throughput,scale,accuracy")
    p.add_argument("--norm", default="bn,gn,syncbn,bn-carry", help="schemes of the throughput part")
    p.add_argument("--steps", type=int, default=300, help="steps per scheme (throughput, scale)")
    p.add_argument("--ranks", type=int_list, default=[8, 64, 256], help="N of the scale part")
    p.add_argument("--processes", type=int, default=2, help="processes of the scale and accuracy parts")
    p.add_argument("--accuracy-ranks", type=int_list, default=[64, 256])
    p.add_argument("--accuracy-norm", default="bn,syncbn,gn,bn-carry")
    p.add_argument("--accuracy-batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3, help="epochs of each accuracy point")
    p.add_argument("--timeout", type=float, default=3600.0)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.data_root = args.data_root or str(Path(args.out) / "data")
    parts = {"throughput": throughput, "scale": scale, "accuracy": accuracy}
    chosen = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [c for c in chosen if c not in parts]
    if unknown:
        print(f"error: --parts: unknown {unknown}; known: {', '.join(parts)}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "command": "python -m bench.virtual_ranks " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.node()}, {platform.processor() or platform.machine()}",
        "parts": {},
    }
    out = Path(args.out)
    for name in chosen:
        t0 = time.perf_counter()
        result["parts"][name] = parts[name](args)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        write_json(out / "virtual_ranks.json", result)
        write_text(out / "virtual_ranks.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
