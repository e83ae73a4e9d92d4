"""Suite-wide pytest setup: shared fixtures only (markers live in setup.cfg)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # so tests (and the modules they import) find the in-tree packages without an install
    sys.path.insert(0, str(ROOT))


def in_ci() -> bool:
    """CI=true (GitHub Actions, GitLab, ...): infrastructure tests must run, never skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator["SlurmCluster"]:
    """A private one-node SLURM (munge + slurmctld + slurmd) for the whole session.

    Skips with the reason when this machine can't run one (not root, no apt), except in CI,
    where that is a failure.
    """
    from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster  # noqa: F401

    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI=true but a private SLURM cannot run here: {exc}")
        pytest.skip(f"private SLURM unavailable: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
