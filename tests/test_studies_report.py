"""bench.studies.report builds report.md/.html from fixture results of every kind."""

from __future__ import annotations

import argparse
import base64
import json
import re
from pathlib import Path

import pytest

from bench.studies import report, scaling_report
from bench.studies.costmodel import predict
from bench.studies.plots import new_figure, plot_breakdown, plot_scaling, save_png
from tests.output_checks import PNG_SIGNATURE, is_png

MACHINE = {
    "cpu": "x86_64",
    "cpu_model": "Test CPU 9000",
    "cores_per_node": 2,
    "device": "cpu",
    "mpi_library": "MPICH Version: 5.0.2",
    "mpi4py": "4.1.2",
    "torch": "2.13.0+cpu",
    "python": "3.11",
    "ranks_per_node": 2,
    "threads_per_rank": 1,
    "world_size": 2,
    "nodes": 1,
}


def record(norm: str, n: int, thr: float) -> dict:
    steps = 10
    ph = {
        "data": 0.01,
        "forward": 0.3,
        "backward": 0.5,
        "imbalance_wait": 0.05 * (n > 1),
        "allreduce": 0.04 * (n > 1),
        "guard": 0.0,
        "optimizer": 0.05,
        "other": 0.01,
        "allreduce_total": 0.08 * (n > 1),
        "norm_comm": 0.0,
        "eval": 0.1,
    }
    ph["step"] = sum(
        ph[k]
        for k in ("data", "forward", "backward", "imbalance_wait", "allreduce", "guard", "optimizer", "other")
    )
    ph["compute"] = ph["forward"] + ph["backward"] + ph["optimizer"]
    ph["comm"] = ph["allreduce"]
    return {
        "norm": norm,
        "world_size": n,
        "samples_per_s": thr,
        "steps": steps,
        "phases": ph,
        "phases_detail": {k: {"min": v * 0.9, "mean": v, "max": v * 1.1} for k, v in ph.items()},
        "allreduce_path": "cpu-zero-copy",
        "grad_bytes": 400_000,
        "imbalance_method": "barrier-probe",
        "test_accuracy": 0.8,
        "global_batch_size": 32 * n,
        "threads_per_rank": 1,
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("results")
    # a run
    run = base / "run"
    run.mkdir()
    (run / "summary.json").write_text(
        json.dumps(
            {"runs": [record("bn", 2, 900.0), record("gn", 2, 1000.0)], "config": {}, "machine": MACHINE}
        )
    )
    # a scaling sweep, through the real table/markdown/plot code
    sc = base / "sweep"
    sc.mkdir()
    points = [
        {"records": [record("bn", n, 500.0 * n**0.9), record("gn", n, 520.0 * n**0.9)], "machine": MACHINE}
        for n in (1, 2, 4)
    ]
    rows = scaling_report.table(points, "weak", cores=2)
    args = argparse.Namespace(mode="weak", ranks=[1, 2, 4])
    (sc / "scaling.csv").write_text(scaling_report.csv_text(rows))
    (sc / "scaling.md").write_text(scaling_report.markdown(rows, MACHINE, args, 2))
    (sc / "scaling.json").write_text(
        json.dumps({"mode": "weak", "machine": MACHINE, "rows": rows, "command": ["py", "-m", "x"]})
    )
    plot_scaling(rows, sc / "scaling.png", cores=2)
    plot_breakdown(rows, sc / "breakdown.png", cores=2)
    # allreduce measurements in bench.allreduce's format (a list of rows)
    ar = sc / "allreduce"
    ar.mkdir()
    for p in (2, 4):
        (ar / f"n{p}.json").write_text(
            json.dumps(
                [
                    {
                        "backend": "mpi",
                        "bytes": 4**k,
                        "ranks": p,
                        "time_us": predict("ring", p, 4**k, 5e-6, 1e-9) * 1e6,
                    }
                    for k in range(5, 13)
                ]
            )
        )
    # an accuracy study's outputs
    acc = base / "acc"
    acc.mkdir()
    (acc / "accuracy.md").write_text("# Accuracy\n\n| scheme | acc |\n|---|---:|\n| bn | 0.5 |\n")
    fig, (ax,) = new_figure()
    ax.bar([0, 1], [0.5, 0.9])
    save_png(fig, acc / "accuracy.png")
    return {"run": run, "sweep": sc, "acc": acc, "base": base}


def test_report_from_all_kinds(results, tmp_path):
    out = tmp_path / "rep"
    assert (
        report.main([str(results["run"]), str(results["sweep"]), str(results["acc"]), "--out", str(out)]) == 0
    )
    md = (out / "report.md").read_text()
    for needle in (
        "## Machine",
        "Test CPU 9000",
        "MPICH Version: 5.0.2",
        "2.13.0+cpu",
        "| threads per rank | 1 |",
        "| ranks per node | 2 |",
        "CUDA-aware MPI used | no (CPU tensors, zero-copy)",
        "## Training runs",
        "## Scaling",
        "## Accuracy",
        "## Allreduce measurements",
        "## Cost model and projection",
        "| ring |",
        "### Accuracy\n",
    ):
        assert needle in md, needle
    # the cost model was fitted from the allreduce files found (no costmodel.json was given)
    fit = json.loads((out / "costmodel" / "costmodel.json").read_text())
    assert fit["fits"]["ring"]["alpha_s"] == pytest.approx(5e-6, rel=1e-4)
    assert fit["projections"], "the sweep's compute time should feed the projection"
    # images: linked from the .md, inlined into the .html, all valid PNGs
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(linked) == 4  # scaling, breakdown, accuracy, costmodel
    assert all(is_png(out / p) for p in linked)
    html = (out / "report.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 4
    assert all(base64.b64decode(b)[:8] == PNG_SIGNATURE for b in imgs)
    assert not re.search(r'src="(?!data:)', html)  # self-contained
    assert "<table>" in html and "<h2>Machine</h2>" in html


def test_report_defaults_to_first_dir_and_fails_clearly(results, tmp_path, capsys):
    assert report.main([str(results["run"])]) == 0
    assert (results["run"] / "report.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    assert "no results found" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nope")]) == 2


def test_report_includes_a_network_study(tmp_path):
    net = tmp_path / "net"
    net.mkdir()
    (net / "network.md").write_text(
        "# Network study: emulated nodes at 1gbit per node\n\n| nodes | bytes |\n|---|---:|\n| 2 | 4096 |\n"
    )
    assert report.main([str(net)]) == 0
    md = (net / "report.md").read_text()
    assert "## Network (emulated cluster)" in md and "### Network study" in md
    assert "<h3>Network study: emulated nodes at 1gbit per node</h3>" in (net / "report.html").read_text()
