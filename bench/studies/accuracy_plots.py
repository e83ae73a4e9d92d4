"""The accuracy study's figures: accuracy per scheme and partition (bars), curves, the gap heatmap."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.studies.accuracy_report import REFERENCE, cell_stats
from disdl_mpi.files import atomic_path


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def bar_plot(
    path: Path, rows: Sequence[dict], norms: Sequence[str], skews: Sequence[str], title: str
) -> None:
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
        ax.bar(
            x + (j - (len(skews) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=2,
            label=s,
            color=cmap(j / max(1, len(skews) - 1) * 0.9),
        )
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


def curve_plot(path: Path, rows: Sequence[dict], norms: Sequence[str], skew: str, title: str) -> None:
    """Test accuracy vs epoch at one skew: mean over seeds, band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, n in enumerate(norms):
        curves = [r["curve"] for r in rows if r["norm"] == n and r["skew"] == skew and r.get("curve")]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        arr = 100 * np.array([c[:length] for c in curves], dtype=np.float64)
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, arr.mean(axis=0), color=cmap(i % 10), label=n, lw=1.6)
        if len(curves) > 1:
            ax.fill_between(epochs, arr.min(axis=0), arr.max(axis=0), color=cmap(i % 10), alpha=0.15, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="scheme", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def gap_heatmap(
    path: Path, rows: Sequence[dict], norms: Sequence[str], skews: Sequence[str], title: str
) -> None:
    """Scheme x skew grid of the gap to IID-BN in accuracy points, each cell annotated: the
    few-point differences a 0-100 % bar chart flattens. Nothing is drawn without the reference."""
    stats = cell_stats(rows)
    if REFERENCE not in stats:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = stats[REFERENCE][0]
    gap = np.array(
        [[100 * (stats[(n, s)][0] - ref) if (n, s) in stats else np.nan for s in skews] for n in norms]
    )
    span = max(1.0, float(np.nanmax(np.abs(gap)))) if np.isfinite(gap).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.5 * len(skews) + 3, 0.5 * len(norms) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(gap), cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
    for i, n in enumerate(norms):
        for j, s in enumerate(skews):
            if (n, s) not in stats:
                ax.text(j, i, "—", ha="center", va="center", fontsize=9, color="0.4")
                continue
            m, sd, k = stats[(n, s)]
            text = f"{gap[i, j]:+.1f}" + (f"\n±{100 * sd:.1f}" if k > 1 else "")
            dark = abs(gap[i, j]) > 0.6 * span
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(skews)), skews)
    ax.set_yticks(range(len(norms)), norms)
    ax.set_xlabel("partition")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=f"points vs IID-BN ({100 * ref:.1f} %)")
    _save(fig, path)
