"""The accuracy study: every normalization scheme x partition skew x seed, one table and plots.

    python -m bench.studies.accuracy --ranks 8 --norm all \\
        --partition iid dirichlet:1.0 dirichlet:0.1 shards:2 --seeds 3 --out results/accuracy

One MPI job per (skew, seed) trains all its schemes in turn from the same initial weights
(``disdl_mpi.run --norm LIST``), so start-up is paid once per job. Partitions: by default the
partition of a skew is drawn with the same seed as the training (seed s -> partition seed s),
so the spread over seeds covers both the draw of the skewed partition and the initialization /
shuffle; ``--partition-seed K`` fixes one partition for all seeds instead (then seeds vary only
the initialization and the batch order). Within one seed every scheme sees the same partition
and the same initial weights, so scheme differences are paired.

Outputs in OUT: accuracy.csv, accuracy.md, accuracy.png, curves.png, gap.png, points.json, runs/
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

from bench.studies.accuracy_jobs import Job, harvest, launch, next_attempt
from bench.studies.accuracy_report import (bar_plot, curve_plot, gap_heatmap, markdown,
                                           strongest_skew, write_csv)
from bench.studies.engine import (PointStore, SweepError, add_launch_options, launcher_command,
                                  terminate_on_sigterm)
from data_prep.ensure import ensure_partition
from disdl_mpi.data.layout import partition_dir, spec_tag
from data_prep.errors import DataPrepError
from data_prep.partition_spec import parse_partition
from disdl_mpi.files import write_json, write_text
from disdl_mpi.norms import resolve_schemes
from disdl_mpi.observe.progress import Progress
from disdl_mpi.options import (DefaultsHelpFormatter, add_dataset, add_norm, add_partition,
                               add_progress, spelling)


class StudyError(RuntimeError):
    """A problem with the study's inputs or its folder, reported without a traceback."""


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
                    "accuracy.csv/.md/.png, curves.png and gap.png; a rerun resumes.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=8, help="MPI ranks (= private partitions)")
    add_norm(p, default=["all"], nargs="+")
    add_partition(p, None, old="--skew", nargs="+")
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
                        "(explicit --seeds/--epochs/--partition still win)")
    add_dataset(p, default="digits", when="source to partition")
    p.add_argument("--source-dir", default=None, help="raw files of mnist/cifar/npz sources")
    p.add_argument("--train-subset", type=int, default=None,
                   help="a fixed class-stratified subset of N training samples for every "
                        "partition (the test set stays whole)")
    p.add_argument("--model", default="auto", help="cnn, resnet20, mlp, auto")
    add_launch_options(p)
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
    p.add_argument("--target-accuracy", type=float, default=None, metavar="ACC",
                   help="report time-to-accuracy: the first epoch, and the wall time, at which "
                        "each run's test accuracy reached ACC (0-1), from its per-epoch log")
    add_progress(p)
    return p


def resolve_skews(items: list[str], option: str) -> list[str]:
    """Validate each partition spec early, with data_prep's own parser and message."""
    skews: list[str] = []
    for s in items:
        s = s.strip().lower()
        try:
            parse_partition(s)
        except DataPrepError as exc:
            raise StudyError(f"{option}: {exc}") from None
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
        "domain_accuracy_mean": rec.get("domain_accuracy_mean"),
        "curve": [float(e["test_accuracy"]) for e in rec.get("epochs_log", [])],
        "curve_wall_s": [float(e.get("wall_s", math.nan)) for e in rec.get("epochs_log", [])],
        "attempt": rec.get("attempt"),
    }


class Study:
    """The plan, the store of finished points and the outputs of one accuracy study."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        if args.ranks < 1:
            raise StudyError(f"--ranks must be at least 1, got {args.ranks}")
        self.args = args
        seeds_n = args.seeds if args.seeds is not None else (1 if args.quick else 3)
        self.epochs = args.epochs if args.epochs is not None else (
            QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
        if seeds_n < 1 or self.epochs < 1 or args.timeout <= 0:
            raise StudyError("--seeds, --epochs and --timeout must be positive")
        try:
            self.norms = resolve_schemes(args.norm)
        except ValueError as exc:
            raise StudyError(str(exc)) from None
        self.skews = resolve_skews(args.partition or list(QUICK_SKEWS if args.quick
                                                          else DEFAULT_SKEWS),
                                   spelling(args, "partition", "--partition"))
        self.seeds = list(range(args.first_seed, args.first_seed + seeds_n))
        self.launcher = args.launcher
        try:
            launcher_command(self.launcher, args.ranks, [])  # validate the template now
            run_args = shlex.split(args.run_args)
        except (SweepError, ValueError) as exc:
            raise StudyError(f"--run-args: {exc}" if isinstance(exc, ValueError)
                             else str(exc)) from None
        owned = {"--data-dir", "--norm", "--seed", "--out", "--progress", "--epochs", "--model"}
        clash = [a for a in run_args if a.split("=")[0] in owned]
        if clash:
            raise StudyError(f"--run-args must not set {', '.join(clash)}: the study sets them")
        self.run_args = ["--epochs", str(self.epochs), "--model", args.model, *run_args]
        self.out = Path(args.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"--out {self.out}: cannot create ({exc.strerror or exc})") from None
        self.data_root = Path(args.data_root) if args.data_root else self.out / "data"
        self.store = PointStore(self.out / "points")
        self.rows: dict[tuple[str, str, int], tuple[dict, int]] = {}
        self.tv_cache: dict[Path, float] = {}
        self.header = {
            "ranks": args.ranks, "dataset": args.dataset, "model": args.model,
            "command": "python -m bench.studies.accuracy " + shlex.join(argv),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "epochs": self.epochs,
            "seeds": ", ".join(map(str, self.seeds)),
            "partition_seeds": ("same as the run seed" if args.partition_seed is None
                                else f"fixed at {args.partition_seed}"),
            "run_args": " ".join(self.run_args), "target_accuracy": args.target_accuracy}

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[Job]:
        """One job per (partition, seed), restricted to the schemes not done yet.

        Seed-major order: a study cut short still covers every partition (with fewer seeds).
        """
        args, jobs = self.args, []
        for seed in self.seeds:
            for skew in self.skews:
                pseed = seed if args.partition_seed is None else args.partition_seed
                fingerprint = {"ranks": args.ranks, "dataset": args.dataset, "skew": skew,
                               "seed": seed, "partition_seed": pseed, "run_args": self.run_args,
                               "train_subset": args.train_subset}
                job = Job(skew, seed, [], partition_dir(self.data_root, args.dataset, skew,
                                                        args.ranks, pseed,
                                                        train_subset=args.train_subset),
                          self.out / "runs" / f"{spec_tag(skew)}-s{seed}", fingerprint,
                          self.run_args)
                for norm in self.norms:
                    point = None if args.force else self.store.get(job.point_key(norm),
                                                                   fingerprint)
                    if point is not None:
                        self.rows[(norm, skew, seed)] = (point["record"], pseed)
                    else:
                        job.norms.append(norm)
                if job.norms and not args.report_only:
                    jobs.append(job)
        return jobs

    def collect(self, job: Job, attempt: Path) -> None:
        """Store every scheme the attempt finished (also after a failed or killed job)."""
        pseed = job.fingerprint["partition_seed"]
        for norm, rec in harvest(attempt).items():
            if norm in job.norms:
                self.store.put(job.point_key(norm), job.fingerprint,
                               {"record": rec, "partition_seed": pseed})
                self.rows[(norm, job.partition, job.seed)] = (rec, pseed)

    # ------------------------------------------------------------------ outputs
    def row(self, key: tuple[str, str, int]) -> dict:
        norm, skew, seed = key
        rec, pseed = self.rows[key]
        data_dir = Path(rec.get("data_dir") or "")
        if data_dir not in self.tv_cache:
            try:
                self.tv_cache[data_dir] = label_skew_tv(
                    json.loads((data_dir / "partition.json").read_text()))
            except (OSError, ValueError, KeyError):
                self.tv_cache[data_dir] = math.nan
        return point_row(rec, skew, seed, self.args.ranks, pseed, self.tv_cache[data_dir])

    def report(self) -> list[dict]:
        """Rewrite points.json, accuracy.csv/.md/.png and curves.png from the points done."""
        out, args = self.out, self.args
        ordered = [self.row((n, s, sd)) for s in self.skews for sd in self.seeds
                   for n in self.norms if (n, s, sd) in self.rows]
        machine = next((rec.get("machine") for rec, _ in self.rows.values()
                        if rec.get("machine")), None)
        if machine:
            self.header["machine"] = (
                f"{machine.get('cores_per_node')}-core {machine.get('cpu') or platform.machine()}"
                f", {machine.get('device')}, {str(machine.get('mpi_library')).splitlines()[0][:60]}"
                f", torch {machine.get('torch')}, {machine.get('threads_per_rank')} thread(s)/rank")
        write_json(out / "points.json", {"header": self.header, "norms": self.norms,
                                         "skews": self.skews, "seeds": self.seeds,
                                         "points": ordered})
        write_csv(out / "accuracy.csv", ordered)
        write_text(out / "accuracy.md", markdown(ordered, self.norms, self.skews, self.header))
        if ordered:
            done_seeds = len({r["seed"] for r in ordered})
            title = (f"{args.dataset}, {args.ranks} ranks, {self.epochs} epochs, "
                     f"up to {done_seeds} seed(s)")
            bar_plot(out / "accuracy.png", ordered, self.norms, self.skews, title)
            gap_heatmap(out / "gap.png", ordered, self.norms, self.skews,
                        f"gap to IID-BN, accuracy points ({title})")
            strong = strongest_skew(ordered, self.skews)
            if strong:
                curve_plot(out / "curves.png", ordered, self.norms, strong,
                           f"test accuracy per epoch at {strong} ({title})")
        return ordered


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_study(Study(args, sys.argv[1:] if argv is None else argv))
    except StudyError as exc:
        print(f"bench.studies.accuracy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbench.studies.accuracy: interrupted; finished points are kept, rerun to "
              "resume", file=sys.stderr)
        return 130


def run_jobs(study: Study, jobs: list[Job], progress: Progress) -> list[str]:
    """Launch the jobs one after another; store and report after each. Returns failures."""
    args, failures = study.args, []

    def on_epoch(norm: str, epoch: int, total: int) -> None:
        progress.advance(1, f"{norm} epoch {epoch}/{total}")
        if not progress.is_bar and epoch == total:
            progress.line(f"    {norm} done ({progress.done}/{progress.total} scheme-epochs, "
                          f"ETA {progress.eta()})")

    for number, job in enumerate(jobs, 1):
        progress.line(f"[job {number}/{len(jobs)}] {job.partition} seed {job.seed}: "
                      f"{','.join(job.norms)}")
        attempt = next_attempt(job.run_dir)
        try:
            result = launch(job, attempt, args.ranks, study.launcher, args.timeout, on_epoch)
        except SweepError as exc:
            raise StudyError(str(exc)) from None
        finally:
            # Harvest at once, even from a failed or interrupted job: its finished schemes
            # count as done.
            study.collect(job, attempt)
            study.report()
        status = "ok" if result.ok else f"FAILED: {_failure(result, args.timeout)}"
        progress.line(f"[job {number}/{len(jobs)}] {job.tag} {result.wall_s:.1f} s, {status}")
        if not result.ok:
            failures.append(f"{job.tag}: {_failure(result, args.timeout)}")
    return failures


def _failure(result, timeout: float) -> str:
    if result.timed_out:
        return f"timed out after {timeout:.0f} s (--timeout); log: {result.log}"
    tail = "\n    ".join(result.tail().splitlines()[-12:])
    return f"exit code {result.returncode}; log: {result.log}; last lines:\n    {tail}"


def run_study(study: Study) -> int:
    args = study.args
    jobs = study.plan()
    total_points = len(study.norms) * len(study.skews) * len(study.seeds)
    progress = Progress(sum(len(j.norms) for j in jobs) * study.epochs, mode=args.progress)
    progress.line(f"accuracy study in {study.out}: {len(study.norms)} scheme(s) x "
                  f"{len(study.skews)} skew(s) x {len(study.seeds)} seed(s) = {total_points} "
                  f"points, {len(study.rows)} already done, {len(jobs)} job(s) to run at "
                  f"{args.ranks} ranks, {study.epochs} epochs")
    if args.dry_run:
        for job in jobs:
            print(f"would run: {job.tag}: {','.join(job.norms)} ({study.epochs} epochs, "
                  f"{args.ranks} ranks) in {job.run_dir}")
        return 0
    # Every partition first: a spec that cannot be built (e.g. shards:2 at 2 ranks) fails the
    # study before any job has spent time, not in the middle.
    for job in jobs:
        try:
            manifest = ensure_partition(job.data_dir, args.dataset, args.ranks, job.partition,
                                        job.fingerprint["partition_seed"],
                                        source_dir=args.source_dir,
                                        train_subset=args.train_subset)
        except Exception as exc:
            raise StudyError(f"partition {job.data_dir} ({args.dataset}, {job.partition}, "
                             f"{args.ranks} ranks, seed {job.fingerprint['partition_seed']}): "
                             f"{exc}") from None
        study.tv_cache[job.data_dir] = label_skew_tv(manifest)
    # SIGTERM (scancel, the SLURM scripts' signal forwarding) unwinds like Ctrl-C: the running
    # job's ranks are killed, finished schemes stay in the store for the resumed run.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    terminate_on_sigterm()
    try:
        failures = run_jobs(study, jobs, progress)
    finally:
        progress.close()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    ordered = study.report()
    progress.line(f"{len(ordered)}/{total_points} points done; wrote "
                  f"{study.out / 'accuracy.csv'}, accuracy.md, accuracy.png, curves.png")
    if failures:
        print("failed jobs (rerun the same command to retry them):\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    return 0 if len(ordered) == total_points else 1


if __name__ == "__main__":
    sys.exit(main())
