"""Memory and start-up against partition size, for each data residency mode (issue 17).

    python -m bench.studies.data_scale --shape 3,224,224 --per-rank 400,1600,6400,25600 \\
        --modes device,host,stream --ranks 2 --work /work/scale --cold

For each size, builds a synthetic IID partition of that many training images per rank
(data_prep.partition), then runs ``python -m disdl_mpi.run`` on it once per mode (3 steps of
``bn``, the default CNN and batch) and reads back what the run recorded:

- start-up: from launching the job until its "data residency" line, i.e. Python, torch and MPI
  starting, then reading, checking and standardizing the partition (``--cold`` drops the page
  cache before each run, as root, so the partition comes from the disk);
- peak resident memory of the largest rank (summary.json ``peak_rss_bytes``, getrusage);
- training throughput (samples/s of those few steps, a sanity figure only).

Each partition is removed after its runs unless ``--keep`` (which also reuses a partition an
earlier ``--keep`` sweep left, so its first run does not follow a fresh write).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from bench.harness import parse_list
from bench.studies.engine import add_launch_options, launcher_command, run_job
from data_prep.ensure import ensure_partition
from disdl_mpi.data.residency import MODES
from disdl_mpi.files import write_json
from disdl_mpi.options import add_json, program_parser

GIB = 1 << 30
READY = "data residency:"


def build_partition(out: Path, shape: str, per_rank: int, ranks: int, test: int) -> float:
    """A synthetic IID partition in ``out`` (data_prep.ensure); returns the seconds it took."""
    t0 = time.perf_counter()
    ensure_partition(
        out,
        "synthetic",
        ranks,
        "iid",
        0,
        num_samples=per_rank * ranks,
        num_test=test,
        shape=tuple(int(v) for v in shape.split(",")),
    )
    return time.perf_counter() - t0


def drop_page_cache() -> None:
    """Write dirty pages back and drop the page cache, so the next read is from the disk."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_mode(
    data: Path, out: Path, mode: str, ranks: int, steps: int, launcher: Optional[str], timeout: float
) -> dict[str, Any]:
    """One run of the trainer in ``mode``; its start-up, memory and throughput."""
    shutil.rmtree(out, ignore_errors=True)
    args = [
        *"-m disdl_mpi.run --data-dir".split(),
        str(data),
        *"--model cnn --norm bn --steps".split(),
        str(steps),
        *"--eval-every 0 --data-residency".split(),
        mode,
        *"--progress none --out".split(),
        str(out),
    ]
    ready: list[float] = []
    t0 = time.perf_counter()

    def on_line(line: str) -> None:
        if line.startswith(READY) and not ready:
            ready.append(time.perf_counter() - t0)

    job = run_job(
        launcher_command(launcher, ranks, args), log=out.with_suffix(".log"), timeout=timeout, on_line=on_line
    )
    if not job.ok:
        raise RuntimeError(f"{mode} on {data}: {job.why(timeout)}\n{job.tail()}")
    rec = json.loads((out / "summary.json").read_text())["runs"][0]
    return {
        "mode": mode,
        "startup_s": ready[0] if ready else None,
        "load_s": rec["startup_s"],
        "peak_rss_gib": max(rec["peak_rss_bytes"]) / GIB,
        "samples_per_s": rec["samples_per_s"],
        "job_s": job.wall_s,
    }


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    work = Path(args.work)
    for n in args.per_rank:
        data = work / f"p{n}"
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
        # with --keep a partition left by an earlier sweep is reused (ensure_partition checks
        # its manifest against the request): build_s is then ~0
        build_s = build_partition(data, args.shape, n, args.ranks, args.test)
        stored = (data / "rank_00000.h5").stat().st_size / GIB
        test_shard = (data / "test.h5").stat().st_size / GIB / args.ranks
        if args.warmup_run:
            # untimed: on a VM that hands freed memory back to its host, the first large run
            # after a pause pays to fault that memory in again (docs/benchmarks/data.md)
            run_mode(
                data,
                work / f"run-{n}-warmup",
                args.modes[0],
                args.ranks,
                args.steps,
                args.launcher,
                args.timeout,
            )
        for mode in args.modes:
            if args.cold:
                drop_page_cache()
            row = run_mode(
                data, work / f"run-{n}-{mode}", mode, args.ranks, args.steps, args.launcher, args.timeout
            )
            row.update(
                per_rank=n, stored_gib=stored, test_shard_gib=test_shard, build_s=build_s, cold=args.cold
            )
            rows.append(row)
            print(
                f"{n:>7} per rank ({stored:6.2f} GiB)  {mode:>6}: start-up "
                f"{row['startup_s']:6.1f} s, peak {row['peak_rss_gib']:5.2f} GiB, "
                f"{row['samples_per_s']:6.1f} samples/s",
                flush=True,
            )
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
    return rows


def markdown(rows: list[dict[str, Any]], modes: list[str]) -> str:
    """One line per size: start-up and peak memory of every mode side by side."""
    head = ["training images per rank", "rank file"]
    for i, m in enumerate(modes):
        # a mode named twice (--modes device,host,device) gets a column per run, in run order
        label = m if modes.count(m) == 1 else f"{m} #{modes[: i + 1].count(m)}"
        head += [f"{label}: start-up", f"{label}: peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for n in dict.fromkeys(r["per_rank"] for r in rows):
        runs = [r for r in rows if r["per_rank"] == n]  # in the order of ``modes``
        cells = [f"{n:,}".replace(",", " "), f"{runs[0]['stored_gib']:.2f} GiB"]
        for i in range(len(modes)):
            r = runs[i] if i < len(runs) else None
            cells += (
                ["-", "-"]
                if r is None
                else [
                    f"{r['startup_s']:.1f} s",
                    f"{r['peak_rss_gib']:.2f} GiB ({r['peak_rss_gib'] - r['stored_gib']:+.2f})",
                ]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = program_parser("python -m bench.studies.data_scale", __doc__)
    p.add_argument("--shape", default="3,224,224", help="sample shape, e.g. 3,224,224")
    p.add_argument(
        "--per-rank",
        default="400,1600,6400",
        type=lambda s: [int(v) for v in parse_list(s)],
        help="training images per rank, one partition each",
    )
    p.add_argument(
        "--modes",
        default="device,host,stream",
        type=lambda s: parse_list(s, tuple(m for m in MODES if m != "auto")),
    )
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--test", type=int, default=1000, help="test images (split over ranks)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work", required=True, help="folder for the partitions and run outputs")
    p.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each run (root): start-up from the disk",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the partitions, and reuse those an earlier --keep sweep left",
    )
    p.add_argument(
        "--warmup-run",
        action="store_true",
        help="one untimed run of the first mode per size before the timed ones",
    )
    add_launch_options(p, run_args=False)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    add_json(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rows = sweep(args)
    print("\n" + markdown(rows, args.modes))
    if args.json_path:
        write_json(args.json_path, {"rows": rows, "shape": args.shape, "ranks": args.ranks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
