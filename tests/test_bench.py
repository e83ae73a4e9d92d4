"""bench.allreduce and bench.peer under a real ``mpiexec -n 2`` with tiny settings."""

from __future__ import annotations

import argparse

import pytest

from bench.harness import parse_bytes, read_rows, sizes
from tests.mpi_helpers import run_bench, run_mpi

ROW_KEYS = {"backend", "bytes", "count", "dtype", "ranks", "time_us", "algbw_gbps", "busbw_gbps"}


def test_size_parsing_and_ladder():
    assert parse_bytes("4K") == 4096 and parse_bytes("1M") == 2**20 and parse_bytes("64") == 64
    with pytest.raises(argparse.ArgumentTypeError, match="cannot read 'lots' as a size"):
        parse_bytes("lots")
    assert sizes(1024, 16384, 4, 4) == [1024, 4096, 16384]
    assert sizes(6, 20, 2, 4) == [4, 12]  # rounded down to whole elements, no duplicates


@pytest.mark.mpi
def test_bench_allreduce_two_ranks_writes_rows(tmp_path):
    out = tmp_path / "ar.json"
    proc = run_bench("bench.allreduce", "--min-bytes 1K --max-bytes 64K --factor 8 --iters 3 --warmup 1", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)
    assert [(r["backend"], r["bytes"]) for r in rows] == [
        (b, n) for n in (1024, 8192, 65536) for b in ("mpi", "disdl", "gloo")
    ]
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["ranks"] == 2 and r["dtype"] == "float32" and r["count"] * 4 == r["bytes"]
        assert r["time_us"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["time_us"] / 1e3)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 2 * (2 - 1) / 2)
    # Only rank 0 prints the table: one header, one line per row.
    assert proc.stdout.count("# disdl-mpi allreduce") == 1
    assert len(
        [ln for ln in proc.stdout.splitlines() if ln.strip().startswith(("mpi ", "disdl ", "gloo "))]
    ) == len(rows)
    assert "terminate called" not in proc.stderr


@pytest.mark.mpi
def test_bench_allreduce_rejects_bad_arguments():
    proc = run_mpi(
        2,
        ["-m", "bench.allreduce", "--min-bytes", "1M", "--max-bytes", "1K", "--backends", "mpi"],
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--min-bytes <= --max-bytes" in proc.stderr


@pytest.mark.mpi
def test_bench_peer_two_ranks_writes_json(tmp_path):
    out = tmp_path / "peer.json"
    proc = run_bench(
        "bench.peer",
        "--model mlp --dataset synthetic --sample-shape 16 --steps 4 --rounds 2 --warmup 1 --batch-size 8",
        out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (res,) = read_rows(out)
    for key in (
        "ddp_step_s",
        "disdl_step_s",
        "ratio",
        "local_step_s",
        "ddp_comm_share",
        "disdl_comm_share",
        "allreduce_path",
    ):
        assert key in res, key
    assert res["ddp_step_s"] > 0 and res["disdl_step_s"] > 0
    assert res["ratio"] == pytest.approx(res["disdl_step_s"] / res["ddp_step_s"])
    assert res["allreduce_path"] == "cpu-zero-copy" and res["ranks"] == 2
    assert 0 <= res["disdl_comm_share"] < 1
    assert proc.stdout.count("ratio disdl/ddp") == 1
    assert "terminate called" not in proc.stderr
    # like for like: DDP with our bucket cap and bucket views; per-step percentiles
    assert res["ddp_bucket_mb"] == res["bucket_mb"] and res["ddp_gradient_as_bucket_view"]
    for v in ("local", "ddp", "disdl"):
        assert 0 < res[f"{v}_step_p50_s"] <= res[f"{v}_step_p95_s"]


def test_bench_peer_compares_fp16_with_ddps_fp16_hook(tmp_path):
    out = tmp_path / "peer.json"
    run_bench(
        "bench.peer",
        (
            "--model mlp --dataset synthetic --sample-shape 16 --steps 4 "
            "--rounds 2 --warmup 1 --batch-size 8 --compress fp16"
        ),
        out,
        check=True,
    )
    (res,) = read_rows(out)
    # the weight check inside bench.peer passed for both fp16 paths (ranks agree)
    assert res["compress"] == "fp16" and res["ddp_step_s"] > 0 and res["disdl_step_s"] > 0


@pytest.mark.mpi
def test_bench_allreduce_statistics_and_correctness_check(tmp_path):
    out = tmp_path / "ar.json"
    proc = run_bench(
        "bench.allreduce",
        "--min-bytes 4K --max-bytes 4K --backends mpi,disdl --iters 6 --warmup 1 --block 3 --out-of-place",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in read_rows(out):
        assert r["min_us"] <= r["p50_us"] <= r["p95_us"] <= r["p99_us"] <= r["max_us"]
        assert r["min_us"] <= r["time_us"] <= r["max_us"] and r["cv"] >= 0
        assert r["wrong"] == 0 and r["max_rel_error"] == 0.0
        assert r["in_place"] == (r["backend"] != "mpi") and r["block"] == 3
    # a deliberately corrupted reduction is caught: #wrong > 0 and a non-zero exit
    bad = run_bench(
        "tests.mpi_programs.corrupt_allreduce",
        "--min-bytes 4K --max-bytes 4K --backends mpi,disdl --iters 2 --warmup 0",
        out,
    )
    assert bad.returncode == 1
    assert all(r["wrong"] == 1 for r in read_rows(out))
    assert "mpi at 4096 bytes: 1 wrong element(s)" in bad.stderr
    # fp16 on the wire reports the relative error instead of a count
    fp16 = run_bench(
        "bench.allreduce", "--min-bytes 4K --max-bytes 4K --backends disdl --compress fp16 --iters 2", out
    )
    assert fp16.returncode == 0, fp16.stderr[-2000:]
    (row,) = read_rows(out)
    assert row["wrong"] is None and row["max_rel_error"] < 1e-3


@pytest.mark.mpi
def test_bench_allreduce_min_busbw_is_a_health_check(tmp_path):
    args = [
        *"-m bench.allreduce --min-bytes 4K --max-bytes 4K --backends".split(),
        *"mpi,disdl --iters 2 --warmup 0".split(),
    ]
    assert run_mpi(2, [*args, "--min-busbw", "0.000001"], timeout=120).returncode == 0
    low = run_mpi(2, [*args, "--min-busbw", "100000"], timeout=120)
    assert low.returncode == 1 and "--min-busbw: disdl at 4096 bytes" in low.stderr


@pytest.mark.mpi
def _norm_overhead(tmp_path, options: str):
    """bench.norm_overhead on the MLP, 3 steps: the run and its rows by scheme."""
    out = tmp_path / "norms.json"
    proc = run_bench("bench.norm_overhead", f"--models mlp --steps 3 --warmup 1 {options}", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, {r["scheme"]: r for r in read_rows(out)}


def test_norm_overhead_times_every_scheme_against_bn(tmp_path):
    proc, rows = _norm_overhead(tmp_path, "--norm syncbn,bn-fix,bn-carry,fedbn")
    assert list(rows) == ["bn", "syncbn", "bn-fix (before T*)", "bn-fix (after T*)", "bn-carry", "fedbn"]
    assert rows["bn"]["x_bn"] == 1.0 and rows["bn"]["own_comm_ms_per_step"] == 0.0
    assert rows["syncbn"]["own_comm_ms_per_step"] > 0  # its per-layer collectives, timed
    for label in ("bn-fix (after T*)", "bn-carry", "fedbn"):  # no collective of their own per step
        assert rows[label]["own_comm_ms_per_step"] == 0.0
    for r in rows.values():
        assert r["step_ms"] > 0 and r["x_bn"] == pytest.approx(r["step_ms"] / rows["bn"]["step_ms"])
    assert proc.stdout.count("own comm ms") == 1  # only rank 0 prints
    # the CPU path makes no host synchronization; mlp has 2 BN layers, 2 passes each
    assert all(r["host_syncs_per_step"] == 0 and r["path"] == "cpu-zero-copy" for r in rows.values())


@pytest.mark.mpi
def test_norm_overhead_through_gloo_counts_syncbn_collectives_on_the_torch_path(tmp_path):
    _, rows = _norm_overhead(tmp_path, "--norm syncbn --comm gloo")
    assert {r["path"] for r in rows.values()} == {"torch-gloo"} and rows["syncbn"]["comm"] == "gloo"
    assert rows["syncbn"]["own_comm_ms_per_step"] > 0 and rows["syncbn"]["host_syncs_per_step"] == 0
