"""bench.mpi_buffers: the same allreduce from differently allocated buffers, side by side."""

from __future__ import annotations

import pytest

from bench.harness import read_rows
from tests.mpi_helpers import run_bench


@pytest.mark.mpi
def test_two_ranks_time_every_buffer_at_every_size(tmp_path):
    out = tmp_path / "buffers.json"
    proc = run_bench(
        "bench.mpi_buffers", "-b 64K -e 256K -f 4 --iters 3 --warmup 1 --block 2", out, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    assert [r["bytes"] for r in rows] == [65536, 262144]
    for r in rows:
        for v in (
            "numpy Allreduce",
            "numpy Iallreduce",
            "torch Iallreduce",
            "allreducer Iallreduce",
            "allreducer step",
        ):
            assert r[f"{v} us"] > 0 and r[f"{v} p50 us"] > 0
    assert proc.stdout.count("bench.mpi_buffers") == 1  # only rank 0 prints
