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
import signal
import sys
import threading
from typing import Optional

from bench.studies.accuracy_jobs import Job, launch, next_attempt
from bench.studies.accuracy_study import DEFAULT_EPOCHS, QUICK_EPOCHS, Study, StudyError, label_skew_tv
from bench.studies.engine import SweepError, add_launch_options, terminate_on_sigterm
from data_prep.ensure import ensure_partition
from disdl_mpi.observe.progress import Progress
from disdl_mpi.options import DefaultsHelpFormatter, add_dataset, add_norm, add_partition, add_progress

DEFAULT_TIMEOUT = 1800.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.studies.accuracy",
        description="Accuracy of every normalization scheme under partition skew: one MPI job "
        "per (skew, seed), all schemes from the same initial weights; writes "
        "accuracy.csv/.md/.png, curves.png and gap.png; a rerun resumes.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--ranks", type=int, default=8, help="isolated ranks (= private partitions)")
    p.add_argument(
        "--virtual-ranks",
        type=int,
        default=1,
        metavar="K",
        help="isolated ranks per MPI process: each job runs --ranks/K processes with "
        "disdl_mpi.run --virtual-ranks K (the same training as --ranks MPI ranks, so points "
        "made at either layout are reused by the other; each row records its layout)",
    )
    add_norm(p, default=["all"], nargs="+")
    add_partition(p, None, old="--skew", nargs="+")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds, run as first-seed, first-seed+1, ... (default 3; --quick: 1)",
    )
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument(
        "--partition-seed",
        type=int,
        default=None,
        help="draw every partition with this one seed (default: the run's seed)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs per scheme (default {DEFAULT_EPOCHS}; --quick: {QUICK_EPOCHS})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a reduced study in a few minutes: 1 seed, fewer epochs, 2 skews "
        "(explicit --seeds/--epochs/--partition still win)",
    )
    add_dataset(p, default="digits", when="source to partition")
    p.add_argument("--source-dir", default=None, help="raw files of mnist/cifar/npz sources")
    p.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="a fixed class-stratified subset of N training samples for every "
        "partition (the test set stays whole)",
    )
    p.add_argument("--model", default="auto", help="cnn, resnet20, mlp, auto")
    add_launch_options(p)
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds one job may run before it is killed"
    )
    p.add_argument("--data-root", default=None, help="where partitions are built (default OUT/data)")
    p.add_argument("--out", required=True, help="study folder (resumed if it exists)")
    p.add_argument("--force", action="store_true", help="retrain points that are already done")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (points done, jobs to run) and stop"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing; rewrite the outputs from the finished points",
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        metavar="ACC",
        help="report time-to-accuracy: the first epoch, and the wall time, at which "
        "each run's test accuracy reached ACC (0-1), from its per-epoch log",
    )
    add_progress(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_study(Study(args, sys.argv[1:] if argv is None else argv))
    except StudyError as exc:
        print(f"bench.studies.accuracy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nbench.studies.accuracy: interrupted; finished points are kept, rerun to resume",
            file=sys.stderr,
        )
        return 130


def run_jobs(study: Study, jobs: list[Job], progress: Progress) -> list[str]:
    """Launch the jobs one after another; store and report after each. Returns failures."""
    args, failures = study.args, []

    def on_epoch(norm: str, epoch: int, total: int) -> None:
        progress.advance(1, f"{norm} epoch {epoch}/{total}")
        if not progress.is_bar and epoch == total:
            progress.line(
                f"    {norm} done ({progress.done}/{progress.total} scheme-epochs, ETA {progress.eta()})"
            )

    for number, job in enumerate(jobs, 1):
        progress.line(f"[job {number}/{len(jobs)}] {job.partition} seed {job.seed}: {','.join(job.norms)}")
        attempt = next_attempt(job.run_dir)
        try:
            result = launch(job, attempt, study.processes, study.launcher, args.timeout, on_epoch)
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
    progress.line(
        f"accuracy study in {study.out}: {len(study.norms)} scheme(s) x "
        f"{len(study.skews)} skew(s) x {len(study.seeds)} seed(s) = {total_points} "
        f"points, {len(study.rows)} already done, {len(jobs)} job(s) to run at "
        f"{args.ranks} ranks, {study.epochs} epochs"
    )
    if args.dry_run:
        for job in jobs:
            print(
                f"would run: {job.tag}: {','.join(job.norms)} ({study.epochs} epochs, "
                f"{args.ranks} ranks) in {job.run_dir}"
            )
        return 0
    # Every partition first: a spec that cannot be built (e.g. shards:2 at 2 ranks) fails the
    # study before any job has spent time, not in the middle.
    for job in jobs:
        try:
            manifest = ensure_partition(
                job.data_dir,
                args.dataset,
                args.ranks,
                job.partition,
                job.fingerprint["partition_seed"],
                source_dir=args.source_dir,
                train_subset=args.train_subset,
            )
        except Exception as exc:
            raise StudyError(
                f"partition {job.data_dir} ({args.dataset}, {job.partition}, "
                f"{args.ranks} ranks, seed {job.fingerprint['partition_seed']}): "
                f"{exc}"
            ) from None
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
    progress.line(
        f"{len(ordered)}/{total_points} points done; wrote "
        f"{study.out / 'accuracy.csv'}, accuracy.md, accuracy.png, curves.png"
    )
    if failures:
        print(
            "failed jobs (rerun the same command to retry them):\n  " + "\n  ".join(failures), file=sys.stderr
        )
        return 1
    return 0 if len(ordered) == total_points else 1


if __name__ == "__main__":
    sys.exit(main())
