"""--virtual-ranks K: P processes x K virtual ranks train exactly what P x K MPI ranks train.

The partition (digits, 8 ranks, dirichlet:0.3+quantity:0.3, seed 2) has uneven sizes
[35, 1, 435, 4, 5, 892, 54, 12], label skew, and a rank with a single sample (rank 1, which has
an empty batch from the second step on). The comparison runs in float64
(tests/mpi_programs/run_float64.py says why: in float32 the reordered sums alone move this
partition's models by up to 1e-3).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from disdl_mpi.norms import available_schemes
from tests.mpi_helpers import FAULT_DRIVER, run_mpi

pytestmark = [pytest.mark.mpi]

SPEC, SEED, SIZES = "dirichlet:0.3+quantity:0.3", 2, [35, 1, 435, 4, 5, 892, 54, 12]
FLOAT64 = "tests.mpi_programs.run_float64"
TRAIN = ["--norm", "all", "--steps", "20", "--save-model", "--progress", "none"]


@pytest.fixture(scope="module")
def skewed(digits_partition) -> Path:
    data = digits_partition(8, SPEC, SEED)
    assert json.loads((data / "partition.json").read_text())["sizes"] == SIZES
    return data


@pytest.fixture(scope="module")
def pair(skewed, tmp_path_factory) -> tuple[Path, Path]:
    """Every scheme, 20 steps: 8 MPI ranks, and 2 processes x 4 virtual ranks."""
    root = tmp_path_factory.mktemp("virtual")
    mpi, virtual = root / "mpi", root / "virtual"
    common = ["-m", FLOAT64, "--data-dir", str(skewed), *TRAIN]
    run_mpi(8, [*common, "--out", str(mpi)], timeout=600, check=True)
    run_mpi(2, [*common, "--virtual-ranks", "4", "--out", str(virtual)], timeout=600, check=True)
    return mpi, virtual


def _runs(out: Path) -> dict[str, dict]:
    return {r["norm"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}


def _assert_close(a: Path, b: Path, rel: float = 1e-5) -> None:
    x, y = torch.load(a), torch.load(b)
    assert x.keys() == y.keys(), f"{a}: state_dict keys differ"
    for k, v in x.items():
        if not v.is_floating_point():
            assert torch.equal(v, y[k]), f"{a}: {k}"
            continue
        scale = float(v.abs().max()) if v.numel() else 0.0
        diff = float((v - y[k]).abs().max()) if v.numel() else 0.0
        assert diff <= rel * scale + 1e-12, f"{a}: {k} differs by {diff:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("norm", available_schemes())
def test_two_processes_of_four_virtual_ranks_equal_eight_mpi_ranks(pair, norm):
    mpi, virtual = pair
    files = sorted(p.name for p in (mpi / norm).glob("model*.pt"))
    assert files == sorted(p.name for p in (virtual / norm).glob("model*.pt"))
    if norm == "fedbn":  # every rank's own model
        assert files == ["model.pt"] + [f"model_rank{r:05d}.pt" for r in range(8)]
    for name in files:
        _assert_close(mpi / norm / name, virtual / norm / name)
    a, b = _runs(mpi)[norm], _runs(virtual)[norm]
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["per_rank_accuracy"] == b["per_rank_accuracy"]
    assert a["steps"] == b["steps"] == 20
    losses = [e["train_loss"] for e in a["epochs_log"]], [e["train_loss"] for e in b["epochs_log"]]
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)
    assert (a["world_size"], a["processes"], a["virtual_ranks"]) == (8, 8, 1)
    assert (b["world_size"], b["processes"], b["virtual_ranks"]) == (8, 2, 4)


def test_virtual_ranks_one_is_todays_run_bit_for_bit(parts, tmp_path):
    args = ["-m", "disdl_mpi.run", "--data-dir", str(parts["n2"]), "--norm", "bn-carry,fedbn"]
    args += ["--steps", "6", "--save-model", "--progress", "none"]
    run_mpi(2, [*args, "--out", str(tmp_path / "a")], timeout=240, check=True)
    run_mpi(2, [*args, "--virtual-ranks", "1", "--out", str(tmp_path / "b")], timeout=240, check=True)
    for f in ("bn-carry/model.pt", "fedbn/model_rank00001.pt"):
        x, y = torch.load(tmp_path / "a" / f), torch.load(tmp_path / "b" / f)
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].numpy().tobytes() == y[k].numpy().tobytes(), f"{f}: {k}"


def test_checkpoint_and_resume_within_a_virtual_run_are_bitwise(skewed, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["-m", "disdl_mpi.run", "--data-dir", str(skewed), "--virtual-ranks", "4"]
    args += ["--norm", "fedbn,bn-carry", "--steps", "14", "--save-model", "--progress", "none"]
    run_mpi(2, [*args, "--checkpoint-every", "5", "--out", str(ref)], timeout=300, check=True)
    shutil.copytree(ref / "checkpoints", out / "checkpoints")
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))
    for later in ckpts[1:]:  # resume from the earlier kept one: bn-carry at step 5
        shutil.rmtree(later)
    resumed = run_mpi(2, [*args, "--out", str(out), "--resume", "auto"], timeout=300, check=True)
    assert "resuming from" in resumed.stdout and "bn-carry at step 5" in resumed.stdout
    for f in ("bn-carry/model.pt",):
        x, y = torch.load(ref / f), torch.load(out / f)
        for k in x:
            assert x[k].numpy().tobytes() == y[k].numpy().tobytes(), f"{f}: {k}"
    a, b = _runs(ref)["bn-carry"], _runs(out)["bn-carry"]
    assert a["test_accuracy"] == b["test_accuracy"]


def test_a_partition_of_another_size_is_refused_by_name(skewed, tmp_path):
    args = ["-m", "disdl_mpi.run", "--data-dir", str(skewed), "--norm", "bn", "--steps", "2"]
    proc = run_mpi(2, [*args, "--virtual-ranks", "3", "--out", str(tmp_path / "o")], timeout=120)
    assert proc.returncode == 2
    assert "partition.json" in proc.stderr and "8 ranks but the job has 6" in proc.stderr
    assert "--virtual-ranks K with K dividing 8" in proc.stderr  # not "mpiexec -n 8" alone
    assert "Traceback" not in proc.stderr
    bad = run_mpi(2, [*args, "--virtual-ranks", "0", "--out", str(tmp_path / "p")], timeout=120)
    assert bad.returncode == 2 and "--virtual-ranks must be >= 1, got 0" in bad.stderr


def test_check_collectives_changes_nothing_under_virtual_ranks(skewed, tmp_path):
    """Every scheme with collectives of its own, 2 x 4, with and without the debug check: the
    check passes (the K copies' pooled collectives agree across processes) and is inert."""
    args = ["-m", "disdl_mpi.run", "--data-dir", str(skewed), "--virtual-ranks", "4"]
    args += ["--norm", "syncbn,bn-carry,bn-recal,fedbn", "--steps", "6", "--save-model", "--progress", "none"]
    run_mpi(2, [*args, "--out", str(tmp_path / "a")], timeout=300, check=True)
    run_mpi(2, [*args, "--check-collectives", "--out", str(tmp_path / "b")], timeout=300, check=True)
    for f in ("syncbn/model.pt", "bn-carry/model.pt", "bn-recal/model.pt", "fedbn/model_rank00006.pt"):
        x, y = torch.load(tmp_path / "a" / f), torch.load(tmp_path / "b" / f)
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].numpy().tobytes() == y[k].numpy().tobytes(), f"{f}: {k}"
    assert (
        _runs(tmp_path / "a")["fedbn"]["per_rank_accuracy"]
        == _runs(tmp_path / "b")["fedbn"]["per_rank_accuracy"]
    )


def test_a_non_finite_loss_names_the_isolated_ranks_of_its_process(skewed, tmp_path):
    proc = run_mpi(
        2,
        ["-m", FAULT_DRIVER, "--data-dir", str(skewed), "--virtual-ranks", "4", "--norm", "gn"]
        + ["--steps", "6", "--out", str(tmp_path / "o")],
        env={"FAULT_NAN": "1:3:loss"},
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert re.search(
        r"non-finite loss and gradient on rank 1 on \S+ \(isolated ranks 4-7\) at optimizer step 3",
        proc.stderr,
    ), proc.stderr
    assert "Traceback" not in proc.stderr
