"""Errors always reach the terminal: each error exit, repeated 20 times beside two CPU hogs.

Hydra ends every other rank the moment one exits and can drop a rank's stderr that its proxy
has not read yet, so an exit path without a pause lost its message in about one run in twenty
on this machine. Every error exit goes through ``disdl_mpi.comm.world.leave_job``; these tests
catch a path that does not, or a pause that is too short.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpi_helpers import run_mpi

# 20 launches each, a few seconds apiece on a quiet machine, much longer on a loaded one
pytestmark = [pytest.mark.mpi, pytest.mark.faults, pytest.mark.repeat, pytest.mark.timeout(1200)]

REPEATS = 20


@pytest.fixture
def two_cpu_hogs():
    """Two busy processes for the test's duration: the load under which the race showed."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for h in hogs:
        h.kill()
        h.wait()


def _repeat(args: list[str], tmp_path: Path, env: dict | None = None) -> list[tuple[int, str]]:
    """(returncode, stderr) of REPEATS runs of ``mpiexec -n 2 python ARGS --out ...``."""
    seen = []
    for i in range(REPEATS):
        out = tmp_path / f"out{i}"
        proc = run_mpi(2, [*args, "--out", str(out)], timeout=120, env=env)
        seen.append((proc.returncode, proc.stderr + proc.stdout))
        shutil.rmtree(out, ignore_errors=True)
    return seen


def test_an_unreadable_rank_file_is_reported_with_rc_2_every_time(parts, tmp_path, two_cpu_hogs):
    bad = tmp_path / "bad"
    shutil.copytree(parts["n2"], bad)
    (bad / "rank_00001.h5").write_text("this is not an HDF5 file\n")
    args = ["-m", "disdl_mpi.run", "--data-dir", str(bad), "--norm", "bn", "--steps", "2"]
    runs = _repeat(args, tmp_path)
    failed = [
        (i, rc, text[-600:])
        for i, (rc, text) in enumerate(runs)
        if rc != 2 or "rank_00001.h5" not in text or "rank 1" not in text
    ]
    assert not failed, f"{len(failed)} of {REPEATS} runs lost the message or the code: {failed[:3]}"


def test_an_uncaught_exception_on_one_rank_is_reported_every_time(parts, tmp_path, two_cpu_hogs):
    """Rank 1 raises in its first loss while rank 0 waits in the step's allreduce: the traceback,
    naming the rank and its node, and exit code 1 (the exception's), every time."""
    args = ["-m", "tests.mpi_programs.crash_on_rank1", "--data-dir", str(parts["n2"]), "--norm", "bn"]
    runs = _repeat(args + ["--steps", "4"], tmp_path)
    failed = [
        (i, rc, text[-600:])
        for i, (rc, text) in enumerate(runs)
        if rc != 1 or "RuntimeError: injected failure on rank 1" not in text or "[rank 1 on " not in text
    ]
    assert not failed, f"{len(failed)} of {REPEATS} runs lost the message or the code: {failed[:3]}"
