"""One accuracy-study job: an MPI launch of ``disdl_mpi.run`` for one (partition, seed).

A job trains every still-missing scheme of its (partition, seed) in one launch, so the MPI and
torch start-up is paid once per job, not once per scheme. Each launch gets its own attempt
folder ``runs/<tag>/a<k>/`` holding ``job.json`` (what was asked), ``log.txt`` (the job's
output) and the run's own ``summary.json``, which the run rewrites after every finished scheme.
When a job ends, however it ends, its finished schemes become points of the study's
:class:`~bench.studies.engine.PointStore`, one per (scheme, partition, seed).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from bench.studies.engine import JobResult, code_version, launcher_command, run_job
from disdl_mpi.data.layout import spec_tag
from disdl_mpi.files import write_json

# The run prints one such line per scheme and epoch under ``--progress lines``; it only drives
# the progress display, so an unmatched format costs nothing but finer progress.
EPOCH_LINE = re.compile(r"^\s*(?P<norm>[\w.-]+) epoch\s+(?P<epoch>\d+)/(?P<total>\d+)\b")


@dataclass
class Job:
    """One launch: the schemes still missing for one (partition, seed) point of the study."""

    partition: str
    seed: int
    norms: list[str]
    data_dir: Path
    run_dir: Path  # runs/<tag>/ ; attempts live below it
    fingerprint: dict  # everything that must match for results to be reused
    run_args: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return f"{spec_tag(self.partition)}-s{self.seed}"

    def point_key(self, norm: str) -> str:
        return f"{norm}@{self.tag}"


def next_attempt(run_dir: Path) -> Path:
    """A fresh ``a<k>`` folder under ``run_dir`` (earlier attempts are kept, with their logs)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[1:]) for p in run_dir.glob("a*") if p.name[1:].isdigit()]
    attempt = run_dir / f"a{max(taken, default=-1) + 1}"
    attempt.mkdir()
    return attempt


def launch(
    job: Job,
    attempt: Path,
    ranks: int,
    launcher: Optional[str],
    timeout: float,
    on_epoch: Callable[[str, int, int], None] = lambda norm, e, total: None,
) -> JobResult:
    """Run one job in its ``attempt`` folder to completion or until ``timeout`` seconds."""
    cmd = launcher_command(
        launcher,
        ranks,
        [
            "-m",
            "disdl_mpi.run",
            "--data-dir",
            str(job.data_dir),
            "--norm",
            ",".join(job.norms),
            "--seed",
            str(job.seed),
            "--out",
            str(attempt),
            "--progress",
            "lines",
            *job.run_args,
        ],
    )
    write_json(
        attempt / "job.json",
        {
            "fingerprint": job.fingerprint,
            "norms": job.norms,
            "command": cmd,
            "started": time.time(),
            "code": code_version(),
        },
    )

    def on_line(line: str) -> None:
        m = EPOCH_LINE.match(line)
        if m:
            on_epoch(m["norm"], int(m["epoch"]), int(m["total"]))

    return run_job(cmd, log=attempt / "log.txt", timeout=timeout, on_line=on_line)


def harvest(attempt: Path) -> dict[str, dict]:
    """The finished scheme records of one attempt (its summary.json), by scheme name."""
    try:
        summary = json.loads((attempt / "summary.json").read_text())
    except (OSError, ValueError):
        return {}  # an attempt that never finished a scheme
    return {
        rec["norm"]: dict(rec, attempt=str(attempt), machine=summary.get("machine"))
        for rec in summary.get("runs", [])
    }
