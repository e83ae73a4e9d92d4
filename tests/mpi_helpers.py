"""Launching real MPI jobs from tests: the studies' own launcher lookup, a hard timeout, and
background jobs whose ranks a test can signal, kill and check for survivors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.studies.engine import ROOT, job_env, launcher_command

# The run with fault injection from the environment (tests/mpi_programs/fault_driver.py).
FAULT_DRIVER = "tests.mpi_programs.fault_driver"


def mpi_command(n: int, args: list[str]) -> list[str]:
    """``mpiexec -n N python ARGS`` through the one launcher lookup ($DISDL_LAUNCHER, which
    ``make test MPI=openmpi`` sets, else the venv's mpiexec)."""
    return launcher_command(None, n, args)


def mpi_env(extra: dict | None = None) -> dict:
    env = job_env(extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_bench(program: str, args: str, out: Path, *, n: int = 2, timeout: float = 180, **kw: Any):
    """``mpiexec -n N python -m PROGRAM ARGS --json OUT``: a benchmark run, ARGS as typed."""
    return run_mpi(n, ["-m", program, *args.split(), "--json", str(out)], timeout=timeout, **kw)


def run_job(data: Path, options: str, out: Path, *, n: int = 2, timeout: float = 120, **kw: Any):
    """``mpiexec -n N python -m disdl_mpi.run --data-dir DATA OPTIONS --out OUT``, OPTIONS as typed."""
    args = ["-m", "disdl_mpi.run", "--data-dir", str(data), *options.split(), "--out", str(out)]
    return run_mpi(n, args, timeout=timeout, **kw)


def trained_record(data: Path, options: str, out: Path, *, timeout: float = 180) -> dict:
    """``run_job`` of one scheme that must succeed; its record in summary.json."""
    run_job(data, options, out, timeout=timeout, check=True)
    (rec,) = json.loads((out / "summary.json").read_text())["runs"]
    return rec


def run_mpi(
    n: int,
    args: list[str],
    *,
    timeout: float = 120,
    env: dict | None = None,
    cwd: str | Path | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n N python ARGS`` with a hard timeout; raises on timeout (a hang).

    The job gets its own session, so it never draws progress bars on the terminal that runs
    pytest (the ranks have no controlling terminal, as in a batch job).
    """
    cmd = mpi_command(n, args)
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=mpi_env(env),
        cwd=str(cwd or ROOT),
        start_new_session=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed rc={proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


class Job:
    """``mpiexec -n N python driver.py ARGS`` in its own session, with fault env vars."""

    def __init__(self, n: int, args: list[str], workdir: Path, env: dict | None = None):
        self.pid_dir = workdir / "pids"
        self.progress = workdir / "progress"
        extra = {"FAULT_PIDS": str(self.pid_dir), "FAULT_PROGRESS": str(self.progress)}
        extra.update(env or {})
        self.n = n
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            mpi_command(n, ["-m", FAULT_DRIVER, *args]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=mpi_env(extra),
            cwd=str(ROOT),
            start_new_session=True,
        )

    def rank_pids(self, timeout: float = 60) -> list[int]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            files = [self.pid_dir / f"rank{r}.pid" for r in range(self.n)]
            if all(f.exists() and f.read_text() for f in files):
                return [int(f.read_text()) for f in files]
            self._fail_if_exited("before writing pids")
            time.sleep(0.05)
        raise AssertionError("ranks did not start in time")

    def wait_for_step(self, scheme: str, step: int, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                name, at = self.progress.read_text().split()
                if name == scheme and int(at) >= step:
                    return
            except (OSError, ValueError):
                pass
            self._fail_if_exited(f"before {scheme} step {step}")
            time.sleep(0.02)
        raise AssertionError(f"job never reached {scheme} step {step}")

    def signal_at_step(
        self, scheme: str, step: int, ranks: list[int], sig: int, timeout: float
    ) -> tuple[int, str, str, float, list[int]]:
        """Send ``sig`` to ``ranks`` once ``scheme`` reached ``step``, then wait for the end.

        Returns (rc, stdout, stderr, seconds from the signal to the exit, every rank's pid);
        a job still running when this returns or raises is killed.
        """
        try:
            pids = self.rank_pids()
            self.wait_for_step(scheme, step)
            for r in ranks:
                os.kill(pids[r], sig)
            t0 = time.monotonic()
            rc, out, err = self.wait(timeout=timeout)
            return rc, out, err, time.monotonic() - t0, pids
        finally:
            if self.proc.poll() is None:
                self.kill()

    def _fail_if_exited(self, what: str) -> None:
        if self.proc.poll() is not None:
            out, err = self.proc.communicate()
            raise AssertionError(f"job exited rc={self.proc.returncode} {what}\n{out}\n{err}")

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job still running after {timeout}s (a hang)") from None
        return self.proc.returncode, out, err

    def kill(self) -> None:
        """Clean-up of a failed test: the launcher's session, then any rank left."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.known_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.communicate()

    def known_pids(self) -> list[int]:
        return [int(f.read_text()) for f in self.pid_dir.glob("rank*.pid") if f.read_text()]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
