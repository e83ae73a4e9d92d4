"""The one engine that studies launch MPI jobs with: launcher, job runner, resume store.

A sweep is a list of :class:`Point` (one MPI job each). :func:`run_sweep` runs the points whose
result is missing from the :class:`PointStore` (or was produced with other settings), stores
each result the moment its job finishes (atomically, ``DIR/points/<key>.json``) and returns
every point's result, old and new. An interrupted sweep rerun with the same settings runs only
the missing points.

    store = PointStore(out / "points")
    points = [Point(key=f"n{n}", ranks=n, args=["-m", "disdl_mpi.run", ...],
                    settings={...})]
    results = run_sweep(points, store, collect=lambda point, job: {...}, timeout=600)

The launcher is a template with ``{n}`` (ranks) and optionally ``{python}``: ``--launcher``,
else ``$DISDL_LAUNCHER``, else ``"<venv>/mpiexec -n {n}"``; e.g. ``"srun --mpi=pmi2 -n {n}"``,
or ``cluster`` / ``cluster:NAME`` for the emulated cluster of ``python -m bench.cluster``.
Studies whose jobs produce several points (the accuracy study) call :func:`run_job` and the
store themselves; the tests launch their jobs through :func:`launcher_command` too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from disdl_mpi.files import jsonable, write_json, write_text
from disdl_mpi.observe.progress import Progress

LAUNCHER_ENV = "DISDL_LAUNCHER"
ROOT = Path(__file__).resolve().parents[2]  # the checkout the jobs must import


class SweepError(RuntimeError):
    """A sweep cannot start (bad launcher, unreadable results folder)."""


def default_launcher() -> str:
    """The venv's mpiexec (next to this Python), else mpiexec on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    exe = str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")
    return f"{shlex.quote(exe)} -n {{n}}"


def named_launcher(template: str) -> str:
    """``cluster`` or ``cluster:NAME``: the emulated cluster (bench.cluster) as a launcher."""
    if template == "cluster" or template.startswith("cluster:"):
        name = template.partition(":")[2] or "disdl"
        return f"{{python}} -m bench.cluster exec --name {shlex.quote(name)} -n {{n}} -- {{python}}"
    return template


def add_launch_options(p: argparse.ArgumentParser, *, run_args: bool = True) -> None:
    """``--launcher`` (and ``--run-args``), spelled and documented once for every study."""
    p.add_argument(
        "--launcher",
        default=None,
        help="launch template with {n} (and optionally {python}); default "
        f"${LAUNCHER_ENV} or the venv's 'mpiexec -n {{n}}' (SLURM: "
        "'srun --mpi=pmi2 -n {n}'; the emulated cluster: 'cluster')",
    )
    if run_args:
        p.add_argument(
            "--run-args",
            default="",
            help="extra options for disdl_mpi.run, one quoted string (e.g. '--lr 0.1')",
        )


def launcher_command(template: Optional[str], n: int, args: list[str]) -> list[str]:
    """``template`` (or $DISDL_LAUNCHER, or the default) for ``n`` ranks, then python ARGS."""
    template = named_launcher(template or os.environ.get(LAUNCHER_ENV, "").strip() or default_launcher())
    if "{n}" not in template:
        raise SweepError(
            f"launcher template {template!r} has no '{{n}}' for the rank count "
            f"(e.g. 'mpiexec -n {{n}}' or 'srun --mpi=pmi2 -n {{n}}')"
        )
    try:
        prefix = shlex.split(template.replace("{n}", str(n)).replace("{python}", sys.executable))
    except ValueError as exc:
        raise SweepError(f"launcher template {template!r}: {exc}") from exc
    # A template that names python itself ends with it; otherwise append this interpreter.
    tail = [] if "{python}" in template else [sys.executable]
    return prefix + tail + list(args)


def job_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of a launched job: this checkout importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def code_version() -> Optional[str]:
    """The checkout's commit (+ "-dirty" with local changes), so every result names the code
    that produced it; None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


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

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def why(self, timeout: float) -> str:
        return f"timed out after {timeout:.0f} s" if self.timed_out else f"exit code {self.returncode}"


def run_job(
    cmd: list[str],
    *,
    log: Path,
    timeout: float,
    env: Optional[dict] = None,
    cwd: Optional[Path] = None,
    on_line: Optional[Callable[[str], None]] = None,
) -> JobResult:
    """Run one job with its output in ``log``; never waits past ``timeout``.

    The job gets its own process group: on timeout, Ctrl-C or SIGTERM the launcher and every
    rank it started are stopped (TERM, then KILL). ``on_line`` sees each output line as it
    comes (progress displays parse epoch lines from it).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                env=job_env(env),
                cwd=str(cwd) if cwd else None,
                start_new_session=True,
            )
        except OSError as exc:
            raise SweepError(
                f"cannot start the launcher {cmd[0]!r}: {exc.strerror or exc}; "
                f"set --launcher or {LAUNCHER_ENV}"
            ) from None
        timed_out = threading.Event()

        def watchdog() -> None:
            timed_out.set()
            _kill_group(proc)

        timer = threading.Timer(timeout, watchdog)
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                if on_line is not None:
                    on_line(line)
            rc = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: leave no ranks behind
            _kill_group(proc)
            raise
        finally:
            timer.cancel()
    return JobResult(rc, time.perf_counter() - start, timed_out.is_set(), log, cmd)


def _kill_group(proc: subprocess.Popen) -> None:
    """TERM the job's own process group (the launcher and its ranks), KILL after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5.0)
            return
        except subprocess.TimeoutExpired:
            continue


class PointStore:
    """``DIR/<key>.json`` per finished point, each written atomically with its settings."""

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

    def get(self, key: str, settings: dict[str, Any]) -> Optional[dict]:
        """The stored result of ``key`` if it was made with ``settings``, else None."""
        rec = self.load(key)
        return rec if rec is not None and rec.get("settings") == jsonable(settings) else None

    def is_done(self, point: Point) -> bool:
        return self.get(point.key, point.settings) is not None

    def put(self, key: str, settings: dict[str, Any], result: dict, **meta: Any) -> None:
        write_json(self.path(key), {"key": key, **meta, "settings": jsonable(settings), **result})

    def save(self, point: Point, result: dict) -> None:
        self.put(point.key, point.settings, result, ranks=point.ranks)


def terminate_on_sigterm() -> None:
    """SIGTERM (scancel, kill) unwinds like Ctrl-C, so run_job kills the running job's ranks."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    # Background launches (cmd &) start with SIGINT ignored; restore Ctrl-C semantics.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_sweep(
    points: list[Point],
    store: PointStore,
    collect: Callable[[Point, JobResult], dict],
    *,
    launcher: Optional[str] = None,
    timeout: float = 1800,
    log_dir: Optional[Path] = None,
    progress: Optional[Progress] = None,
    say: Callable[[str], None] = print,
) -> list[dict]:
    """Run every point not already in ``store``; return all points' stored results in order.

    ``collect(point, job)`` turns a finished job into its result dict (read its output files);
    it may raise to mark the point failed. A failed or timed-out point is not stored (so the
    next run retries it; its log tail goes to ``logs/<key>.failed``); the sweep goes on.
    """
    terminate_on_sigterm()
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
        if not job.ok:
            progress.finished(point.key, f"FAILED ({job.why(timeout)}); log {job.log}")
            write_text(log_dir / f"{point.key}.failed", job.why(timeout) + "\n" + job.tail())
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
    progress.close()
    return [rec for p in points if (rec := store.get(p.key, p.settings)) is not None]
