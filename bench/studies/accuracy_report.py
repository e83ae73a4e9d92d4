"""The accuracy study's outputs: accuracy.csv, accuracy.md, accuracy.png, curves.png and gap.png.

Input is a list of point rows (one per scheme x skew x seed) as built by ``bench.studies.accuracy``;
every output is written atomically, so a reader (or an interrupted study) never sees half a file.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from disdl_mpi.files import markdown_table, write_text
from disdl_mpi.observe.timing import comm_share

CSV_COLUMNS = (
    "norm",
    "skew",
    "seed",
    "test_accuracy",
    "epochs",
    "wall_s",
    "ranks",
    "partition_seed",
    "label_skew_tv",
    "train_s",
    "samples_per_s",
    "compute_s",
    "comm_s",
    "per_rank_accuracy_min",
    "per_rank_accuracy_max",
    "domain_accuracy_mean",
)
REFERENCE = ("bn", "iid")  # the IID-BatchNorm reference every gap is measured against


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """One row per (norm, skew, seed), in study order."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        pra = r.get("per_rank_accuracy") or []
        w.writerow(
            [
                r["norm"],
                r["skew"],
                r["seed"],
                f"{r['test_accuracy']:.6f}",
                r["epochs"],
                f"{r['wall_s']:.3f}",
                r["ranks"],
                r["partition_seed"],
                f"{r['label_skew_tv']:.4f}",
                f"{r['train_s']:.3f}",
                f"{r['samples_per_s']:.1f}",
                f"{r['compute_s']:.4f}",
                f"{r['comm_s']:.4f}",
                f"{min(pra):.6f}" if pra else "",
                f"{max(pra):.6f}" if pra else "",
                "" if r.get("domain_accuracy_mean") is None else f"{r['domain_accuracy_mean']:.6f}",
            ]
        )
    write_text(path, buf.getvalue())


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for a single value) and count."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def cell_stats(rows: Sequence[dict], key: str = "test_accuracy") -> dict[tuple[str, str], tuple]:
    """(norm, skew) -> (mean, std, n) of ``key`` over seeds."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["norm"], r["skew"]), []).append(float(r[key]))
    return {k: mean_std(v) for k, v in groups.items()}


def strongest_skew(rows: Sequence[dict], skews: Sequence[str]) -> Optional[str]:
    """The skew whose partitions are furthest from IID (largest mean label-skew TV distance)."""
    tv: dict[str, list[float]] = {}
    for r in rows:
        tv.setdefault(r["skew"], []).append(float(r["label_skew_tv"]))
    present = [s for s in skews if s in tv]
    return max(present, key=lambda s: float(np.mean(tv[s])), default=None)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def markdown(rows: Sequence[dict], norms: Sequence[str], skews: Sequence[str], header: dict) -> str:
    """accuracy.md: mean ± std per scheme x skew, the gap to IID-BN, the time cost, the skews."""
    stats = cell_stats(rows)
    ref = stats.get(REFERENCE, (math.nan, math.nan, 0))
    best = {
        s: max((n for n in norms if (n, s) in stats), key=lambda n: stats[(n, s)][0], default=None)
        for s in skews
    }
    lines = _header_lines(header)
    lines += _accuracy_lines(stats, ref, best, norms, skews)
    lines += _domain_lines(rows, norms, skews)
    lines += _time_lines(rows, norms)
    lines += _skew_lines(rows, skews)
    lines += _best_lines(stats, ref, best, skews)
    if header.get("target_accuracy") is not None:
        lines += _reach_lines(rows, header["target_accuracy"], norms, skews)
    missing = [(n, s) for n in norms for s in skews if (n, s) not in stats]
    if missing:
        lines += ["", "Missing points: " + ", ".join(f"{n}@{s}" for n, s in missing)]
    return "\n".join(lines) + "\n"


def _header_lines(header: dict) -> list[str]:
    lines = [f"# Accuracy study: {header['ranks']} ranks, {header['dataset']}, model {header['model']}", ""]
    keys = ("command", "date", "machine", "processes", "layouts")
    keys += ("epochs", "seeds", "partition_seeds", "run_args")
    for k in keys:
        if header.get(k) not in (None, ""):
            lines.append(
                f"- {k.replace('_', ' ')}: `{header[k]}`"
                if k == "command"
                else f"- {k.replace('_', ' ')}: {header[k]}"
            )
    return lines


def _accuracy_lines(
    stats: dict, ref: tuple, best: dict, norms: Sequence[str], skews: Sequence[str]
) -> list[str]:
    """Mean ± std per scheme and skew (the best in bold), then the gap to the IID-BN reference."""
    lines = [
        "",
        "Test accuracy (%), mean ± sample std over seeds (n = seeds done); best scheme per skew in bold.",
        "",
    ]
    table = []
    for n in norms:
        cells = []
        for s in skews:
            if (n, s) not in stats:
                cells.append("—")
                continue
            m, sd, k = stats[(n, s)]
            text = f"{_pct(m)} ± {_pct(sd)} (n={k})" if k > 1 else f"{_pct(m)} (n=1)"
            cells.append(f"**{text}**" if best[s] == n else text)
        table.append([n, *cells])
    lines.append(markdown_table(["scheme", *skews], table))
    lines += [
        "",
        f"Gap to the IID-BatchNorm reference ({_pct(ref[0])} %, "
        f"n={ref[2]}), in accuracy points (negative = worse than the reference).",
        "",
    ]
    gaps = [
        [
            n,
            *(
                f"{100 * (stats[(n, s)][0] - ref[0]):+.1f}" if (n, s) in stats and ref[2] else "—"
                for s in skews
            ),
        ]
        for n in norms
    ]
    lines.append(markdown_table(["scheme", *skews], gaps))
    return lines


def _domain_lines(rows: Sequence[dict], norms: Sequence[str], skews: Sequence[str]) -> list[str]:
    """Feature shift only: each rank's accuracy on its own domain's test split."""
    domain = [r for r in rows if r.get("domain_accuracy_mean") is not None]
    if not domain:
        return []
    dstats = cell_stats(domain, "domain_accuracy_mean")
    dskews = [s for s in skews if any(r["skew"] == s for r in domain)]
    lines = [
        "",
        "Feature shift: mean over ranks of each rank's accuracy on its OWN "
        "domain's test split (%, mean ± std over seeds); the tables above give the "
        "accuracy on the union of all domains.",
        "",
    ]
    table = [
        [
            n,
            *(
                f"{_pct(dstats[(n, s)][0])} ± {_pct(dstats[(n, s)][1])}" if (n, s) in dstats else "—"
                for s in dskews
            ),
        ]
        for n in norms
    ]
    lines.append(markdown_table(["scheme", *dskews], table))
    return lines


def _time_lines(rows: Sequence[dict], norms: Sequence[str]) -> list[str]:
    """Time per scheme: training only, whole run, against bn, and the communication share."""
    lines = [
        "",
        "Time per scheme, mean over all skews and seeds: `train_s` = the training "
        "steps only (the cost of the scheme), `wall_s` = the run's whole time for the "
        "scheme (training, per-epoch evaluation, model build); `× bn` compares train_s; "
        "comm share = exposed communication / (compute + communication), rank means.",
        "",
    ]
    table = []
    per_norm = {n: [r for r in rows if r["norm"] == n] for n in norms}
    bn_train = mean_std(r["train_s"] for r in per_norm.get("bn", []))[0]
    for n in norms:
        if not per_norm[n]:
            continue
        t = mean_std(r["train_s"] for r in per_norm[n])[0]
        w = mean_std(r["wall_s"] for r in per_norm[n])[0]
        comm = sum(r["comm_s"] for r in per_norm[n])
        comp = sum(r["compute_s"] for r in per_norm[n])
        share = f"{100 * comm_share(comp, comm):.0f} %" if comm + comp > 0 else "n/a"
        ratio = f"{t / bn_train:.2f}" if bn_train and not math.isnan(bn_train) else "n/a"
        table.append([n, f"{t:.1f}", ratio, f"{w:.1f}", share])
    lines.append(markdown_table(["scheme", "train_s", "× bn", "wall_s", "comm share"], table))
    return lines


def _skew_lines(rows: Sequence[dict], skews: Sequence[str]) -> list[str]:
    """How skewed each partition spec's labels are (total-variation distance)."""
    tv = cell_stats(rows, "label_skew_tv")
    lines = [
        "",
        "Label skew of each partition spec: mean over ranks (weighted by size) of the "
        "total-variation distance between a rank's label histogram and the global one "
        "(0 = IID, 1 = disjoint labels), mean over the partition seeds used.",
        "",
    ]
    table = []
    for s in skews:
        vals = [v for (n, sk), v in tv.items() if sk == s]
        if vals:
            table.append([s, f"{vals[0][0]:.3f}"])
    lines.append(markdown_table(["skew", "label-skew TV"], table))
    return lines


def _best_lines(stats: dict, ref: tuple, best: dict, skews: Sequence[str]) -> list[str]:
    lines = ["", "Best scheme per skew and its distance to the reference:", ""]
    for s in skews:
        if best[s] is None:
            continue
        m = stats[(best[s], s)][0]
        gap = 100 * (m - ref[0]) if ref[2] else math.nan
        within = (
            "" if math.isnan(gap) else (" (within 2 points)" if gap >= -2.0 else " (NOT within 2 points)")
        )
        lines.append(f"- {s}: {best[s]} {_pct(m)} %, gap {gap:+.1f}{within}")
    return lines


def _reach_lines(
    rows: Sequence[dict], target: float, norms: Sequence[str], skews: Sequence[str]
) -> list[str]:
    lines = [
        "",
        f"Time to {100 * target:.0f} % test accuracy: the first epoch at which a "
        f"run reached it and that run's wall time then (mean over the seeds that "
        f"reached it; k/n = seeds that did).",
        "",
    ]
    reach = time_to_accuracy(rows, target)
    table = [[n, *(_reach_cell(reach[(n, s)]) if (n, s) in reach else "—" for s in skews)] for n in norms]
    lines.append(markdown_table(["scheme", *skews], table))
    return lines


def time_to_accuracy(rows: Sequence[dict], target: float) -> dict[tuple[str, str], list]:
    """(norm, skew) -> one (epoch, wall_s) per seed, or None where the run never reached
    ``target``; read from each run's per-epoch curve."""
    out: dict[tuple[str, str], list] = {}
    for r in rows:
        curve, walls = r.get("curve") or [], r.get("curve_wall_s") or []
        hit = next((i for i, acc in enumerate(curve) if acc >= target), None)
        wall = walls[hit] if hit is not None and hit < len(walls) else math.nan
        out.setdefault((r["norm"], r["skew"]), []).append(None if hit is None else (hit + 1, wall))
    return out


def _reach_cell(hits: list) -> str:
    done = [h for h in hits if h is not None]
    if not done:
        return f"not reached (0/{len(hits)})"
    epoch = float(np.mean([h[0] for h in done]))
    wall = float(np.mean([h[1] for h in done]))
    return f"epoch {epoch:.1f}, {wall:.0f} s ({len(done)}/{len(hits)})"
