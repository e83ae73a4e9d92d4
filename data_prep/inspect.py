"""Describe a partition: sizes, class histograms, skew metrics, and a heatmap PNG.

``python -m data_prep.inspect DIR`` reads only ``DIR/partition.json`` (which holds every
rank's class histogram) and writes ``DIR/partition.png`` (ranks x classes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from disdl_mpi.data.layout import MANIFEST
from disdl_mpi.files import atomic_path, write_json
from disdl_mpi.options import add_json


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=-1)


def skew_metrics(counts: np.ndarray) -> dict:
    """Per-rank label entropy (bits), total variation and Jensen-Shannon divergence (bits)
    of each rank's label distribution from the global one, plus size imbalance."""
    counts = np.asarray(counts, dtype=np.float64)
    sizes = counts.sum(axis=1)
    glob = counts.sum(axis=0) / max(1.0, counts.sum())
    p = np.divide(counts, sizes[:, None], out=np.zeros_like(counts), where=sizes[:, None] > 0)
    tv = 0.5 * np.abs(p - glob[None, :]).sum(axis=1)
    mid = 0.5 * (p + glob[None, :])
    js = _entropy_bits(mid) - 0.5 * (_entropy_bits(p) + _entropy_bits(glob[None, :]))
    empty = sizes == 0
    tv[empty] = np.nan
    js[empty] = np.nan
    ent = _entropy_bits(p)
    ent[empty] = np.nan
    mean = sizes.mean() if len(sizes) else 0.0
    return {
        "sizes": sizes.astype(int).tolist(),
        "classes_per_rank": (counts > 0).sum(axis=1).astype(int).tolist(),
        "entropy_bits": ent.tolist(),
        "global_entropy_bits": float(_entropy_bits(glob)),
        "tv_distance": tv.tolist(),
        "js_divergence_bits": np.maximum(js, 0.0).tolist(),
        "mean_tv": float(np.nanmean(tv)) if (~empty).any() else float("nan"),
        "max_tv": float(np.nanmax(tv)) if (~empty).any() else float("nan"),
        "size_max_over_mean": float(sizes.max() / mean) if mean > 0 else float("nan"),
        "empty_ranks": int(empty.sum()),
    }


def load_counts(data_dir: Path) -> tuple[dict, np.ndarray]:
    manifest = json.loads((data_dir / MANIFEST).read_text())
    counts = np.array([e["class_counts"] for e in manifest["ranks"]], dtype=np.int64)
    return manifest, counts.reshape(len(manifest["ranks"]), manifest["num_classes"])


def format_report(manifest: dict, counts: np.ndarray, metrics: dict, max_cols: int = 20) -> str:
    n, c = counts.shape
    lines = [
        f"{manifest['dataset']} {manifest['scheme']} seed {manifest['seed']}: "
        f"{int(counts.sum())} training samples, {n} ranks, {c} classes, "
        f"{manifest['test']['size']} test samples",
        f"global label entropy {metrics['global_entropy_bits']:.3f} bits; mean TV "
        f"{metrics['mean_tv']:.3f}, max TV {metrics['max_tv']:.3f}; largest rank / mean "
        f"size {metrics['size_max_over_mean']:.2f}; empty ranks {metrics['empty_ranks']}",
    ]
    show = c <= max_cols
    head = f"{'rank':>5} {'size':>8} {'cls':>4} {'H(bits)':>8} {'TV':>6} {'JS':>6}"
    if show:
        head += " | " + " ".join(f"{k:>5}" for k in range(c))
    lines.append(head)
    for r in range(n):
        row = (
            f"{r:>5} {metrics['sizes'][r]:>8} {metrics['classes_per_rank'][r]:>4} "
            f"{metrics['entropy_bits'][r]:>8.3f} {metrics['tv_distance'][r]:>6.3f} "
            f"{metrics['js_divergence_bits'][r]:>6.3f}"
        )
        if show:
            row += " | " + " ".join(f"{v:>5}" for v in counts[r])
        lines.append(row)
    if not show:
        lines.append(f"({c} classes: the per-class histogram is in partition.png)")
    return "\n".join(lines)


def plot_heatmap(manifest: dict, counts: np.ndarray, path: Path) -> None:
    """Ranks x classes heatmap of sample counts, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, c = counts.shape
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.35 * c), min(16, 2 + 0.3 * n)))
    im = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("rank")
    ax.set_title(f"{manifest['dataset']} {manifest['scheme']} ({n} ranks, seed {manifest['seed']})")
    if c <= 30:
        ax.set_xticks(range(c))
    if n <= 40:
        ax.set_yticks(range(n))
    fig.colorbar(im, ax=ax, label="training samples")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.inspect",
        description="Sizes, class histograms and skew metrics of a partition; writes DIR/partition.png",
    )
    p.add_argument("dir", type=Path, help="partition folder (with partition.json)")
    p.add_argument("--png", type=Path, help="heatmap path (default DIR/partition.png)")
    add_json(p, "also write the metrics to this JSON file")
    args = p.parse_args(argv)
    try:
        manifest, counts = load_counts(args.dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {args.dir / MANIFEST}: not a readable partition manifest ({exc})", file=sys.stderr)
        return 2
    metrics = skew_metrics(counts)
    png = args.png or args.dir / "partition.png"
    plot_heatmap(manifest, counts, png)
    print(format_report(manifest, counts, metrics))
    print(f"heatmap: {png}")
    if args.json_path:
        write_json(args.json_path, metrics)
        print(f"metrics: {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
