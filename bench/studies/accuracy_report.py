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

from disdl_mpi.files import atomic_path, comm_share, markdown_table, write_text

CSV_COLUMNS = ("norm", "skew", "seed", "test_accuracy", "epochs", "wall_s", "ranks",
               "partition_seed", "label_skew_tv", "train_s", "samples_per_s", "compute_s",
               "comm_s", "per_rank_accuracy_min", "per_rank_accuracy_max", "domain_accuracy_mean")
REFERENCE = ("bn", "iid")  # the IID-BatchNorm reference every gap is measured against


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """One row per (norm, skew, seed), in study order."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        pra = r.get("per_rank_accuracy") or []
        w.writerow([r["norm"], r["skew"], r["seed"], f"{r['test_accuracy']:.6f}", r["epochs"],
                    f"{r['wall_s']:.3f}", r["ranks"], r["partition_seed"],
                    f"{r['label_skew_tv']:.4f}", f"{r['train_s']:.3f}",
                    f"{r['samples_per_s']:.1f}", f"{r['compute_s']:.4f}", f"{r['comm_s']:.4f}",
                    f"{min(pra):.6f}" if pra else "", f"{max(pra):.6f}" if pra else "",
                    "" if r.get("domain_accuracy_mean") is None
                    else f"{r['domain_accuracy_mean']:.6f}"])
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


def markdown(rows: Sequence[dict], norms: Sequence[str], skews: Sequence[str],
             header: dict) -> str:
    """accuracy.md: mean ± std per scheme x skew, the gap to IID-BN, the time cost, the skews."""
    stats = cell_stats(rows)
    ref = stats.get(REFERENCE, (math.nan, math.nan, 0))
    tv = cell_stats(rows, "label_skew_tv")
    lines = [f"# Accuracy study: {header['ranks']} ranks, {header['dataset']}, "
             f"model {header['model']}", ""]
    for k in ("command", "date", "machine", "epochs", "seeds", "partition_seeds", "run_args"):
        if header.get(k) not in (None, ""):
            lines.append(f"- {k.replace('_', ' ')}: `{header[k]}`" if k == "command"
                         else f"- {k.replace('_', ' ')}: {header[k]}")
    lines += ["", "Test accuracy (%), mean ± sample std over seeds (n = seeds done); best "
              "scheme per skew in bold.", ""]
    best = {s: max((n for n in norms if (n, s) in stats), key=lambda n: stats[(n, s)][0],
                   default=None) for s in skews}
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
    lines += ["", f"Gap to the IID-BatchNorm reference ({_pct(ref[0])} %, "
              f"n={ref[2]}), in accuracy points (negative = worse than the reference).", ""]
    lines.append(markdown_table(["scheme", *skews], [
        [n, *(f"{100 * (stats[(n, s)][0] - ref[0]):+.1f}" if (n, s) in stats and ref[2] else "—"
              for s in skews)] for n in norms]))
    domain = [r for r in rows if r.get("domain_accuracy_mean") is not None]
    if domain:
        dstats = cell_stats(domain, "domain_accuracy_mean")
        dskews = [s for s in skews if any(r["skew"] == s for r in domain)]
        lines += ["", "Feature shift: mean over ranks of each rank's accuracy on its OWN "
                  "domain's test split (%, mean ± std over seeds); the tables above give the "
                  "accuracy on the union of all domains.", ""]
        lines.append(markdown_table(["scheme", *dskews], [
            [n, *(f"{_pct(dstats[(n, s)][0])} ± {_pct(dstats[(n, s)][1])}"
                  if (n, s) in dstats else "—" for s in dskews)] for n in norms]))
    lines += ["", "Time per scheme, mean over all skews and seeds: `train_s` = the training "
              "steps only (the cost of the scheme), `wall_s` = the run's whole time for the "
              "scheme (training, per-epoch evaluation, model build); `× bn` compares train_s; "
              "comm share = exposed communication / (compute + communication), rank means.", ""]
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
    lines += ["", "Label skew of each partition spec: mean over ranks (weighted by size) of the "
              "total-variation distance between a rank's label histogram and the global one "
              "(0 = IID, 1 = disjoint labels), mean over the partition seeds used.", ""]
    table = []
    for s in skews:
        vals = [v for (n, sk), v in tv.items() if sk == s]
        if vals:
            table.append([s, f"{vals[0][0]:.3f}"])
    lines.append(markdown_table(["skew", "label-skew TV"], table))
    lines += ["", "Best scheme per skew and its distance to the reference:", ""]
    for s in skews:
        if best[s] is None:
            continue
        m = stats[(best[s], s)][0]
        gap = 100 * (m - ref[0]) if ref[2] else math.nan
        within = "" if math.isnan(gap) else (" (within 2 points)" if gap >= -2.0
                                             else " (NOT within 2 points)")
        lines.append(f"- {s}: {best[s]} {_pct(m)} %, gap {gap:+.1f}{within}")
    target = header.get("target_accuracy")
    if target is not None:
        lines += ["", f"Time to {100 * target:.0f} % test accuracy: the first epoch at which a "
                  f"run reached it and that run's wall time then (mean over the seeds that "
                  f"reached it; k/n = seeds that did).", ""]
        reach = time_to_accuracy(rows, target)
        lines.append(markdown_table(["scheme", *skews], [
            [n, *(_reach_cell(reach[(n, s)]) if (n, s) in reach else "—" for s in skews)]
            for n in norms]))
    missing = [(n, s) for n in norms for s in skews if (n, s) not in stats]
    if missing:
        lines += ["", "Missing points: " + ", ".join(f"{n}@{s}" for n, s in missing)]
    return "\n".join(lines) + "\n"


def time_to_accuracy(rows: Sequence[dict], target: float) -> dict[tuple[str, str], list]:
    """(norm, skew) -> one (epoch, wall_s) per seed, or None where the run never reached
    ``target``; read from each run's per-epoch curve."""
    out: dict[tuple[str, str], list] = {}
    for r in rows:
        curve, walls = r.get("curve") or [], r.get("curve_wall_s") or []
        hit = next((i for i, acc in enumerate(curve) if acc >= target), None)
        wall = walls[hit] if hit is not None and hit < len(walls) else math.nan
        out.setdefault((r["norm"], r["skew"]), []).append(
            None if hit is None else (hit + 1, wall))
    return out


def _reach_cell(hits: list) -> str:
    done = [h for h in hits if h is not None]
    if not done:
        return f"not reached (0/{len(hits)})"
    epoch = float(np.mean([h[0] for h in done]))
    wall = float(np.mean([h[1] for h in done]))
    return f"epoch {epoch:.1f}, {wall:.0f} s ({len(done)}/{len(hits)})"


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def bar_plot(path: Path, rows: Sequence[dict], norms: Sequence[str], skews: Sequence[str],
             title: str) -> None:
    """Grouped bars: one group per scheme, one bar per skew, error bars = std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stats = cell_stats(rows)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(norms) + 2), 4.4))
    width = 0.8 / max(1, len(skews))
    x = np.arange(len(norms))
    cmap = plt.get_cmap("viridis")
    for j, s in enumerate(skews):
        means = [100 * stats.get((n, s), (math.nan,))[0] for n in norms]
        stds = [100 * stats.get((n, s), (0, 0))[1] for n in norms]
        ax.bar(x + (j - (len(skews) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=s, color=cmap(j / max(1, len(skews) - 1) * 0.9))
    ref = stats.get(REFERENCE)
    if ref:
        ax.axhline(100 * ref[0], color="crimson", ls="--", lw=1, label="IID-BN reference")
    ax.set_xticks(x, norms)
    ax.set_xlabel("normalization scheme")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    # Outside the axes: inside, it would hide the bars, which reach the top for most schemes.
    ax.legend(title="partition", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def curve_plot(path: Path, rows: Sequence[dict], norms: Sequence[str], skew: str,
               title: str) -> None:
    """Test accuracy vs epoch at one skew: mean over seeds, band = min..max over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, n in enumerate(norms):
        curves = [r["curve"] for r in rows if r["norm"] == n and r["skew"] == skew
                  and r.get("curve")]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        arr = 100 * np.array([c[:length] for c in curves], dtype=np.float64)
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, arr.mean(axis=0), color=cmap(i % 10), label=n, lw=1.6)
        if len(curves) > 1:
            ax.fill_between(epochs, arr.min(axis=0), arr.max(axis=0), color=cmap(i % 10),
                            alpha=0.15, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="scheme", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def gap_heatmap(path: Path, rows: Sequence[dict], norms: Sequence[str], skews: Sequence[str],
                title: str) -> None:
    """Scheme x skew grid of the gap to IID-BN in accuracy points, each cell annotated: the
    few-point differences a 0-100 % bar chart flattens. Nothing is drawn without the reference."""
    stats = cell_stats(rows)
    if REFERENCE not in stats:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ref = stats[REFERENCE][0]
    gap = np.array([[100 * (stats[(n, s)][0] - ref) if (n, s) in stats else np.nan
                     for s in skews] for n in norms])
    span = max(1.0, float(np.nanmax(np.abs(gap)))) if np.isfinite(gap).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.5 * len(skews) + 3, 0.5 * len(norms) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(gap), cmap="RdBu", vmin=-span, vmax=span,
                   aspect="auto")
    for i, n in enumerate(norms):
        for j, s in enumerate(skews):
            if (n, s) not in stats:
                ax.text(j, i, "—", ha="center", va="center", fontsize=9, color="0.4")
                continue
            m, sd, k = stats[(n, s)]
            text = f"{gap[i, j]:+.1f}" + (f"\n±{100 * sd:.1f}" if k > 1 else "")
            dark = abs(gap[i, j]) > 0.6 * span
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(skews)), skews)
    ax.set_yticks(range(len(norms)), norms)
    ax.set_xlabel("partition")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=f"points vs IID-BN ({100 * ref:.1f} %)")
    _save(fig, path)
