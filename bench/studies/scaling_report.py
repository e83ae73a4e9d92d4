"""A scaling sweep's table, CSV and Markdown (scaling.csv, scaling.md)."""

from __future__ import annotations

import argparse
import csv
import io
import time
from typing import Any

from disdl_mpi.files import markdown_table
from disdl_mpi.observe.timing import REPORTED, comm_share

COLUMNS = (
    (
        "ranks",
        "norm",
        "mode",
        "samples_per_s",
        "speedup",
        "efficiency",
        "comm_fraction",
        "oversubscribed",
        "steps",
        "global_batch_size",
        "grad_bytes",
        "test_accuracy",
        "threads_per_rank",
        "allreduce_path",
        "imbalance_method",
    )
    + tuple(f"{p}_s" for p in REPORTED)
    + ("imbalance_wait_max_s",)
)


def table(points: list[dict], mode: str, cores: int) -> list[dict[str, Any]]:
    """Rows of scaling.csv: speedup/efficiency against each scheme's smallest rank count."""
    flat = [r for pt in points for r in pt.get("records", [])]
    rows = []
    for norm in dict.fromkeys(r["norm"] for r in flat):
        recs = sorted((r for r in flat if r["norm"] == norm), key=lambda r: r["world_size"])
        base = recs[0]
        for r in recs:
            ph, n = r["phases"], r["world_size"]
            speedup = r["samples_per_s"] / base["samples_per_s"]
            row = {
                "ranks": n,
                "norm": norm,
                "mode": mode,
                "samples_per_s": r["samples_per_s"],
                "speedup": speedup,
                "efficiency": speedup / (n / base["world_size"]),
                "comm_fraction": comm_share(ph["compute"], ph["comm"]),
                "oversubscribed": int(n > cores),
                "steps": r["steps"],
                "global_batch_size": r["global_batch_size"],
                "grad_bytes": r.get("grad_bytes") or 0,
                "test_accuracy": r["test_accuracy"],
                "threads_per_rank": r["threads_per_rank"],
                "allreduce_path": r["allreduce_path"],
                "imbalance_method": r.get("imbalance_method") or "derived",
            }
            for p in REPORTED:
                row[f"{p}_s"] = ph.get(p, 0.0)
            row["imbalance_wait_max_s"] = (
                (r.get("phases_detail") or {}).get("imbalance_wait", {}).get("max", 0.0)
            )
            rows.append(row)
    rows.sort(key=lambda r: (r["ranks"], list(dict.fromkeys(x["norm"] for x in flat)).index(r["norm"])))
    return rows


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def markdown(rows: list[dict], machine: dict, args: argparse.Namespace, cores: int) -> str:
    from bench.studies.plots import oversubscription_note

    lines = [
        f"# Scaling: {args.mode}, ranks {' '.join(map(str, sorted(set(args.ranks))))}",
        "",
        f"Machine: {machine.get('cpu', '?')}, {cores} cores per node, "
        f"{machine.get('mpi_library', '?')}, torch {machine.get('torch', '?')}, device "
        f"{machine.get('device', '?')}; {time.strftime('%Y-%m-%d %H:%M %Z')}.",
        "",
    ]
    note = oversubscription_note([r["ranks"] for r in rows], cores)
    if note:
        lines += [f"**Note — {note}.**", ""]
    cells = []
    for r in rows:
        ms = lambda k: f"{1e3 * r[f'{k}_s'] / max(1, r['steps']):.2f}"  # noqa: B023 (this iteration)
        star = " (oversubscribed)" if r["oversubscribed"] else ""
        cells.append(
            [
                f"{r['ranks']}{star}",
                r["norm"],
                f"{r['samples_per_s']:.0f}",
                f"{r['speedup']:.2f}",
                f"{r['efficiency']:.2f}",
                f"{100 * r['comm_fraction']:.1f}",
                ms("step"),
                ms("forward"),
                ms("backward"),
                ms("imbalance_wait"),
                ms("allreduce"),
                ms("optimizer"),
            ]
        )
    lines += [
        markdown_table(
            [
                "ranks",
                "scheme",
                "samples/s",
                "speedup",
                "efficiency",
                "comm %",
                "step ms",
                "fwd ms",
                "bwd ms",
                "wait ms",
                "allreduce ms",
                "opt ms",
            ],
            cells,
            align=["r", "l"] + ["r"] * 10,
        )
    ]
    method = {r["imbalance_method"] for r in rows}
    lines += [
        "",
        "Per-step times are rank means. `wait` is the load-imbalance wait "
        f"({', '.join(sorted(method))}); `allreduce` is the exposed gradient sync; "
        "comm % = (allreduce + normalization collectives) / (compute + comm).",
        "",
    ]
    return "\n".join(lines)
