"""One accuracy study's plan and state: the (partition, seed) jobs to run, the points done, the report."""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import time
from pathlib import Path

import numpy as np

from bench.studies.accuracy_jobs import Job, harvest
from bench.studies.accuracy_plots import bar_plot, curve_plot, gap_heatmap
from bench.studies.accuracy_report import markdown, strongest_skew, write_csv
from bench.studies.engine import PointStore, SweepError, launcher_command
from data_prep.errors import DataPrepError
from data_prep.partition_spec import parse_partition
from disdl_mpi.data.layout import partition_dir, spec_tag
from disdl_mpi.files import jsonable, write_json, write_text
from disdl_mpi.norms import resolve_schemes
from disdl_mpi.options import spelling


class StudyError(RuntimeError):
    """A problem with the study's inputs or its folder, reported without a traceback."""


DEFAULT_SKEWS = ("iid", "dirichlet:1.0", "dirichlet:0.1", "shards:2")


# Chosen so IID BatchNorm has flattened out on digits at 8 ranks (see docs/RESULTS.md) while
# the whole default study (then 9 schemes x 4 skews x 3 seeds) fit 45 min on a 2-core machine.
DEFAULT_EPOCHS = 12


QUICK_EPOCHS = 6


QUICK_SKEWS = ("iid", "dirichlet:0.1")


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
        "norm": rec["norm"],
        "skew": skew,
        "seed": seed,
        "ranks": ranks,
        "partition_seed": pseed,
        "label_skew_tv": tv,
        "test_accuracy": float(rec["test_accuracy"]),
        "epochs": int(rec["epochs"]),
        "wall_s": float(rec["wall_s"]),
        "train_s": float(rec.get("train_s", rec["wall_s"])),
        "samples_per_s": float(rec.get("samples_per_s", 0.0)),
        "compute_s": float(phases.get("compute", 0.0)),
        "comm_s": float(phases.get("comm", 0.0)),
        "per_rank_accuracy": rec.get("per_rank_accuracy"),
        "domain_accuracy_mean": rec.get("domain_accuracy_mean"),
        "curve": [float(e["test_accuracy"]) for e in rec.get("epochs_log", [])],
        "curve_wall_s": [float(e.get("wall_s", math.nan)) for e in rec.get("epochs_log", [])],
        "attempt": rec.get("attempt"),
        "processes": int(rec.get("processes", ranks)),  # the layout it ran at (not a fingerprint)
        "virtual_ranks": int(rec.get("virtual_ranks", 1)),
    }


class Study:
    """The plan, the store of finished points and the outputs of one accuracy study."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        if args.ranks < 1:
            raise StudyError(f"--ranks must be at least 1, got {args.ranks}")
        k = args.virtual_ranks
        if k < 1 or args.ranks % k:
            raise StudyError(f"--virtual-ranks {k} must be >= 1 and divide --ranks {args.ranks}")
        self.processes = args.ranks // k  # MPI processes per job, each carrying k ranks
        self.args = args
        seeds_n = args.seeds if args.seeds is not None else (1 if args.quick else 3)
        self.epochs = (
            args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
        )
        if seeds_n < 1 or self.epochs < 1 or args.timeout <= 0:
            raise StudyError("--seeds, --epochs and --timeout must be positive")
        try:
            self.norms = resolve_schemes(args.norm)
        except ValueError as exc:
            raise StudyError(str(exc)) from None
        self.skews = resolve_skews(
            args.partition or list(QUICK_SKEWS if args.quick else DEFAULT_SKEWS),
            spelling(args, "partition", "--partition"),
        )
        self.seeds = list(range(args.first_seed, args.first_seed + seeds_n))
        self.launcher = args.launcher
        try:
            launcher_command(self.launcher, self.processes, [])  # validate the template now
            run_args = shlex.split(args.run_args)
        except (SweepError, ValueError) as exc:
            raise StudyError(f"--run-args: {exc}" if isinstance(exc, ValueError) else str(exc)) from None
        owned = {"--data-dir", "--norm", "--seed", "--out", "--progress", "--epochs", "--model"}
        owned.add("--virtual-ranks")
        clash = [a for a in run_args if a.split("=")[0] in owned]
        if clash:
            raise StudyError(f"--run-args must not set {', '.join(clash)}: the study sets them")
        # What is computed (every point's fingerprint) against how it is laid out on processes:
        # K virtual ranks per process train the same model as K MPI ranks (tests/
        # test_virtual_ranks.py: to 1e-15 in float64; float32 sums differ in order only, as they
        # do between MPI libraries), so points of either layout are reused by the other and each
        # row records its layout.
        self.run_args = ["--epochs", str(self.epochs), "--model", args.model, *run_args]
        self.launch_args = self.run_args + (["--virtual-ranks", str(k)] if k > 1 else [])
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
            "ranks": args.ranks,
            "processes": f"{self.processes} x {k} virtual ranks" if k > 1 else self.processes,
            "dataset": args.dataset,
            "model": args.model,
            "command": "python -m bench.studies.accuracy " + shlex.join(argv),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "epochs": self.epochs,
            "seeds": ", ".join(map(str, self.seeds)),
            "partition_seeds": (
                "same as the run seed" if args.partition_seed is None else f"fixed at {args.partition_seed}"
            ),
            "run_args": " ".join(self.run_args),
            "target_accuracy": args.target_accuracy,
        }

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[Job]:
        """One job per (partition, seed), restricted to the schemes not done yet.

        Seed-major order: a study cut short still covers every partition (with fewer seeds).
        """
        args, jobs = self.args, []
        for seed in self.seeds:
            for skew in self.skews:
                pseed = seed if args.partition_seed is None else args.partition_seed
                fingerprint = {
                    "ranks": args.ranks,
                    "dataset": args.dataset,
                    "skew": skew,
                    "seed": seed,
                    "partition_seed": pseed,
                    "run_args": self.run_args,
                    "train_subset": args.train_subset,
                }
                job = Job(
                    skew,
                    seed,
                    [],
                    partition_dir(
                        self.data_root, args.dataset, skew, args.ranks, pseed, train_subset=args.train_subset
                    ),
                    self.out / "runs" / f"{spec_tag(skew)}-s{seed}",
                    fingerprint,
                    self.launch_args,
                )
                self.recover(job)
                for norm in self.norms:
                    point = None if args.force else self.store.get(job.point_key(norm), fingerprint)
                    if point is not None:
                        self.rows[(norm, skew, seed)] = (point["record"], pseed)
                    else:
                        job.norms.append(norm)
                if job.norms and not args.report_only:
                    jobs.append(job)
        return jobs

    def recover(self, job: Job) -> None:
        """Store the schemes finished by earlier attempts of ``job`` that were never collected.

        A driver killed with its job (a reboot, a lost session, SIGKILL) leaves the attempt's
        summary.json with the schemes it finished; an attempt made with the same fingerprint
        gives the same points, so they are stored instead of retrained.
        """
        if not job.run_dir.is_dir():
            return
        want = jsonable(job.fingerprint)
        for attempt in sorted(job.run_dir.glob("a*")):
            try:
                asked = json.loads((attempt / "job.json").read_text())
            except (OSError, ValueError):
                continue
            if jsonable(asked.get("fingerprint")) != want:
                continue
            pseed = job.fingerprint["partition_seed"]
            for norm, rec in harvest(attempt).items():
                key = job.point_key(norm)
                if self.store.get(key, job.fingerprint) is None:
                    self.store.put(key, job.fingerprint, {"record": rec, "partition_seed": pseed})

    def collect(self, job: Job, attempt: Path) -> None:
        """Store every scheme the attempt finished (also after a failed or killed job)."""
        pseed = job.fingerprint["partition_seed"]
        for norm, rec in harvest(attempt).items():
            if norm in job.norms:
                self.store.put(job.point_key(norm), job.fingerprint, {"record": rec, "partition_seed": pseed})
                self.rows[(norm, job.partition, job.seed)] = (rec, pseed)

    # ------------------------------------------------------------------ outputs
    def row(self, key: tuple[str, str, int]) -> dict:
        norm, skew, seed = key
        rec, pseed = self.rows[key]
        data_dir = Path(rec.get("data_dir") or "")
        if data_dir not in self.tv_cache:
            try:
                self.tv_cache[data_dir] = label_skew_tv(json.loads((data_dir / "partition.json").read_text()))
            except (OSError, ValueError, KeyError):
                self.tv_cache[data_dir] = math.nan
        return point_row(rec, skew, seed, self.args.ranks, pseed, self.tv_cache[data_dir])

    def report(self) -> list[dict]:
        """Rewrite points.json, accuracy.csv/.md/.png and curves.png from the points done."""
        out, args = self.out, self.args
        ordered = [
            self.row((n, s, sd))
            for s in self.skews
            for sd in self.seeds
            for n in self.norms
            if (n, s, sd) in self.rows
        ]
        machine = next((rec.get("machine") for rec, _ in self.rows.values() if rec.get("machine")), None)
        if machine:
            self.header["machine"] = (
                f"{machine.get('cores_per_node')}-core {machine.get('cpu') or platform.machine()}"
                f", {machine.get('device')}, {str(machine.get('mpi_library')).splitlines()[0][:60]}"
                f", torch {machine.get('torch')}, {machine.get('threads_per_rank')} thread(s)/rank"
            )
        layouts: dict[str, int] = {}
        for r in ordered:
            name = f"{r['processes']} x {r['virtual_ranks']}"
            layouts[name] = layouts.get(name, 0) + 1
        self.header["layouts"] = ", ".join(
            f"{n} points at {k} (processes x ranks each)" for k, n in layouts.items()
        )
        write_json(
            out / "points.json",
            {
                "header": self.header,
                "norms": self.norms,
                "skews": self.skews,
                "seeds": self.seeds,
                "points": ordered,
            },
        )
        write_csv(out / "accuracy.csv", ordered)
        write_text(out / "accuracy.md", markdown(ordered, self.norms, self.skews, self.header))
        if ordered:
            done_seeds = len({r["seed"] for r in ordered})
            title = f"{args.dataset}, {args.ranks} ranks, {self.epochs} epochs, up to {done_seeds} seed(s)"
            bar_plot(out / "accuracy.png", ordered, self.norms, self.skews, title)
            gap_heatmap(
                out / "gap.png", ordered, self.norms, self.skews, f"gap to IID-BN, accuracy points ({title})"
            )
            strong = strongest_skew(ordered, self.skews)
            if strong:
                curve_plot(
                    out / "curves.png",
                    ordered,
                    self.norms,
                    strong,
                    f"test accuracy per epoch at {strong} ({title})",
                )
        return ordered
