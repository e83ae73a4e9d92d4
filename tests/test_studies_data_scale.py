"""bench.studies.data_scale: a real sweep over two tiny partitions and two residency modes."""

from __future__ import annotations

import json

from bench.studies.data_scale import main, markdown


def test_the_sweep_measures_every_size_and_mode_and_cleans_up(tmp_path):
    out = tmp_path / "rows.json"
    assert (
        main(
            [
                *"--shape 3,8,8 --per-rank 40,90 --modes device,stream --steps 2".split(),
                *"--test 20 --work".split(),
                str(tmp_path / "w"),
                "--json",
                str(out),
                *"--timeout 180".split(),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["per_rank"], r["mode"]) for r in rows] == [
        (40, "device"),
        (40, "stream"),
        (90, "device"),
        (90, "stream"),
    ]
    for r in rows:
        # launch-to-ready includes starting Python, so it is at least the run's own load time
        assert r["startup_s"] >= r["load_s"] > 0
        assert 0.1 < r["peak_rss_gib"] < 4 and r["samples_per_s"] > 0
        assert r["stored_gib"] > 0
    assert not (tmp_path / "w" / "p40").exists() and not (tmp_path / "w" / "p90").exists()
    table = markdown(rows, ["device", "stream"])
    assert table.count("\n") == 3 and "stream: peak RSS" in table and "| 90 |" in table


def test_a_mode_named_twice_gets_a_column_per_run():
    rows = [
        dict(per_rank=10, mode=m, stored_gib=1.0, startup_s=s, peak_rss_gib=1.5)
        for m, s in (("device", 21.0), ("host", 13.6), ("device", 12.4))
    ]
    table = markdown(rows, ["device", "host", "device"])
    head, _, line = table.splitlines()
    assert "device #1: start-up" in head and "device #2: start-up" in head
    assert "host: start-up" in head
    assert line.index("21.0 s") < line.index("13.6 s") < line.index("12.4 s")


def test_keep_reuses_the_partition_an_earlier_sweep_left_and_warmup_is_untimed(tmp_path):
    args = [
        *"--shape 3,8,8 --per-rank 30 --modes stream --steps 1 --test 10".split(),
        "--work",
        str(tmp_path / "w"),
        *"--keep --timeout 180".split(),
    ]
    out = tmp_path / "rows.json"
    assert main(args + ["--warmup-run", "--json", str(out)]) == 0
    # the untimed warm-up ran, and is not among the rows
    assert (tmp_path / "w" / "run-30-warmup" / "summary.json").exists()
    assert [r["mode"] for r in json.loads(out.read_text())["rows"]] == ["stream"]
    rank_file = tmp_path / "w" / "p30" / "rank_00000.h5"
    first = rank_file.stat()
    assert main(args) == 0
    again = rank_file.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
