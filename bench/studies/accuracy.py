"""The accuracy study: every normalization scheme x partition skew x seed, one table and plots.

    python -m bench.studies.accuracy --ranks 8 --norm all \\
        --skew iid dirichlet:1.0 dirichlet:0.1 shards:2 --seeds 3 --out results/accuracy

One MPI job per (skew, seed) trains all its schemes in turn from the same initial weights
(``disdl_mpi.run --norm LIST``), so start-up is paid once per job. Partitions: by default the
partition of a skew is drawn with the same seed as the training (seed s -> partition seed s),
so the spread over seeds covers both the draw of the skewed partition and the initialization /
shuffle; ``--partition-seed K`` fixes one partition for all seeds instead (then seeds vary only
the initialization and the batch order). Within one seed every scheme sees the same partition
and the same initial weights, so scheme differences are paired.

Outputs in OUT: accuracy.csv, accuracy.md, accuracy.png, curves.png, points.json, and runs/
with each job's log and summary. Rerunning the same command resumes: finished points are kept
(each job's results are harvested the moment it ends) and only missing ones are trained.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from disdl_mpi.files import write_json
from bench.studies.accuracy_jobs import (Job, StudyError, default_launcher, harvest, launch,
                                 launcher_argv, skew_tag)
from bench.studies.engine import _terminate_on_sigterm as terminate_on_sigterm
from bench.studies.accuracy_report import bar_plot, curve_plot, markdown, strongest_skew, write_csv

DEFAULT_SKEWS = ("iid", "dirichlet:1.0", "dirichlet:0.1", "shards:2")
# Chosen so IID BatchNorm has flattened out on digits at 8 ranks (see docs/RESULTS.md) while
# the whole default study (9 schemes x 4 skews x 3 seeds) fits 45 min on a 2-core machine.
DEFAULT_EPOCHS = 12
QUICK_EPOCHS = 6
QUICK_SKEWS = ("iid", "dirichlet:0.1")
DEFAULT_TIMEOUT = 1800.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.studies.accuracy",
        description="Accuracy of every normalization scheme under partition skew: one MPI job "
                    "per (skew, seed), all schemes from the same initial weights; writes "
                    "accuracy.csv/.md/.png and curves.png; a rerun resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=8, help="MPI ranks (= private partitions)")
    p.add_argument("--norm", nargs="+", default=["all"],
                   help="schemes: 'all', names, or comma lists")
    p.add_argument("--skew", nargs="+", default=None,
                   help=f"partition specs (default {' '.join(DEFAULT_SKEWS)}; "
                        f"--quick: {' '.join(QUICK_SKEWS)})")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds, run as first-seed, first-seed+1, ... (default 3; "
                        "--quick: 1)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--partition-seed", type=int, default=None,
                   help="draw every partition with this one seed (default: the run's seed)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per scheme (default {DEFAULT_EPOCHS}; --quick: {QUICK_EPOCHS})")
    p.add_argument("--quick", action="store_true",
                   help="a reduced study in a few minutes: 1 seed, fewer epochs, 2 skews "
                        "(explicit --seeds/--epochs/--skew still win)")
    p.add_argument("--dataset", default="digits", help="source to partition (see data_prep)")
    p.add_argument("--source-dir", default=None, help="raw files of mnist/cifar/npz sources")
    p.add_argument("--model", default="auto", help="cnn, resnet20, mlp, auto")
    p.add_argument("--run-args", default="",
                   help="extra options for disdl_mpi.run, one string (e.g. '--lr 0.1')")
    p.add_argument("--launcher", default=None,
                   help="launch template with {n} (and optionally {python}); default "
                        "$DISDL_LAUNCHER or the venv's 'mpiexec -n {n}' (SLURM: "
                        "'srun --mpi=pmi2 -n {n}')")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds one job may run before it is killed")
    p.add_argument("--data-root", default=None,
                   help="where partitions are built (default OUT/data)")
    p.add_argument("--out", required=True, help="study folder (resumed if it exists)")
    p.add_argument("--force", action="store_true", help="retrain points that are already done")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (points done, jobs to run) and stop")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing; rewrite the outputs from the finished points")
    p.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="auto: a bar on a TTY, plain lines otherwise")
    return p


def resolve_norms(items: list[str]) -> list[str]:
    """'all' or names (space or comma separated) -> registry names, validated, in order."""
    from disdl_mpi.norms import available_schemes
    known = available_schemes()
    names: list[str] = []
    for item in items:
        for name in (n.strip() for n in item.split(",")):
            if not name:
                continue
            if name == "all":
                names += [k for k in known if k not in names]
            elif name not in known:
                raise StudyError(f"--norm: unknown scheme {name!r}; known: "
                                 f"{', '.join(known)}, all")
            elif name not in names:
                names.append(name)
    if not names:
        raise StudyError("--norm: no scheme given")
    return names


def resolve_skews(items: list[str]) -> list[str]:
    """Validate each partition spec early, with data_prep's own parser and message."""
    from data_prep.errors import DataPrepError
    from data_prep.schemes import parse_scheme
    skews: list[str] = []
    for s in items:
        s = s.strip().lower()
        try:
            parse_scheme(s)
        except DataPrepError as exc:
            raise StudyError(f"--skew: {exc}") from None
        if s not in skews:
            skews.append(s)
    return skews


def label_skew_tv(manifest: dict) -> float:
    """Size-weighted mean total-variation distance of rank label histograms to the global one."""
    counts = np.array([r["class_counts"] for r in manifest["ranks"]], dtype=np.float64)
    sizes = counts.sum(axis=1)
    glob = counts.sum(axis=0) / max(1.0, counts.sum())
    tv = 0.5 * np.abs(counts / np.maximum(sizes, 1)[:, None] - glob).sum(axis=1)
    return float((tv * sizes).sum() / max(1.0, sizes.sum()))


def ensure_partition(data_dir: Path, dataset: str, ranks: int, skew: str, seed: int,
                     source_dir: Optional[str]) -> dict:
    """Build the partition once (atomic, by data_prep) and return its manifest."""
    manifest_path = data_dir / "partition.json"
    if not manifest_path.exists():
        from data_prep.partition import build_partitions
        try:
            build_partitions(dataset, ranks, skew, seed, data_dir, source_dir=source_dir)
        except Exception as exc:
            raise StudyError(f"building partition {data_dir} ({dataset}, {skew}, {ranks} "
                             f"ranks, seed {seed}) failed: {exc}") from None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise StudyError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if manifest.get("world_size") != ranks:
        raise StudyError(f"{manifest_path}: field 'world_size' is {manifest.get('world_size')}, "
                         f"but --ranks {ranks}; remove the folder or pick another --data-root")
    return manifest


class Progress:
    """Study progress in scheme-epochs: a redrawn bar on a TTY, one line per event otherwise."""

    def __init__(self, mode: str, total_units: int, jobs: int):
        self.bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self.quiet = mode == "none"
        self.total, self.done, self.jobs, self.job = max(1, total_units), 0, jobs, 0
        self.start = time.monotonic()
        self.label = ""

    def _eta(self) -> str:
        if self.done == 0:
            return "?"
        left = (time.monotonic() - self.start) / self.done * (self.total - self.done)
        return f"{left / 60:.1f} min"

    def begin_job(self, label: str) -> None:
        self.job += 1
        self.label = label
        self.line(f"[job {self.job}/{self.jobs}] {label}")

    def epoch(self, norm: str, epoch: int, total: int) -> None:
        self.done = min(self.total, self.done + 1)
        if self.bar:
            width = 30
            fill = int(width * self.done / self.total)
            sys.stdout.write(f"\r  job {self.job}/{self.jobs} {self.label:<22} {norm:>8} "
                             f"[{'#' * fill}{'.' * (width - fill)}] "
                             f"{100 * self.done / self.total:3.0f}% ETA {self._eta():>9}")
            sys.stdout.flush()
        elif not self.quiet and epoch == total:
            print(f"    {norm} done ({self.done}/{self.total} scheme-epochs, "
                  f"ETA {self._eta()})", flush=True)

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar:
            sys.stdout.write("\r" + " " * 100 + "\r")
        print(text, flush=True)


def point_row(rec: dict, skew: str, seed: int, ranks: int, pseed: int, tv: float) -> dict:
    """One study row from a run record (the run's summary.json schema, docs/CONTRACTS.md)."""
    phases = rec.get("phases", {})
    return {
        "norm": rec["norm"], "skew": skew, "seed": seed, "ranks": ranks,
        "partition_seed": pseed, "label_skew_tv": tv,
        "test_accuracy": float(rec["test_accuracy"]), "epochs": int(rec["epochs"]),
        "wall_s": float(rec["wall_s"]), "train_s": float(rec.get("train_s", rec["wall_s"])),
        "samples_per_s": float(rec.get("samples_per_s", 0.0)),
        "compute_s": float(phases.get("compute", 0.0)), "comm_s": float(phases.get("comm", 0.0)),
        "per_rank_accuracy": rec.get("per_rank_accuracy"),
        "curve": [float(e["test_accuracy"]) for e in rec.get("epochs_log", [])],
        "attempt": rec.get("attempt"),
    }


def _run_jobs(jobs: list[Job], args: argparse.Namespace, launcher: str, progress: Progress,
              rows: dict, norms: list[str], report) -> list[str]:
    """Launch the jobs one after another; harvest and report after each. Returns failures."""
    failures: list[str] = []
    for job in jobs:
        progress.begin_job(f"{job.skew} seed {job.seed}: {','.join(job.norms)}")
        outcome = launch(job, args.ranks, launcher, args.timeout, progress.epoch)
        # Harvest at once, even from a failed job: its finished schemes count as done.
        for norm, rec in harvest(job.run_dir, job.fingerprint).items():
            if norm in norms:
                rows[(norm, job.skew, job.seed)] = (rec, job.fingerprint["partition_seed"])
        report()
        status = "ok" if outcome.ok else f"FAILED: {outcome.message}"
        progress.line(f"[job {progress.job}/{len(jobs)}] {job.tag} {outcome.wall_s:.1f} s, "
                      f"{status}")
        if not outcome.ok:
            failures.append(f"{job.tag}: {outcome.message}")
    return failures


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_study(args, sys.argv[1:] if argv is None else argv)
    except StudyError as exc:
        print(f"bench.studies.accuracy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbench.accuracy: interrupted; finished points are kept, rerun to resume",
              file=sys.stderr)
        return 130


def run_study(args: argparse.Namespace, argv: list[str]) -> int:
    if args.ranks < 1:
        raise StudyError(f"--ranks must be at least 1, got {args.ranks}")
    seeds_n = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick
                                                          else DEFAULT_EPOCHS)
    if seeds_n < 1 or epochs < 1 or args.timeout <= 0:
        raise StudyError("--seeds, --epochs and --timeout must be positive")
    norms = resolve_norms(args.norm)
    skews = resolve_skews(args.skew or list(QUICK_SKEWS if args.quick else DEFAULT_SKEWS))
    seeds = list(range(args.first_seed, args.first_seed + seeds_n))
    launcher = args.launcher or default_launcher()
    launcher_argv(launcher, args.ranks)  # validate the template before anything runs
    try:
        run_args = shlex.split(args.run_args)
    except ValueError as exc:
        raise StudyError(f"--run-args: {exc}") from None
    owned = {"--data-dir", "--norm", "--seed", "--out", "--progress", "--epochs", "--model"}
    clash = [a for a in run_args if a.split("=")[0] in owned]
    if clash:
        raise StudyError(f"--run-args must not set {', '.join(clash)}: the study sets them")
    run_args = ["--epochs", str(epochs), "--model", args.model, *run_args]

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"--out {out}: cannot create ({exc.strerror or exc})") from None
    data_root = Path(args.data_root) if args.data_root else out / "data"

    # Plan: one job per (skew, seed), restricted to the schemes not yet done.
    rows: dict[tuple[str, str, int], dict] = {}
    jobs: list[Job] = []
    # Seed-major order: a study cut short still covers every skew (with fewer seeds).
    for seed in seeds:
        for skew in skews:
            pseed = seed if args.partition_seed is None else args.partition_seed
            data_dir = data_root / f"{args.dataset}-{skew_tag(skew)}-n{args.ranks}-p{pseed}"
            fingerprint = {"ranks": args.ranks, "dataset": args.dataset, "skew": skew,
                           "seed": seed, "partition_seed": pseed, "run_args": run_args}
            job = Job(skew, seed, [], data_dir, out / "runs" / f"{skew_tag(skew)}-s{seed}",
                      fingerprint, run_args)
            done = {} if args.force else harvest(job.run_dir, fingerprint)
            for norm, rec in done.items():
                if norm in norms:
                    rows[(norm, skew, seed)] = (rec, pseed)
            job.norms = [n for n in norms if n not in done]
            if job.norms and not args.report_only:
                jobs.append(job)

    tv_cache: dict[Path, float] = {}

    def to_row(key: tuple[str, str, int]) -> dict:
        norm, skew, seed = key
        rec, pseed = rows[key]
        data_dir = Path(rec.get("data_dir") or "")
        if data_dir not in tv_cache:
            try:
                tv_cache[data_dir] = label_skew_tv(
                    json.loads((data_dir / "partition.json").read_text()))
            except (OSError, ValueError, KeyError):
                tv_cache[data_dir] = math.nan
        return point_row(rec, skew, seed, args.ranks, pseed, tv_cache[data_dir])

    header = {"ranks": args.ranks, "dataset": args.dataset, "model": args.model,
              "command": "python -m bench.studies.accuracy " + shlex.join(argv),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "epochs": epochs,
              "seeds": ", ".join(map(str, seeds)),
              "partition_seeds": ("same as the run seed" if args.partition_seed is None
                                  else f"fixed at {args.partition_seed}"),
              "run_args": " ".join(run_args)}

    def report() -> list[dict]:
        ordered = [to_row((n, s, sd)) for s in skews for sd in seeds for n in norms
                   if (n, s, sd) in rows]
        machine = next((rows[k][0].get("machine") for k in rows if rows[k][0].get("machine")),
                       None)
        if machine:
            header["machine"] = (f"{machine.get('cores_per_node')}-core "
                                 f"{machine.get('cpu') or platform.machine()}, "
                                 f"{machine.get('device')}, "
                                 f"{str(machine.get('mpi_library')).splitlines()[0][:60]}, "
                                 f"torch {machine.get('torch')}, "
                                 f"{machine.get('threads_per_rank')} thread(s)/rank")
        write_json(out / "points.json", {"header": header, "norms": norms, "skews": skews,
                                         "seeds": seeds, "points": ordered})
        write_csv(out / "accuracy.csv", ordered)
        (out / "accuracy.md").parent.mkdir(parents=True, exist_ok=True)
        from disdl_mpi.files import write_text
        write_text(out / "accuracy.md", markdown(ordered, norms, skews, header))
        if ordered:
            done_seeds = len({r["seed"] for r in ordered})
            title = (f"{args.dataset}, {args.ranks} ranks, {epochs} epochs, "
                     f"up to {done_seeds} seed(s)")
            bar_plot(out / "accuracy.png", ordered, norms, skews, title)
            strong = strongest_skew(ordered, skews)
            if strong:
                curve_plot(out / "curves.png", ordered, norms, strong,
                           f"test accuracy per epoch at {strong} ({title})")
        return ordered

    total_points = len(norms) * len(skews) * len(seeds)
    progress = Progress(args.progress, sum(len(j.norms) for j in jobs) * epochs, len(jobs))
    progress.line(f"accuracy study in {out}: {len(norms)} scheme(s) x {len(skews)} skew(s) x "
                  f"{len(seeds)} seed(s) = {total_points} points, {len(rows)} already done, "
                  f"{len(jobs)} job(s) to run at {args.ranks} ranks, {epochs} epochs")
    if args.dry_run:
        for job in jobs:
            print(f"would run: {job.tag}: {','.join(job.norms)} ({epochs} epochs, "
                  f"{args.ranks} ranks) in {job.run_dir}")
        return 0
    # Every partition first: a spec that cannot be built (e.g. shards:2 at 2 ranks) fails the
    # study before any job has spent time, not in the middle.
    for job in jobs:
        manifest = ensure_partition(job.data_dir, args.dataset, args.ranks, job.skew,
                                    job.fingerprint["partition_seed"], args.source_dir)
        tv_cache[job.data_dir] = label_skew_tv(manifest)
    failures: list[str] = []
    # SIGTERM (scancel, the SLURM scripts' signal forwarding) unwinds like Ctrl-C: the running
    # job's ranks are killed, finished schemes stay on disk for the resumed run.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    terminate_on_sigterm()
    try:
        failures = _run_jobs(jobs, args, launcher, progress, rows, norms, report)
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    ordered = report()
    progress.line(f"{len(ordered)}/{total_points} points done; wrote {out / 'accuracy.csv'}, "
                  f"accuracy.md, accuracy.png, curves.png")
    if failures:
        print("failed jobs (rerun the same command to retry them):\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    return 0 if len(ordered) == total_points else 1


if __name__ == "__main__":
    sys.exit(main())
