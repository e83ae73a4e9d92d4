"""What the tests on the emulated cluster (bench.cluster) share: its CLI and the root check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import in_ci
from tests.mpi_helpers import ROOT, mpi_env


def cluster_cli(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m bench.cluster SUBCOMMAND --name NAME REST`` (the name before any ``--``)."""
    return subprocess.run(
        [sys.executable, "-m", "bench.cluster", args[0], "--name", name, *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=mpi_env(),
    )


def require_root(tests: str) -> None:
    """Network namespaces need root: skip with the reason elsewhere, fail in CI (CI is root)."""
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail(f"CI runs as root, but the {tests} found no root")
        pytest.skip("the emulated cluster needs root (network namespaces)")
