"""Multi-rank exactness of the communicating schemes, under a real mpiexec."""

from __future__ import annotations

import pytest

from tests.mpi_helpers import run_mpi


def _run(n: int, module: str, timeout: float = 150):
    proc = run_mpi(n, ["-m", "mpi4py", "-m", module], timeout=timeout)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.mpi
@pytest.mark.timeout(200)
@pytest.mark.parametrize("n", [2, 4])
def test_syncbn_equals_batch_norm_on_concatenated_batch(n):
    proc = _run(n, "tests.mpi_programs.syncbn_check")
    assert f"syncbn exact on {n} ranks" in proc.stdout
    assert proc.stdout.count("exact on") == 1  # only rank 0 prints


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_bn_recal_gives_global_statistics_with_unequal_and_empty_ranks():
    proc = _run(3, "tests.mpi_programs.recal_check", timeout=100)
    assert "bn-recal global statistics OK on 3 ranks, sizes [13, 0, 29]" in proc.stdout


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_bn_carry_and_bn_fix_give_global_statistics_across_ranks():
    proc = _run(3, "tests.mpi_programs.carry_fix_check", timeout=100)
    assert "bn-carry and bn-fix global statistics OK on 3 ranks, sizes [5, 0, 9]" in proc.stdout
