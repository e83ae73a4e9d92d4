"""Suite-wide pytest setup: shared fixtures only (markers live in setup.cfg)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

if TYPE_CHECKING:
    from tests.slurm_cluster import SlurmCluster


def in_ci() -> bool:
    """CI=true (GitHub Actions, GitLab, ...): infrastructure tests must run, never skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator["SlurmCluster"]:
    """A private one-node SLURM (munge + slurmctld + slurmd) for the whole session.

    Skips with the reason when this machine can't run one (not root, no apt), except in CI,
    where that is a failure.
    """
    from tests.slurm_cluster import SlurmCluster, start_cluster  # noqa: F401
    from tests.slurm_daemons import SlurmUnavailable

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


@pytest.fixture(scope="session")
def digits_partition(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``digits_partition(ranks, spec="dirichlet:0.1", seed=0, min_per_rank=1)``: a digits
    partition built once per session (data_prep's naming rule, so every distinct request gets
    its own folder). Shared between tests: read it, never modify it (copy it first)."""
    from data_prep.ensure import ensure_partition
    from disdl_mpi.data.layout import partition_dir

    root = tmp_path_factory.mktemp("digits")

    def get(ranks: int, spec: str = "dirichlet:0.1", seed: int = 0, min_per_rank: int = 1) -> Path:
        d = partition_dir(root, "digits", spec, ranks, seed)
        d = d.with_name(d.name + (f"-m{min_per_rank}" if min_per_rank != 1 else ""))
        ensure_partition(d, "digits", ranks, spec, seed, min_per_rank=min_per_rank)
        return d

    return get


@pytest.fixture(scope="session")
def parts(digits_partition):
    """n2: the default digits partition at 2 ranks; n3e: 3 ranks of sizes [1437, 1, 0], a
    one-sample rank and an empty rank."""
    n3e = digits_partition(3, "quantity:0.1", 10, min_per_rank=0)
    sizes = json.loads((n3e / "partition.json").read_text())["sizes"]
    assert sorted(sizes) == [0, 1, 1437]
    return {"n2": digits_partition(2), "n3e": n3e}
