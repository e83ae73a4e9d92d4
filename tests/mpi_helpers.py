"""Launch real mpiexec jobs from tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mpiexec() -> str:
    """The mpiexec next to the running Python (the venv's MPICH wheel), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec found; install the 'mpich' extra")
    return found


def mpi_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run_mpi(n: int, args: list[str], *, timeout: float = 120, env: dict | None = None,
            cwd: str | Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n N python ARGS`` with a hard timeout; raises on timeout (a hang)."""
    cmd = [mpiexec(), "-n", str(n), sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=mpi_env(env), cwd=str(cwd or ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed rc={proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc
