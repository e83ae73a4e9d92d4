"""--profile-steps: one torch.profiler trace per rank and scheme, our phases as named ranges,
only for the requested window of steps."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from disdl_mpi.observe.profiler import parse_profile_steps
from tests.mpi_helpers import run_job, run_mpi


def _phase_counts(path) -> Counter:
    events = json.loads(path.read_text())["traceEvents"]
    return Counter(e["name"] for e in events if e.get("cat") == "user_annotation")


def test_parse_profile_steps():
    assert parse_profile_steps("2:5") == (2, 5) and parse_profile_steps("3") == (3, 3)
    for bad in ("0:2", "5:2", "a:b", "1:2:3", ""):
        with pytest.raises(ValueError, match="--profile-steps"):
            parse_profile_steps(bad)


def test_traces_next_to_the_timeline_hold_the_window_of_each_scheme(digits_partition, tmp_path):
    run_mpi(
        2,
        [
            *"-m disdl_mpi.run --data-dir".split(),
            str(digits_partition(2)),
            *"--norm gn,bn --steps 5 --eval-every 0 --profile-steps 2:3".split(),
            "--timeline",
            str(tmp_path / "t" / "trace.json"),
            "--out",
            str(tmp_path / "o"),
        ],
        timeout=180,
        check=True,
    )
    for scheme in ("gn", "bn"):
        for rank in (0, 1):
            counts = _phase_counts(tmp_path / "t" / f"trace.profile.{scheme}.rank{rank}.json")
            # steps 2 and 3 only: each phase of the step appears exactly twice
            assert counts["forward"] == 2 and counts["backward"] == 2 and counts["data"] == 2
            assert counts["allreduce"] == 2
    assert not list((tmp_path / "t").glob(".*tmp*"))


def test_a_window_past_the_last_step_is_written_when_the_scheme_ends(digits_partition, tmp_path):
    proc = run_job(
        digits_partition(2),
        "--norm gn --steps 3 --eval-every 0 --profile-steps 3:9",
        tmp_path / "o",
        timeout=180,
        check=True,
    )
    assert _phase_counts(tmp_path / "o" / "profile" / "gn.rank1.json")["forward"] == 1
    assert "profiles (one per rank and scheme" in proc.stdout


def test_a_bad_window_is_refused_before_training(tmp_path):
    proc = run_mpi(
        2,
        ["-m", "disdl_mpi.run", "--norm", "gn", "--profile-steps", "4:2", "--out", str(tmp_path / "o")],
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.count("--profile-steps") == 1
