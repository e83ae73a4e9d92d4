"""One report from any mix of results folders.

    python -m bench.studies.report DIR [DIR ...] [--out OUT]

Finds, under each DIR: run summaries (summary.json), scaling sweeps (scaling.csv), accuracy
studies (accuracy.csv/.md), ``bench.allreduce --json`` files and cost-model outputs
(costmodel.json). Writes OUT/report.md (OUT = first DIR by default; images linked) and
OUT/report.html (self-contained: images inlined as base64 PNG). When allreduce results exist
but no cost model, the cost model is fitted into OUT/costmodel first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bench.studies.report_html import markdown_to_html
from bench.studies.report_machine import machine_rows
from disdl_mpi.files import markdown_table, write_text
from disdl_mpi.observe.timing import DISJOINT, comm_share

# Folders of results trees that hold inputs or bulk data, never results to report.
SKIP_DIRS = {"data", "points", "logs", "runs", "__pycache__", ".git"}
NOT_ALLREDUCE = {
    "summary.json",
    "scaling.json",
    "costmodel.json",
    "points.json",
    "partition.json",
    "report.json",
}
MAX_JSON_BYTES = 5 << 20


@dataclass
class Found:
    runs: list[Path] = field(default_factory=list)
    scaling: list[Path] = field(default_factory=list)
    accuracy: list[Path] = field(default_factory=list)
    allreduce: list[Path] = field(default_factory=list)
    costmodel: list[Path] = field(default_factory=list)
    network: list[Path] = field(default_factory=list)

    def empty(self) -> bool:
        return not any((self.runs, self.scaling, self.accuracy, self.allreduce, self.costmodel, self.network))


def _is_allreduce(path: Path) -> bool:
    if path.name in NOT_ALLREDUCE or path.stat().st_size > MAX_JSON_BYTES:
        return False
    from bench.studies.costmodel_inputs import CostModelError, load_allreduce

    try:
        return bool(load_allreduce([path]))
    except CostModelError:
        return False


def discover(dirs: list[Path]) -> Found:
    """Walk each folder (or take each file) and classify what it holds."""
    found = Found()
    seen: set[Path] = set()

    def add(lst: list[Path], p: Path) -> None:
        rp = p.resolve()
        if rp not in seen:
            seen.add(rp)
            lst.append(p)

    for d in dirs:
        if d.is_file():
            if d.name == "summary.json":
                add(found.runs, d)
            elif d.suffix == ".json" and _is_allreduce(d):
                add(found.allreduce, d)
            continue
        for root, subdirs, files in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if s not in SKIP_DIRS)
            rp = Path(root)
            if "scaling.csv" in files:
                add(found.scaling, rp)
            if "accuracy.csv" in files or "accuracy.md" in files:
                add(found.accuracy, rp)
            if "costmodel.json" in files:
                add(found.costmodel, rp)
            if "network.md" in files:
                add(found.network, rp)
            if "summary.json" in files:
                add(found.runs, rp / "summary.json")
            for f in sorted(files):
                if f.endswith(".json") and _is_allreduce(rp / f):
                    add(found.allreduce, rp / f)
    return found


def _demote(md: str, levels: int = 2) -> str:
    """Headings of an embedded Markdown file, pushed under the report's own sections."""
    return re.sub(r"^(#{1,6})(?=\s)", lambda m: "#" * min(6, len(m.group(1)) + levels), md, flags=re.M)


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path.resolve(), base.resolve())


def _image(md: list[str], path: Path, base: Path, caption: str) -> None:
    if path.exists():
        md += [f"![{caption}]({_rel(path, base)})", ""]


def _run_section(path: Path) -> tuple[list[str], dict, set[str]]:
    summary = json.loads(path.read_text())
    runs = summary.get("runs", [])
    machine = summary.get("machine", {})
    md = [f"### Run `{path.parent}`", ""]
    if not runs:
        return md + ["(no finished schemes)", ""], machine, set()
    rows = []
    for r in runs:
        ph, steps = r.get("phases", {}), max(1, r.get("steps") or 1)
        ms = lambda k: 1e3 * ph.get(k, 0.0) / steps  # noqa: B023 (used in this iteration)
        share = comm_share(ph.get("compute", 0.0), ph.get("comm", 0.0))
        rows.append(
            [
                r["norm"],
                r.get("world_size"),
                f"{r.get('test_accuracy', 0):.4f}",
                f"{r.get('samples_per_s', 0):.0f}",
                f"{ms('step'):.2f}",
                f"{ms('compute'):.2f}",
                f"{ms('comm'):.2f}",
                f"{100 * share:.1f}",
                f"{ms('imbalance_wait'):.2f}",
            ]
        )
    md += [
        markdown_table(
            [
                "scheme",
                "ranks",
                "test acc",
                "samples/s",
                "step ms",
                "compute ms",
                "comm ms",
                "comm %",
                "wait ms",
            ],
            rows,
        )
    ]
    rows = []
    for r in runs:
        det, steps = r.get("phases_detail", {}), max(1, r.get("steps") or 1)
        cells = []
        for k in DISJOINT:
            d = det.get(k)
            cells.append(
                "–"
                if not d
                else "{:.2f} / {:.2f} / {:.2f}".format(*(1e3 * d[s] / steps for s in ("min", "mean", "max")))
            )
        rows.append([r["norm"], *cells])
    md += [
        "",
        "Per-phase time per step across ranks (ms, min / mean / max):",
        "",
        markdown_table(["scheme", *(p.replace("_", " ") for p in DISJOINT)], rows),
    ]
    methods = sorted({r.get("imbalance_method", "derived") for r in runs})
    md += ["", f"Imbalance wait: {', '.join(methods)} (see disdl_mpi/observe/timing.py).", ""]
    return md, machine, {r.get("allreduce_path") for r in runs if r.get("allreduce_path")}


def _allreduce_section(paths: list[Path]) -> list[str]:
    from bench.studies.costmodel_inputs import load_allreduce

    samples = load_allreduce(paths)
    rows = [
        [
            s.backend,
            s.ranks,
            s.bytes,
            f"{s.time_s * 1e6:.1f}",
            f"{s.bytes / s.time_s / 1e9 if s.time_s > 0 else 0:.3f}",
        ]
        for s in sorted(samples, key=lambda s: (s.backend, s.ranks, s.bytes))
    ]
    md = [markdown_table(["backend", "ranks", "bytes", "time (us)", "algorithm bandwidth (GB/s)"], rows)]
    return md + ["", "Files: " + ", ".join(f"`{p}`" for p in paths), ""]


def build(dirs: list[Path], out: Path) -> tuple[Path, Path]:
    """Write out/report.md and out/report.html; returns both paths."""
    found = discover(dirs)
    if found.empty():
        raise FileNotFoundError(
            "no results found under "
            + ", ".join(map(str, dirs))
            + " (looked for summary.json, scaling.csv, accuracy.csv, "
            "allreduce JSON, costmodel.json)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if found.allreduce and not found.costmodel:
        found.costmodel.append(_fit_costmodel(found, out / "costmodel"))
    body: list[str] = []
    machine: dict[str, Any] = {}
    machine_src = ""
    paths: set[str] = set()
    if found.runs:
        body += ["## Training runs", ""]
        for p in found.runs:
            md, m, ps = _run_section(p)
            body += md
            paths |= ps
            if m and not machine:
                machine, machine_src = m, str(p)
    if found.scaling:
        body += ["## Scaling", ""]
        for d in found.scaling:
            meta = json.loads((d / "scaling.json").read_text()) if (d / "scaling.json").exists() else {}
            if meta.get("machine") and not machine:
                machine, machine_src = meta["machine"], str(d / "scaling.json")
            paths |= {r.get("allreduce_path") for r in meta.get("rows", []) if r.get("allreduce_path")}
            if meta.get("command"):
                body += ["Command: `" + shlex.join(["python", *meta["command"][1:]]) + "`", ""]
            body += [
                _demote((d / "scaling.md").read_text())
                if (d / "scaling.md").exists()
                else f"(no scaling.md in {d})",
                "",
            ]
            _image(body, d / "scaling.png", out, f"Throughput and efficiency vs ranks ({d})")
            _image(body, d / "breakdown.png", out, f"Per-step phase breakdown ({d})")
    if found.accuracy:
        body += ["## Accuracy", ""]
        for d in found.accuracy:
            if (d / "accuracy.md").exists():
                body += [_demote((d / "accuracy.md").read_text()), ""]
            _image(body, d / "accuracy.png", out, f"Test accuracy per scheme ({d})")
            _image(body, d / "curves.png", out, f"Accuracy curves ({d})")
    if found.network:
        body += ["## Network (emulated cluster)", ""]
        for d in found.network:
            body += [_demote((d / "network.md").read_text()), ""]
    if found.allreduce:
        body += ["## Allreduce measurements", ""] + _allreduce_section(found.allreduce)
    if found.costmodel:
        body += ["## Cost model and projection", ""]
        for d in found.costmodel:
            if (d / "costmodel.md").exists():
                body += [_demote((d / "costmodel.md").read_text()), ""]
            _image(
                body, d / "costmodel.png", out, f"Allreduce fit (left) and projected efficiency (right) ({d})"
            )
    head = [
        "# disdl-mpi report",
        "",
        f"Built {time.strftime('%Y-%m-%d %H:%M %Z')} from: " + ", ".join(f"`{d}`" for d in dirs) + ".",
        "",
        "## Machine",
        "",
    ]
    if machine:
        head += [markdown_table(["", ""], machine_rows(machine, paths, machine_src), align="l")]
    else:
        head += ["No run summary with machine information was found."]
    text = "\n".join(head + [""] + body) + "\n"
    md_path, html_path = out / "report.md", out / "report.html"
    write_text(md_path, text)
    write_text(html_path, markdown_to_html(text, out, "disdl-mpi report"))
    return md_path, html_path


def _fit_costmodel(found: Found, target: Path) -> Path:
    """Fit the cost model from the allreduce files found (with the first scaling sweep)."""
    from bench.studies.costmodel import fit_and_project

    fit_and_project(found.allreduce, target, scaling=found.scaling[0] if found.scaling else None)
    return target


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.studies.report",
        description="Build report.md and a self-contained report.html from results folders.",
    )
    p.add_argument("dirs", nargs="+", type=Path, help="results folders or files")
    p.add_argument("--out", type=Path, help="where to write (default: the first DIR)")
    args = p.parse_args(argv)
    missing = [d for d in args.dirs if not d.exists()]
    if missing:
        print(f"error: no such folder or file: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    out = args.out or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent)
    try:
        md, html_path = build(args.dirs, out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # bad inputs: name the problem, never a traceback wall
        from bench.studies.costmodel_inputs import CostModelError

        if isinstance(exc, (CostModelError, json.JSONDecodeError, KeyError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    print(f"wrote {md} and {html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
