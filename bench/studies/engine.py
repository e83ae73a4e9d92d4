"""Shared sweep utilities: launch MPI jobs, show progress, resume interrupted sweeps.

A sweep is a list of :class:`Point` (one MPI job each). :func:`run_sweep` runs the points whose
result file is missing (or was produced with other settings), writes each result the moment its
job finishes (atomically, ``DIR/points/<key>.json``), and returns every point's result, old and
new. An interrupted sweep rerun with the same settings runs only the missing points.

    store = PointStore(out / "points")
    points = [Point(key=f"n{n}", ranks=n, args=["-m", "disdl_mpi.run", ...],
                    settings={...})]
    results = run_sweep(points, store, collect=lambda point, job: {...}, timeout=600)

The launcher is a template with ``{n}`` (ranks) and optionally ``{python}``: ``--launcher``,
else ``$DISDL_LAUNCHER``, else ``"<venv>/mpiexec -n {n}"``; e.g. ``"srun --mpi=pmi2 -n {n}"``.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from disdl_mpi.files import jsonable, write_json, write_text

LAUNCHER_ENV = "DISDL_LAUNCHER"


class SweepError(RuntimeError):
    """A sweep cannot start (bad launcher, unreadable results folder)."""


def default_launcher() -> str:
    """The venv's mpiexec (next to this Python), else mpiexec on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    exe = str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")
    return f"{shlex.quote(exe)} -n {{n}}"


def launcher_command(template: Optional[str], n: int, args: list[str]) -> list[str]:
    """``template`` (or $DISDL_LAUNCHER, or the default) for ``n`` ranks, then python ARGS."""
    template = template or os.environ.get(LAUNCHER_ENV) or default_launcher()
    if "{n}" not in template:
        raise SweepError(f"launcher template {template!r} has no '{{n}}' for the rank count "
                         f"(e.g. 'mpiexec -n {{n}}' or 'srun --mpi=pmi2 -n {{n}}')")
    try:
        prefix = shlex.split(template.replace("{n}", str(n)).replace("{python}",
                                                                     sys.executable))
    except ValueError as exc:
        raise SweepError(f"launcher template {template!r}: {exc}") from exc
    # A template that names python itself ends with it; otherwise append this interpreter.
    tail = [] if "{python}" in template else [sys.executable]
    return prefix + tail + list(args)


@dataclass
class Point:
    """One job of a sweep: ``key`` names its result file, ``settings`` decide if it is stale."""

    key: str
    ranks: int
    args: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class JobResult:
    returncode: int
    wall_s: float
    timed_out: bool
    log: Path
    command: list[str]

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def run_job(cmd: list[str], *, log: Path, timeout: float, env: Optional[dict] = None,
            cwd: Optional[Path] = None) -> JobResult:
    """Run one job with stdout+stderr to ``log``; kill its whole process group on timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env.update(env or {})
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                    cwd=str(cwd) if cwd else None, start_new_session=True)
        except OSError as exc:
            raise SweepError(f"cannot start {cmd[0]!r}: {exc}") from exc
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.wait()
        except BaseException:  # Ctrl-C: leave no ranks behind
            _kill_group(proc)
            proc.wait()
            raise
    return JobResult(rc, time.perf_counter() - start, timed_out, log, cmd)


def _kill_group(proc: subprocess.Popen) -> None:
    """TERM the job's own process group (the launcher and its ranks), KILL after 5 s."""
    import signal
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class PointStore:
    """``DIR/<key>.json`` per finished point, each written atomically."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def load(self, key: str) -> Optional[dict]:
        try:
            return json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # a damaged result is redone, never trusted

    def is_done(self, point: Point) -> bool:
        rec = self.load(point.key)
        return rec is not None and rec.get("settings") == jsonable(point.settings)

    def save(self, point: Point, result: dict) -> None:
        write_json(self.path(point.key), {"key": point.key, "ranks": point.ranks,
                                          "settings": jsonable(point.settings), **result})

    def all(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]


class Progress:
    """A bar on a TTY; plain, timestamped lines otherwise (logs, CI)."""

    def __init__(self, total: int, *, stream=None, tty: Optional[bool] = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = time.monotonic()

    def _line(self, msg: str) -> None:
        self.stream.write(msg + "\n")
        self.stream.flush()

    def starting(self, label: str) -> None:
        if self.tty:
            width = 24
            filled = int(width * self.done / max(1, self.total))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total} running {label:<40}")
            self.stream.flush()
        else:
            self._line(f"[{time.strftime('%H:%M:%S')}] {self.done + 1}/{self.total} "
                       f"start {label}")

    def finished(self, label: str, status: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        msg = f"{self.done}/{self.total} {label}: {status} ({elapsed:.0f} s elapsed)"
        if self.tty:
            self.stream.write("\r" + " " * 80 + "\r")
        self._line(msg if self.tty else f"[{time.strftime('%H:%M:%S')}] {msg}")


def _terminate_on_sigterm() -> None:
    """SIGTERM (scancel, kill) unwinds like Ctrl-C, so run_job kills the running job's ranks."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    # Background launches (cmd &) start with SIGINT ignored; restore Ctrl-C semantics.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_sweep(points: list[Point], store: PointStore,
              collect: Callable[[Point, JobResult], dict], *,
              launcher: Optional[str] = None, timeout: float = 1800,
              log_dir: Optional[Path] = None, progress: Optional[Progress] = None,
              say: Callable[[str], None] = print) -> list[dict]:
    """Run every point not already in ``store``; return all points' stored results in order.

    ``collect(point, job)`` turns a finished job into its result dict (read its output files);
    it may raise to mark the point failed. A failed or timed-out point is not stored (so the
    next run retries it; its log tail goes to ``logs/<key>.failed``); the sweep goes on.
    """
    _terminate_on_sigterm()
    todo = [p for p in points if not store.is_done(p)]
    done = len(points) - len(todo)
    if done:
        say(f"resuming: {done} of {len(points)} point(s) already done, {len(todo)} to run")
    progress = progress or Progress(len(todo))
    log_dir = log_dir or store.dir.parent / "logs"
    for point in todo:
        cmd = launcher_command(launcher, point.ranks, point.args)
        progress.starting(point.key)
        job = run_job(cmd, log=log_dir / f"{point.key}.log", timeout=timeout, env=point.env)
        if job.timed_out or job.returncode != 0:
            why = (f"timed out after {timeout:.0f} s" if job.timed_out
                   else f"exit code {job.returncode}")
            progress.finished(point.key, f"FAILED ({why}); log {job.log}")
            write_text(log_dir / f"{point.key}.failed", why + "\n" + job.tail())
            continue
        try:
            result = collect(point, job)
        except Exception as exc:  # e.g. the job wrote no summary
            progress.finished(point.key, f"FAILED reading results: {exc}")
            continue
        result.setdefault("status", "ok")
        result.setdefault("job_wall_s", job.wall_s)
        store.save(point, result)
        progress.finished(point.key, f"ok in {job.wall_s:.1f} s")
    out = []
    for p in points:
        rec = store.load(p.key)
        if rec is not None and rec.get("settings") == jsonable(p.settings):
            out.append(rec)
    return out
