"""Phase timers add up to the step wall time; the timeline is valid trace-event JSON."""

from __future__ import annotations

import json
import time

import pytest
import torch
from mpi4py import MPI

from disdl_mpi.observe.timeline import TraceRecorder
from disdl_mpi.observe.timing import DISJOINT, PhaseTimer, derive_imbalance, detail_requested
from tests.mpi_helpers import run_mpi
from tests.output_checks import validate_trace


def test_phases_add_up_to_step_wall_in_process():
    """A real (tiny) training step on the CPU, timed phase by phase."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
    trace = TraceRecorder(MPI.COMM_SELF)
    timer = PhaseTimer(torch.device("cpu"), wait_comm=MPI.COMM_SELF, trace=trace)
    for step in range(5):
        timer.begin_step(step)
        with timer.phase("data"):
            idx = torch.randint(0, 512, (128,))
            xb, yb = x[idx], y[idx]
        with timer.phase("optimizer"):
            opt.zero_grad()
        with timer.phase("forward"):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            time.sleep(0.004)  # keep phases well above timer resolution on a busy machine
        with timer.phase("backward"):
            loss.backward()
        timer.wait_for_peers()
        with timer.phase("allreduce"):
            time.sleep(0.002)
        with timer.phase("optimizer"):
            opt.step()
        timer.end_step()
    s = timer.totals()
    assert timer.steps == 5
    disjoint = sum(s[p] for p in DISJOINT)
    assert s["step"] > 0.03
    assert abs(s["step"] - disjoint) <= 0.10 * s["step"], s
    assert s["other"] == pytest.approx(max(0.0, s["step"] - disjoint))
    assert s["compute"] == pytest.approx(s["forward"] + s["backward"] + s["optimizer"])
    assert s["comm"] == pytest.approx(s["allreduce"])
    assert s["imbalance_wait"] > 0  # the probe ran (a barrier on COMM_SELF)
    names = [e["name"] for e in trace.events]
    assert names.count("forward") == 5 and "step 4" in names and "imbalance_wait" in names


def test_derived_imbalance_and_detail_switch(monkeypatch):
    detail = {
        "data": {"min": 0.0, "mean": 0.1, "max": 0.2},
        "forward": {"min": 1.0, "mean": 2.0, "max": 3.0},
        "backward": {"min": 1.0, "mean": 1.5, "max": 2.0},
    }
    assert derive_imbalance(detail) == pytest.approx(5.2 - 3.6)
    assert derive_imbalance({}) == 0.0
    monkeypatch.delenv("DISDL_TIMING_DETAIL", raising=False)
    assert not detail_requested(None) and detail_requested("t.json")
    monkeypatch.setenv("DISDL_TIMING_DETAIL", "1")
    assert detail_requested(None)


def test_validate_trace_catches_bad_events():
    assert validate_trace({"traceEvents": []}) == []
    assert validate_trace([]) != []
    bad = {"traceEvents": [{"name": "x", "ph": "X", "pid": 0, "tid": 0, "ts": 1.0, "dur": -1}]}
    assert "negative duration" in validate_trace(bad)[0]


@pytest.mark.mpi
def test_run_timeline_and_phase_detail(tmp_path):
    out, trace = tmp_path / "out", tmp_path / "trace.json"
    run_mpi(
        2,
        [
            *"-m disdl_mpi.run --data-dir".split(),
            str(tmp_path / "data"),
            *"--norm gn --model mlp --steps 4 --global-batch-size 64 --threads".split(),
            *"1 --out".split(),
            str(out),
            "--timeline",
            str(trace),
        ],
        timeout=240,
        check=True,
    )
    (rec,) = json.loads((out / "summary.json").read_text())["runs"]
    ph, det = rec["phases"], rec["phases_detail"]
    assert rec["imbalance_method"] == "barrier-probe" and rec["grad_bytes"] > 0
    disjoint = sum(ph[p] for p in DISJOINT)
    assert ph["step"] > 0 and abs(ph["step"] - disjoint) <= 0.10 * ph["step"], ph
    for name in DISJOINT + ("step", "compute", "comm"):
        assert det[name]["min"] <= det[name]["mean"] + 1e-12 <= det[name]["max"] + 2e-12
    assert ph["allreduce_total"] > 0  # the allreducer reported its bucket time

    obj = json.loads(trace.read_text())
    assert validate_trace(obj) == []
    evs = obj["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in evs if e["name"] == "process_name"}
    assert names == {(0, "rank 0"), (1, "rank 1")}
    for rank in (0, 1):
        mine = [e for e in evs if e["pid"] == rank and e["ph"] == "X"]
        kinds = {e["name"] for e in mine}
        assert {"forward", "backward", "imbalance_wait", "allreduce", "optimizer", "scheme gn"} <= kinds
        steps = sorted((e for e in mine if e["name"].startswith("step ")), key=lambda e: e["ts"])
        assert len(steps) == 4
        # every phase event of a step lies inside that step's span (properly nested)
        first = steps[0]
        inside = [
            e
            for e in mine
            if e["tid"] == 0
            and e["name"] == "forward"
            and first["ts"] <= e["ts"] <= first["ts"] + first["dur"]
        ]
        assert len(inside) == 1 and inside[0]["ts"] + inside[0]["dur"] <= first["ts"] + first["dur"] + 1.0
        buckets = [e for e in mine if e["tid"] == 1]
        assert buckets and all(e["args"]["bytes"] > 0 for e in buckets)
