"""Shared matplotlib helpers: headless backend, atomic PNG writes, consistent colours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: sweeps run on compute nodes and in CI
import matplotlib.pyplot as plt  # noqa: E402

from disdl_mpi.files import atomic_path  # noqa: E402
from disdl_mpi.observe.timing import BREAKDOWN  # noqa: E402

# Stable colours per phase, so every breakdown plot reads the same way.
PHASE_COLORS = {
    "data": "#8c8c8c",
    "forward": "#4c72b0",
    "backward": "#55a868",
    "optimizer": "#937860",
    "imbalance_wait": "#dd8452",
    "allreduce": "#c44e52",
    "guard": "#da8bc3",
    "norm_comm": "#8172b3",
    "other": "#cccccc",
}


def new_figure(ncols: int = 1, *, width: float = 6.0, height: float = 4.2) -> tuple[Any, Any]:
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def save_png(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def oversubscription_note(ranks: list[int], cores: int) -> str | None:
    """The note every table/plot shows when some rank counts exceed the cores."""
    over = sorted({r for r in ranks if r > cores})
    if not over:
        return None
    return (
        f"oversubscribed: {', '.join(str(r) for r in over)} ranks on {cores} cores "
        f"(ranks share cores; throughput there measures time-slicing, not scaling)"
    )


def mark_oversubscribed(ax: Any, ranks: list[int], cores: int) -> None:
    """Shade the rank counts beyond the core count and label the region."""
    over = [r for r in ranks if r > cores]
    if not over:
        return
    lo = max([r for r in ranks if r <= cores], default=min(over))
    ax.axvspan(
        (lo + min(over)) / 2 if lo < min(over) else min(over) * 0.9,
        max(over) * 1.1,
        color="#f2d0d0",
        alpha=0.5,
        zorder=0,
    )
    ax.text(
        0.99,
        0.02,
        f"oversubscribed: >{cores} ranks on {cores} cores",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=8,
        color="#a03030",
    )


# ---------------------------------------------------------------------------- scaling


def plot_scaling(rows: list[dict], path: str | Path, *, cores: int) -> Path:
    """Throughput and efficiency vs ranks, one line per scheme (rows of scaling.csv)."""
    fig, (ax_t, ax_e) = new_figure(2)
    ranks = sorted({int(r["ranks"]) for r in rows})
    for norm in dict.fromkeys(r["norm"] for r in rows):
        pts = sorted((r for r in rows if r["norm"] == norm), key=lambda r: int(r["ranks"]))
        xs = [int(r["ranks"]) for r in pts]
        ax_t.plot(xs, [float(r["samples_per_s"]) for r in pts], marker="o", label=norm)
        ax_e.plot(xs, [float(r["efficiency"]) for r in pts], marker="o", label=norm)
    if rows:
        base = min(ranks)
        ax_e.plot(ranks, [1.0] * len(ranks), color="black", ls=":", lw=1, label="ideal")
        mode = rows[0].get("mode", "")
        ax_t.set_title(f"Throughput ({mode} scaling)")
        ax_e.set_title(f"Scaling efficiency vs {base} rank(s)")
    for ax in (ax_t, ax_e):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("MPI ranks")
        ax.grid(alpha=0.3)
        mark_oversubscribed(ax, ranks, cores)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("training throughput (samples/s)")
    ax_e.set_ylabel("efficiency (throughput / (base x ranks/base))")
    ax_e.set_ylim(bottom=0)
    return save_png(fig, path)


def plot_breakdown(rows: list[dict], path: str | Path, *, cores: int) -> Path:
    """Stacked per-step phase bars (rank-mean ms per step) for every (ranks, scheme)."""
    fig, (ax,) = new_figure(1, width=max(6.0, 0.7 * len(rows) + 2))
    labels, bottoms = [], [0.0] * len(rows)
    for r in rows:
        over = " *" if int(r["ranks"]) > cores else ""
        labels.append(f"{r['norm']}\n{r['ranks']}r{over}")

    def per_step(r: dict, phase: str) -> float:
        v = float(r.get(f"{phase}_s") or 0.0)
        if phase in ("forward", "backward"):
            # syncbn/bn-recal collectives run inside forward/backward: take their share out
            # (pro rata) so that they show as their own "norm comm" segment.
            fb = float(r.get("forward_s") or 0.0) + float(r.get("backward_s") or 0.0)
            nc = min(fb, float(r.get("norm_comm_s") or 0.0))
            v -= nc * (v / fb) if fb > 0 else 0.0
        return 1e3 * v / max(1.0, float(r["steps"]))

    for phase in BREAKDOWN:
        vals = [per_step(r, phase) for r in rows]
        ax.bar(
            range(len(rows)),
            vals,
            bottom=bottoms,
            color=PHASE_COLORS.get(phase),
            label=phase.replace("_", " "),
        )
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("time per step (ms, rank mean)")
    ax.text(
        0.0,
        -0.28,
        "forward/backward exclude the normalization collectives (norm comm)",
        transform=ax.transAxes,
        fontsize=7,
        color="#555555",
    )
    ax.set_xlabel("scheme / ranks")
    ax.set_title("Where a training step's time goes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    note = oversubscription_note([int(r["ranks"]) for r in rows], cores)
    if note:
        ax.text(0.0, -0.22, "* " + note, transform=ax.transAxes, fontsize=8, color="#a03030")
    return save_png(fig, path)


# ---------------------------------------------------------------------------- cost model


def plot_costmodel(result: dict, curves: dict[str, dict[int, list]], path: str | Path) -> Path:
    """Left: measured allreduce times with the fitted models (``curves``: model -> ranks ->
    [(bytes, seconds)], from the fit); right: projected efficiency."""
    fig, (ax_f, ax_p) = new_figure(2)
    meas = result["measured"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(sorted({m["ranks"] for m in meas})):
        pts = sorted((m for m in meas if m["ranks"] == p), key=lambda m: m["bytes"])
        c = colors[i % len(colors)]
        xs = [m["bytes"] for m in pts]
        ax_f.plot(xs, [m["time_s"] * 1e6 for m in pts], "o", color=c, label=f"measured p={p}")
        for model, ls in (("ring", "-"), ("rabenseifner", "--")):
            line = curves[model][p]
            ax_f.plot(
                [n for n, _ in line],
                [t * 1e6 for _, t in line],
                ls=ls,
                color=c,
                lw=1,
                label=f"{model} fit p={p}",
            )
    ax_f.set_xscale("log", base=2)
    ax_f.set_yscale("log")
    ax_f.set_xlabel("message size (bytes per rank)")
    ax_f.set_ylabel("allreduce time (us)")
    ax_f.set_title(f"Fit to {result['backend']}")
    ax_f.legend(fontsize=7)
    ax_f.grid(alpha=0.3, which="both")
    proj = result.get("projections") or []
    if proj:
        norm = proj[0]["norm"]
        for (network, model), ls in (
            (("measured", "ring"), "-"),
            (("measured", "rabenseifner"), "--"),
            (("target", "ring"), "-."),
            (("target", "rabenseifner"), ":"),
        ):
            pts = [r for r in proj if r["norm"] == norm and r["network"] == network and r["model"] == model]
            ax_p.plot(
                [r["ranks"] for r in pts],
                [r["efficiency"] for r in pts],
                ls=ls,
                label=f"{network} net, {model}",
            )
        t = result["target"]
        measured = [
            m
            for m in result.get("measured_steps", [])
            if m["norm"] == norm and m.get("efficiency") is not None
        ]
        if measured:
            ax_p.plot(
                [m["ranks"] for m in measured],
                [m["efficiency"] for m in measured],
                "ks",
                label="measured (this machine)",
            )
        ax_p.set_xscale("log", base=2)
        ax_p.set_xlabel("MPI ranks")
        ax_p.set_ylabel("projected scaling efficiency")
        top = max([1.0] + [m["efficiency"] for m in measured])
        ax_p.set_ylim(0, top * 1.05)
        ax_p.set_title(
            f"{norm}, {proj[0]['mode']} scaling; target: {t['alpha_us']} us, {t['bandwidth_gbps']} Gb/s",
            fontsize=9,
        )
        ax_p.legend(fontsize=7)
        ax_p.grid(alpha=0.3)
    else:
        ax_p.text(0.5, 0.5, "no scaling data given (--scaling DIR)", ha="center", transform=ax_p.transAxes)
        ax_p.set_axis_off()
    return save_png(fig, path)
