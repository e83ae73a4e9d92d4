"""One accuracy-study job: an MPI launch of ``disdl_mpi.run`` for one (skew, seed).

A job trains every still-missing scheme of its (skew, seed) point in one launch, so the MPI and
torch start-up is paid once per job, not once per scheme. Each launch gets its own attempt
folder ``runs/<tag>/a<k>/`` holding ``job.json`` (what was asked), ``log.txt`` (the job's
output) and the run's own ``summary.json``, which the run rewrites after every finished scheme:
an interrupted job therefore still leaves its finished schemes behind, and a rerun harvests them.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench.studies.engine import LAUNCHER_ENV, SweepError, launcher_command
from bench.studies.engine import default_launcher as sweep_default_launcher
from disdl_mpi.files import write_json

ROOT = Path(__file__).resolve().parent.parent

# The run prints one such line per scheme and epoch under ``--progress lines``; it only drives
# the progress display, so an unmatched format costs nothing but finer progress.
EPOCH_LINE = re.compile(r"^\s*(?P<norm>[\w.-]+) epoch\s+(?P<epoch>\d+)/(?P<total>\d+)\b")


class StudyError(RuntimeError):
    """A problem with the study's inputs or its folder, reported without a traceback."""


def default_launcher() -> str:
    """``$DISDL_LAUNCHER`` if set, else the mpiexec beside this Python (the venv's MPICH)."""
    return os.environ.get(LAUNCHER_ENV, "").strip() or sweep_default_launcher()


def launcher_argv(template: str, n: int, args: Sequence[str] = ()) -> list[str]:
    """The template for ``n`` ranks, then this Python and ``args`` (bench.studies.engine's convention:
    ``{n}`` is the rank count, an optional ``{python}`` places the interpreter)."""
    try:
        return launcher_command(template, n, list(args))
    except SweepError as exc:
        raise StudyError(str(exc)) from None


def skew_tag(skew: str) -> str:
    """A file-name-safe spelling of a partition spec: ``dirichlet:0.1`` -> ``dirichlet-0.1``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", skew).strip("-")


@dataclass
class Job:
    """One launch: the schemes still missing for one (skew, seed) point of the study."""

    skew: str
    seed: int
    norms: list[str]
    data_dir: Path
    run_dir: Path                   # runs/<tag>/ ; attempts live below it
    fingerprint: dict               # everything that must match for results to be reused
    run_args: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return f"{skew_tag(self.skew)}-s{self.seed}"


@dataclass
class JobOutcome:
    ok: bool
    attempt: Path
    wall_s: float
    returncode: Optional[int]
    message: str = ""


def code_version() -> Optional[str]:
    """The checkout's commit (+ "-dirty" with local changes), so every result names the code
    that produced it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def next_attempt(run_dir: Path) -> Path:
    """A fresh ``a<k>`` folder under ``run_dir`` (earlier attempts are kept for harvesting)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[1:]) for p in run_dir.glob("a*") if p.name[1:].isdigit()]
    attempt = run_dir / f"a{max(taken, default=-1) + 1}"
    attempt.mkdir()
    return attempt


def run_command(job: Job, attempt: Path, ranks: int, launcher: str) -> list[str]:
    """The full command line of a job: launcher prefix, then the run with its options."""
    return launcher_argv(launcher, ranks, [
            "-m", "disdl_mpi.run", "--data-dir", str(job.data_dir), "--norm", ",".join(job.norms),
            "--seed", str(job.seed), "--out", str(attempt), "--progress", "lines",
            *job.run_args])


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the launcher and every rank it started (they share the new session's group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def launch(job: Job, ranks: int, launcher: str, timeout: float,
           on_epoch: Callable[[str, int, int], None] = lambda norm, e, total: None
           ) -> JobOutcome:
    """Run one job to completion or until ``timeout`` seconds; never hangs past the timeout."""
    attempt = next_attempt(job.run_dir)
    cmd = run_command(job, attempt, ranks, launcher)
    write_json(attempt / "job.json", {"fingerprint": job.fingerprint, "norms": job.norms,
                                      "command": cmd, "started": time.time(),
                                      "code": code_version()})
    env = dict(os.environ)
    # The run must import this checkout even when the package is not installed.
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=str(ROOT), start_new_session=True, bufsize=1)
    except OSError as exc:
        raise StudyError(f"cannot start the launcher {cmd[0]!r}: {exc.strerror or exc}; "
                         f"set --launcher or DISDL_LAUNCHER") from None
    timed_out = [False]

    def watchdog() -> None:
        timed_out[0] = True
        _kill_group(proc)

    import threading
    timer = threading.Timer(timeout, watchdog)
    timer.daemon = True
    timer.start()
    tail: list[str] = []
    try:
        with open(attempt / "log.txt", "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail = (tail + [line.rstrip("\n")])[-40:]
                m = EPOCH_LINE.match(line)
                if m:
                    on_epoch(m["norm"], int(m["epoch"]), int(m["total"]))
        rc = proc.wait()
    except BaseException:
        _kill_group(proc)  # Ctrl-C or an error here must not leave ranks running
        raise
    finally:
        timer.cancel()
    wall = time.monotonic() - start
    if timed_out[0]:
        return JobOutcome(False, attempt, wall, rc,
                          f"timed out after {timeout:.0f} s (--timeout); log: {attempt/'log.txt'}")
    if rc != 0:
        shown = "\n    ".join(tail[-12:])
        return JobOutcome(False, attempt, wall, rc,
                          f"exit code {rc}; log: {attempt / 'log.txt'}; last lines:\n    {shown}")
    return JobOutcome(True, attempt, wall, rc)


def harvest(run_dir: Path, fingerprint: dict) -> dict[str, dict]:
    """Every finished scheme record under ``run_dir`` whose attempt matches ``fingerprint``.

    Later attempts win over earlier ones for the same scheme (they are reruns with --force).
    """
    found: dict[str, dict] = {}
    attempts = sorted((p for p in run_dir.glob("a*") if p.name[1:].isdigit()),
                      key=lambda p: int(p.name[1:]))
    for attempt in attempts:
        try:
            meta = json.loads((attempt / "job.json").read_text())
            summary = json.loads((attempt / "summary.json").read_text())
        except (OSError, ValueError):
            continue  # an attempt that never finished a scheme
        if meta.get("fingerprint") != fingerprint:
            continue
        for rec in summary.get("runs", []):
            found[rec["norm"]] = dict(rec, attempt=str(attempt), machine=summary.get("machine"))
    return found
