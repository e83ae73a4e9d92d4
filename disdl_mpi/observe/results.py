"""The run's outputs: summary.json/.md/.csv, per-scheme metrics, and the printed table."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from disdl_mpi.files import markdown_table, write_json, write_text
from disdl_mpi.observe.timing import comm_share

# Columns of the table printed at the end of a run and written to summary.md/.csv.
TABLE_COLUMNS = ("scheme", "test_acc", "samples/s", "compute_s", "comm_s", "comm_%")


def table_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in records:
        compute = r["phases"]["compute"]
        comm = r["phases"]["comm"]
        share = 100.0 * comm_share(compute, comm)
        rows.append(
            [
                r["norm"],
                f"{r['test_accuracy']:.4f}",
                f"{r['samples_per_s']:.0f}",
                f"{compute:.2f}",
                f"{comm:.2f}",
                f"{share:.1f}",
            ]
        )
    return rows


def format_table(records: list[dict[str, Any]]) -> str:
    """Fixed-width table, one row per scheme (compute/comm are rank-mean seconds)."""
    rows = table_rows(records)
    widths = [
        max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(TABLE_COLUMNS)
    ]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(TABLE_COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows])


def csv_text(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "norm",
            "world_size",
            "model",
            "dataset",
            "partition",
            "epochs",
            "steps",
            "test_accuracy",
            "samples_per_s",
            "compute_s",
            "comm_s",
            "comm_fraction",
            "wall_s",
            "device",
            "allreduce_path",
        ]
    )
    for r in records:
        compute, comm = r["phases"]["compute"], r["phases"]["comm"]
        writer.writerow(
            [
                r["norm"],
                r["world_size"],
                r["model"],
                r["dataset"],
                r["partition"],
                r["epochs"],
                r["steps"],
                f"{r['test_accuracy']:.6f}",
                f"{r['samples_per_s']:.3f}",
                f"{compute:.6f}",
                f"{comm:.6f}",
                f"{comm_share(compute, comm):.6f}",
                f"{r['wall_s']:.3f}",
                r["device"],
                r["allreduce_path"],
            ]
        )
    return buf.getvalue()


def write_summary(
    out: Path, records: list[dict[str, Any]], config: dict[str, Any], machine: dict[str, Any]
) -> None:
    """summary.json (the record of the run), summary.md and summary.csv, each atomically."""
    write_json(out / "summary.json", {"runs": records, "config": config, "machine": machine})
    k = int(config.get("virtual_ranks") or 1)
    ranks = (
        f"{machine.get('world_size')} ranks"
        if k == 1
        else f"{int(machine.get('world_size') or 0) * k} isolated ranks as {machine.get('world_size')} "
        f"processes x {k} virtual ranks"
    )
    md = [
        f"# disdl-mpi run: {len(records)} scheme(s), {ranks}",
        "",
        markdown_table(TABLE_COLUMNS, table_rows(records), align="r") + "\n",
        "",
        "compute_s and comm_s are rank-mean seconds over the training steps; comm_s is the "
        "exposed gradient allreduce plus the normalization layers' own collectives."
        + (
            f" With {k} virtual ranks per process they are per PROCESS: its compute covers {k} "
            "ranks' batches and it communicates once for them."
            if k > 1
            else ""
        ),
        "",
    ]
    write_text(out / "summary.md", "\n".join(md))
    write_text(out / "summary.csv", csv_text(records))


def write_metrics(path: Path, epochs_log: list[dict[str, Any]]) -> None:
    """Per-epoch metrics.csv of one scheme."""
    buf = io.StringIO()
    if epochs_log:
        writer = csv.DictWriter(buf, fieldnames=list(epochs_log[0]))
        writer.writeheader()
        writer.writerows(epochs_log)
    write_text(path, buf.getvalue())
