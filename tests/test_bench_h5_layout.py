"""bench.h5_layout: random-row read times of the HDF5 layouts, and the writer's choice."""

from __future__ import annotations

import h5py

from bench.h5_layout import LAYOUTS, chunks, measure


def test_every_layout_is_timed_and_the_writer_writes_x_contiguous(tmp_path):
    res = measure((3, 8, 8), rows=400, batch=8, reads=20)
    assert all(res[f"{layout}_ms"] > 0 for layout in LAYOUTS)
    assert chunks("contiguous", (3, 8, 8)) is None and chunks("chunk-per-row", (3, 8, 8))[0] == 1
    from data_prep.partition import build_partitions

    build_partitions(
        "synthetic", 2, "iid", 0, tmp_path / "p", num_samples=64, num_test=8, shape=(3, 4, 4), num_classes=3
    )
    with h5py.File(tmp_path / "p" / "rank_00000.h5", "r") as f:
        assert f["x"].chunks is None  # contiguous: streamed rows are read at computed offsets
