"""Memory that follows the data: inputs stay in their stored dtype and are standardized per
batch; a resident partition over the memory budget is refused before it is read, auto streams
it instead; device, host and stream residency train the same model, bit for bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from mpi4py import MPI

from disdl_mpi.data import standardize as std_mod
from disdl_mpi.data.budget import over_budget, resident_bytes
from disdl_mpi.data.local_data import TrainRows
from disdl_mpi.data.standardize import channel_sums, standardize
from disdl_mpi.units import parse_size
from tests.mpi_helpers import run_job, run_mpi


def _standardized_copy(x: np.ndarray) -> torch.Tensor:
    """What the toolkit did before: a float32 copy standardized whole (float64 statistics)."""
    axes = (0,) + tuple(range(2, x.ndim))
    xt = torch.from_numpy(x).to(torch.float32)
    n = x.shape[0] * int(np.prod([x.shape[a] for a in axes[1:]]))
    mean = xt.double().sum(dim=axes) / n
    std = ((xt.double() ** 2).sum(dim=axes) / n - mean**2).clamp_min(0).sqrt()
    std[std < 1e-6] = 1.0
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (xt - mean.float().view(shape)) / std.float().view(shape)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_batches_equal_a_standardized_copy_and_storage_keeps_its_dtype(monkeypatch, dtype):
    # Statistics in blocks of 7 rows, so the chunked accumulation is exercised.
    monkeypatch.setattr(std_mod, "_STATS_ROWS_BYTES", 7 * 3 * 5 * 5 * 8)
    rng = np.random.default_rng(1)
    x = (
        rng.integers(0, 256, (50, 3, 5, 5)).astype(dtype)
        if dtype == "uint8"
        else (rng.random((50, 3, 5, 5)) * 16).astype(dtype)
    )
    x[:, 2] = 7  # a constant channel keeps std 1
    inputs, [test] = standardize(TrainRows(x), [x[:9]], MPI.COMM_SELF, torch.device("cpu"))
    assert inputs.stored.dtype == getattr(torch, dtype)
    assert inputs.nbytes == x.nbytes and len(inputs) == 50 and inputs.shape == x.shape
    ref = _standardized_copy(x)
    index = torch.tensor([49, 0, 13, 13, 31])
    assert torch.equal(inputs[index], ref[index])
    assert torch.equal(inputs[10:20], ref[10:20])
    assert torch.equal(test[0:9], ref[0:9])
    assert inputs[index].dtype == torch.float32


def test_chunked_sums_equal_whole_sums_for_flat_features(monkeypatch):
    monkeypatch.setattr(std_mod, "_STATS_ROWS_BYTES", 3 * 64 * 8)
    x = np.random.default_rng(2).integers(0, 17, (40, 64)).astype(np.uint8)
    sums = channel_sums(x)
    xd = x.astype(np.float64)
    assert sums[0] == 40
    assert np.array_equal(sums[1:65], xd.sum(0)) and np.array_equal(sums[65:], (xd**2).sum(0))


def test_size_parsing_and_the_resident_size_of_a_rank():
    assert parse_size("2G") == 2 << 30 and parse_size("512MiB") == 512 << 20
    assert parse_size("1.5g") == 3 << 29 and parse_size("4096") == 4096
    for bad in ("", "lots", "-1G", "0"):
        with pytest.raises(ValueError, match="memory-budget"):
            parse_size(bad, "--memory-budget")
    manifest = {
        "sample_shape": [3, 4, 4],
        "x_dtype": "uint8",
        "test": {"size": 10},
        "ranks": [{"size": 100}, {"size": 5}],
    }
    assert resident_bytes(manifest, 0) == 110 * (48 + 8)
    msg = over_budget("D", manifest, 2000, "test budget")
    assert msg is not None and "rank(s) 0 " in msg and "--memory-budget" in msg
    assert over_budget("D", manifest, 110 * 56, "test budget") is None


def test_an_over_budget_partition_is_refused_on_every_rank_before_it_is_read(digits_partition, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_partition(2), data)
    # A rank file that could not be read: the refusal must come before any read of it.
    (data / "rank_00001.h5").write_bytes(b"not hdf5")
    proc = run_mpi(
        2,
        [
            *"-m disdl_mpi.run --data-dir".split(),
            str(data),
            *"--norm gn --steps 2 --memory-budget 64K --data-residency device".split(),
            "--out",
            str(tmp_path / "o"),
        ],
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "over the memory budget" in err and "--data-residency stream" in err
    assert "the budget is 64 KiB per rank (--memory-budget)" in err
    assert "rank_00001.h5" not in err  # never opened
    assert "step" not in proc.stdout


def test_auto_streams_what_would_not_fit_and_every_mode_trains_the_same_model(digits_partition, tmp_path):
    data = digits_partition(2)
    models = {}
    for mode, budget in (("device", "1G"), ("host", "1G"), ("stream", "1G"), ("auto", "64K")):
        out = tmp_path / mode
        proc = run_mpi(
            2,
            [
                *"-m disdl_mpi.run --data-dir".split(),
                str(data),
                *"--norm bn,bn-fix --epochs 2 --data-residency".split(),
                mode,
                "--memory-budget",
                budget,
                *"--save-model --out".split(),
                str(out),
            ],
            timeout=180,
            check=True,
        )
        used = "stream" if mode == "auto" else mode
        assert f"data residency: {used}" in proc.stdout and "data ready in" in proc.stdout
        rec = json.loads((out / "summary.json").read_text())["runs"][0]
        # every rank's peak memory (a rank with torch is well over 100 MB) and the start-up
        assert len(rec["peak_rss_bytes"]) == 2 and min(rec["peak_rss_bytes"]) > 100 << 20
        assert rec["startup_s"] > 0
        models[mode] = {s: torch.load(out / s / "model.pt", weights_only=True) for s in ("bn", "bn-fix")}
    assert "would not fit the budget" in proc.stdout  # auto said why it streamed
    for mode in ("host", "stream", "auto"):
        for scheme, state in models["device"].items():
            other = models[mode][scheme]
            assert all(torch.equal(state[k], other[k]) for k in state), (mode, scheme)


def test_streamed_batches_equal_resident_ones_read_ahead_or_not(tmp_path):
    import h5py

    from disdl_mpi.data.residency import StreamedInputs

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (40, 3, 4, 4)).astype(np.uint8)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        f["x"] = x
    resident, _ = standardize(TrainRows(x), [], MPI.COMM_SELF, torch.device("cpu"))
    streamed, _ = standardize(
        TrainRows(None, path=tmp_path / "r.h5", residency="stream"), [], MPI.COMM_SELF, torch.device("cpu")
    )
    assert isinstance(streamed, StreamedInputs) and len(streamed) == 40
    batches = [rng.permutation(40)[:7] for _ in range(5)]
    streamed.schedule(batches)
    for b in batches:  # read ahead by the background thread; asked for as the trainer does
        assert torch.equal(streamed[torch.as_tensor(b)], resident[b])
    assert streamed.prefetched == len(batches)
    dup = np.array([5, 3, 5, 0])  # repeated and unordered rows, read on demand
    assert torch.equal(streamed[dup], resident[dup])
    assert torch.equal(streamed[10:17], resident[10:17])
    assert streamed.nbytes == 0
    streamed.close()


def test_a_budget_that_holds_trains_as_before(digits_partition, tmp_path):
    proc = run_job(digits_partition(2), "--norm gn --steps 2 --memory-budget 1G", tmp_path / "o", check=True)
    assert proc.returncode == 0


def test_evaluation_batches_are_bounded_in_bytes_and_score_the_requested_rows():
    from disdl_mpi.evaluate import count_correct, eval_batch_size

    assert eval_batch_size((1, 8, 8)) == 1024
    assert eval_batch_size((3, 224, 224)) == (16 << 20) // (4 * 3 * 224 * 224)
    seen: list[int] = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.arange(10, dtype=torch.float32).remainder(3).view(10, 1)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 9, 9, 9, 0])  # rows 6-8 are wrong
    assert count_correct(Probe(), x, y, batch_size=4) == 7 and seen == [4, 4, 2]
    seen.clear()
    assert count_correct(Probe(), x, y, batch_size=4, lo=3, hi=9) == 3 and seen == [4, 2]


@pytest.mark.parametrize("mode", ["device", "stream"])
def test_the_statistics_come_from_the_checking_pass_one_read_of_the_file(
    digits_partition, monkeypatch, tmp_path, mode
):
    import h5py

    from disdl_mpi.data.partition_io import load_partition

    data = digits_partition(1, "iid")
    local = load_partition(MPI.COMM_SELF, data, residency=mode)
    assert local.train.residency == mode and (local.train.x is None) == (mode == "stream")
    with h5py.File(data / "rank_00000.h5", "r") as f:
        x = f["x"][...]
    sums = local.train.sums
    assert sums is not None and sums[0] == x.shape[0] * x[0, 0].size
    # Every row was summed (allclose: the blocks of the pass may add in another order).
    assert np.allclose(sums, channel_sums(x), rtol=1e-12, atol=0)
    # With those sums, standardizing must not read the partition a second time.
    monkeypatch.setattr(std_mod, "channel_sums", lambda *_: pytest.fail("second pass"))
    train, _ = standardize(local.train, [], MPI.COMM_SELF, torch.device("cpu"))
    assert len(train) == x.shape[0]
    expect = (torch.from_numpy(x[:5]).float() - train.mean) / train.std
    assert torch.equal(train[0:5], expect)
    if mode == "stream":
        train.close()


def test_uint8_image_sums_are_exact_and_do_not_depend_on_the_blocks():
    from disdl_mpi.data.standardize import ChannelSums

    x = np.random.default_rng(5).integers(0, 256, (37, 3, 16, 16)).astype(np.uint8)
    xd = x.astype(np.float64)
    want = np.concatenate([[37 * 256], xd.sum((0, 2, 3)), (xd**2).sum((0, 2, 3))])
    for cuts in ([37], [1, 36], [10, 10, 17]):
        sums, lo = ChannelSums((3, 16, 16)), 0
        for n in cuts:
            sums.add(x[lo : lo + n])
            lo += n
        assert np.array_equal(sums.values(), want), cuts  # exact, in any blocks
