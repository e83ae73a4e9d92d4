"""bench.studies.engine: launcher templates, per-point store, resume, failures, timeouts (no MPI)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from bench.studies.engine import Point, PointStore, Progress, SweepError, launcher_command, run_sweep

# A "launcher" that runs the command without MPI, so the sweep logic is tested in seconds.
PLAIN = "env DISDL_N={n}"


def writer_point(key: str, tmp_path, *, value: int, settings=None) -> Point:
    """A job that writes a small JSON result file and logs a line."""
    code = (
        f"import json,os; json.dump({{'v': {value}, 'n': int(os.environ['DISDL_N'])}}, "
        f"open({str(tmp_path / (key + '.out'))!r}, 'w')); print('ran {key}')"
    )
    return Point(key=key, ranks=value, args=["-c", code], settings=settings or {"v": value})


def collect(tmp_path):
    return lambda p, job: json.loads((tmp_path / f"{p.key}.out").read_text())


def test_launcher_template(monkeypatch):
    monkeypatch.delenv("DISDL_LAUNCHER", raising=False)
    cmd = launcher_command("srun --mpi=pmi2 -n {n}", 4, ["-m", "x"])
    assert cmd == ["srun", "--mpi=pmi2", "-n", "4", sys.executable, "-m", "x"]
    monkeypatch.setenv("DISDL_LAUNCHER", "mpirun -np {n}")
    assert launcher_command(None, 2, [])[:3] == ["mpirun", "-np", "2"]
    with pytest.raises(SweepError, match=r"no '\{n\}'"):
        launcher_command("mpirun -np 4", 4, [])


def test_resume_runs_only_missing_points(tmp_path):
    store = PointStore(tmp_path / "points")
    points = [writer_point(f"p{i}", tmp_path, value=i) for i in (1, 2, 3)]

    def sweep(todo: int, stream: io.StringIO, say) -> list[dict]:
        progress = Progress(todo, stream=stream, tty=False)
        return run_sweep(
            points, store, collect(tmp_path), launcher=PLAIN, timeout=60, progress=progress, say=say
        )

    out = io.StringIO()
    res = sweep(3, out, out.write)
    assert [r["v"] for r in res] == [1, 2, 3] and [r["n"] for r in res] == [1, 2, 3]
    assert "3/3 p3: ok" in out.getvalue()
    # Drop one result and change another point's settings: exactly those two rerun.
    store.path("p2").unlink()
    points[2] = writer_point("p3", tmp_path, value=3, settings={"v": 3, "changed": True})
    mtime_p1 = store.path("p1").stat().st_mtime_ns
    log = io.StringIO()
    said = []
    res = sweep(2, log, said.append)
    assert said == ["resuming: 1 of 3 point(s) already done, 2 to run"]
    assert "start p2" in log.getvalue() and "start p3" in log.getvalue()
    assert "start p1" not in log.getvalue()
    assert store.path("p1").stat().st_mtime_ns == mtime_p1
    assert len(res) == 3 and store.load("p3")["settings"] == {"changed": True, "v": 3}


def test_failed_and_timed_out_points_are_not_stored(tmp_path):
    store = PointStore(tmp_path / "points")
    bad = Point(key="bad", ranks=1, args=["-c", "import sys; print('boom'); sys.exit(3)"])
    slow = Point(key="slow", ranks=1, args=["-c", "import time; time.sleep(30)"])
    good = writer_point("good", tmp_path, value=1)
    out = io.StringIO()
    res = run_sweep(
        [bad, slow, good],
        store,
        collect(tmp_path),
        launcher=PLAIN,
        timeout=2,
        progress=Progress(3, stream=out, tty=False),
        say=out.write,
    )
    assert [r["key"] for r in res] == ["good"]
    text = out.getvalue()
    assert "bad: FAILED (exit code 3)" in text and "slow: FAILED (timed out after 2 s)" in text
    assert "boom" in (tmp_path / "logs" / "bad.failed").read_text()
    assert store.load("bad") is None and store.load("slow") is None


def test_progress_bar_on_tty():
    out = io.StringIO()
    bar = Progress(2, stream=out, tty=True)
    bar.starting("n1")
    bar.finished("n1", "ok")
    assert "\r[" in out.getvalue() and "1/2 n1: ok" in out.getvalue()
