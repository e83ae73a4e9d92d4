"""Alpha-beta(-gamma) cost model of allreduce, fitted to measurements and projected to scale.

    python -m bench.studies.costmodel --allreduce A.json [B.json ...] [--scaling DIR]
        [--alpha-us 1.5 --bandwidth-gbps 200] --out DIR

Models for an allreduce of n bytes over p ranks (alpha: latency per message, beta: seconds per
byte, gamma: reduction seconds per byte, optional):

    ring          T = 2(p-1) alpha + 2(p-1)/p n beta [+ (p-1)/p n gamma]
    rabenseifner  T = 2 log2(p) alpha + 2(p-1)/p n beta [+ (p-1)/p n gamma]

The fit minimises the *relative* squared error (timings span orders of magnitude) with
non-negative coefficients. Step-time projection (per scheme, from a measured scaling sweep):

    step(p) = compute(p) + T_allreduce(p, gradient bytes)

compute(p) is the measured per-step time minus its allreduce and imbalance wait at the smallest
measured rank count (weak scaling: constant; strong: divided by p/p0). Communication is assumed
NOT to overlap compute, so the projected efficiency is a lower bound for an overlapping reducer.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy.optimize import nnls

from bench.studies.costmodel_inputs import (
    CostModelError,
    Measured,
    Sample,
    load_allreduce,
    load_scaling,
    pick_backend,
)
from disdl_mpi.files import markdown_table, write_json, write_text

MODELS = ("ring", "rabenseifner")
DEFAULT_PROJECT_RANKS = (16, 32, 64, 128, 256, 512, 1024)


def terms(model: str, p: int, n: float) -> tuple[float, float, float]:
    """Coefficients of (alpha, beta, gamma) in the model's time for p ranks, n bytes."""
    if p <= 1:
        return 0.0, 0.0, 0.0  # nothing to exchange
    frac = (p - 1) / p
    if model == "ring":
        return 2.0 * (p - 1), 2.0 * frac * n, frac * n
    if model == "rabenseifner":
        return 2.0 * math.log2(p), 2.0 * frac * n, frac * n
    raise CostModelError(f"unknown model {model!r}; known: {', '.join(MODELS)}")


def predict(model: str, p: int, n: float, alpha: float, beta: float, gamma: float = 0.0) -> float:
    a, b, g = terms(model, p, n)
    return a * alpha + b * beta + g * gamma


@dataclass
class Fit:
    model: str
    backend: str
    alpha_s: float
    beta_s_per_byte: float
    gamma_s_per_byte: float
    samples: int
    # per rank count: mean and max relative error |model - measured| / measured
    errors: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def bandwidth_gbps(self) -> float:
        """Effective link bandwidth implied by beta, in Gbit/s."""
        return 8.0 / self.beta_s_per_byte / 1e9 if self.beta_s_per_byte > 0 else math.inf

    def predict(self, p: int, n: float) -> float:
        return predict(self.model, p, n, self.alpha_s, self.beta_s_per_byte, self.gamma_s_per_byte)


def fit(samples: list[Sample], model: str, *, with_gamma: bool = False) -> Fit:
    """Fit alpha, beta (and gamma) to samples with p >= 2, minimising relative error."""
    use = [s for s in samples if s.ranks >= 2 and s.time_s > 0]
    if len(use) < 2:
        raise CostModelError(f"{model} fit needs at least 2 measurements at >= 2 ranks, got {len(use)}")
    rows = np.array([terms(model, s.ranks, s.bytes) for s in use])
    if not with_gamma:
        rows = rows[:, :2]
    t = np.array([s.time_s for s in use])
    # Divide each equation by its measured time: minimises relative, not absolute, error.
    coef, _ = nnls(rows / t[:, None], np.ones_like(t))
    alpha, beta = float(coef[0]), float(coef[1])
    gamma = float(coef[2]) if with_gamma else 0.0
    result = Fit(model, use[0].backend, alpha, beta, gamma, len(use))
    for p in sorted({s.ranks for s in use}):
        rel = [abs(result.predict(s.ranks, s.bytes) - s.time_s) / s.time_s for s in use if s.ranks == p]
        result.errors[str(p)] = {
            "mean_rel": float(np.mean(rel)),
            "max_rel": float(np.max(rel)),
            "points": len(rel),
        }
    return result


# ---------------------------------------------------------------------------- inputs


# ---------------------------------------------------------------------------- projection


def project(
    base: Measured,
    ranks: Iterable[int],
    *,
    model: str,
    alpha: float,
    beta: float,
    gamma: float = 0.0,
    grad_bytes: Optional[int] = None,
) -> list[dict[str, float]]:
    """Projected step time, throughput and efficiency relative to ``base`` at each p."""
    n = grad_bytes or base.grad_bytes
    p0 = base.ranks
    per_rank_samples = base.samples_per_s * base.step_s / p0  # samples per rank per step (p0)

    def step_at(p: int) -> tuple[float, float, float]:
        compute = base.compute_s * (p0 / p if base.mode == "strong" else 1.0)
        comm = predict(model, p, n, alpha, beta, gamma)
        return compute, comm, compute + comm

    _, _, step0 = step_at(p0)
    rows = []
    for p in ranks:
        compute, comm, step = step_at(p)
        if base.mode == "strong":
            samples_per_step = per_rank_samples * p0  # fixed global batch
        else:
            samples_per_step = per_rank_samples * p
        thr = samples_per_step / step
        thr0 = per_rank_samples * p0 / step0
        rows.append(
            {
                "ranks": p,
                "compute_s": compute,
                "allreduce_s": comm,
                "step_s": step,
                "samples_per_s": thr,
                "efficiency": thr / (thr0 * p / p0),
                "comm_fraction": comm / step if step > 0 else 0.0,
            }
        )
    return rows


def target_beta(bandwidth_gbps: float) -> float:
    """Seconds per byte of a link of ``bandwidth_gbps`` Gbit/s."""
    return 8.0 / (bandwidth_gbps * 1e9)


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.studies.costmodel",
        description="Fit alpha-beta allreduce models to bench.allreduce results and project "
        "step time and scaling efficiency to large rank counts.",
    )
    p.add_argument(
        "--allreduce",
        nargs="+",
        required=True,
        type=Path,
        help="bench.allreduce --json result files (any rank counts >= 2)",
    )
    p.add_argument(
        "--scaling",
        type=Path,
        help="a bench.studies.scaling results folder (for compute time per step and gradient bytes)",
    )
    p.add_argument("--backend", help="which measured backend to fit (default: the raw MPI one)")
    p.add_argument("--gamma", action="store_true", help="also fit a reduction term gamma")
    p.add_argument(
        "--alpha-us", type=float, default=1.5, help="target network latency per message, microseconds"
    )
    p.add_argument(
        "--bandwidth-gbps",
        type=float,
        default=200.0,
        help="target network bandwidth per link, Gbit/s (200 = HDR InfiniBand)",
    )
    p.add_argument(
        "--ranks", type=int, nargs="+", default=list(DEFAULT_PROJECT_RANKS), help="rank counts to project to"
    )
    p.add_argument(
        "--grad-bytes", type=int, help="gradient bytes per step (default: grad_bytes of the scaling runs)"
    )
    p.add_argument("--out", type=Path, required=True)
    return p


def fit_and_project(
    allreduce: Sequence[Path],
    out: Path,
    *,
    scaling: Optional[Path] = None,
    backend: Optional[str] = None,
    gamma: bool = False,
    alpha_us: float = 1.5,
    bandwidth_gbps: float = 200.0,
    ranks: Sequence[int] = DEFAULT_PROJECT_RANKS,
    grad_bytes: Optional[int] = None,
) -> dict[str, Any]:
    """Fit both models to the ``bench.allreduce`` files, project the ``scaling`` sweep's steps
    (if given) to ``ranks`` on this machine and on the target network; write
    OUT/costmodel.json, .md and .png; return the result."""
    samples = load_allreduce(list(allreduce))
    backend = pick_backend(samples, backend)
    chosen = [s for s in samples if s.backend == backend]
    fits = {m: fit(chosen, m, with_gamma=gamma) for m in MODELS}
    result: dict[str, Any] = {
        "inputs": [str(p) for p in allreduce],
        "backend": backend,
        "backends": sorted({s.backend for s in samples}),
        "measured": [asdict(s) for s in chosen],
        "fits": {m: {**asdict(f), "bandwidth_gbps": f.bandwidth_gbps} for m, f in fits.items()},
        "target": {"alpha_us": alpha_us, "bandwidth_gbps": bandwidth_gbps},
        "projections": [],
        "measured_steps": [],
    }
    if scaling:
        measured = load_scaling(scaling)
        result["scaling"] = str(scaling)
        result["measured_steps"] = [asdict(m) for m in measured]
        for norm in dict.fromkeys(m.norm for m in measured):
            pts = sorted((m for m in measured if m.norm == norm), key=lambda m: m.ranks)
            base = pts[0]
            at = sorted(set(ranks) | {m.ranks for m in pts})
            for network, alpha, beta, gamma in (
                ("measured", None, None, None),
                ("target", alpha_us * 1e-6, target_beta(bandwidth_gbps), 0.0),
            ):
                for m in MODELS:
                    f = fits[m]
                    a = f.alpha_s if alpha is None else alpha
                    b = f.beta_s_per_byte if beta is None else beta
                    g = f.gamma_s_per_byte if gamma is None else gamma
                    for row in project(base, at, model=m, alpha=a, beta=b, gamma=g, grad_bytes=grad_bytes):
                        result["projections"].append(
                            {
                                "norm": norm,
                                "network": network,
                                "model": m,
                                "mode": base.mode,
                                "base_ranks": base.ranks,
                                **row,
                            }
                        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "costmodel.json", result)
    write_text(out / "costmodel.md", markdown(result))
    from bench.studies.plots import plot_costmodel  # matplotlib only when writing

    plot_costmodel(result, fitted_curves(chosen, fits), out / "costmodel.png")
    return result


def fitted_curves(samples: list[Sample], fits: dict[str, Fit]) -> dict[str, dict[int, list]]:
    """model -> ranks -> [(bytes, seconds)] of the fit at every measured size: what the plot
    draws next to the measurements (it needs no cost model of its own)."""
    sizes = {
        p: sorted({float(s.bytes) for s in samples if s.ranks == p})
        for p in sorted({s.ranks for s in samples})
    }
    return {
        m: {p: [(n, f.predict(p, n)) for n in grid] for p, grid in sizes.items()} for m, f in fits.items()
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Allreduce cost model",
        "",
        f"Fitted to backend `{result['backend']}` "
        f"({len(result['measured'])} measurements: {', '.join(result['inputs'])}).",
        "",
    ]
    rows = []
    for m, f in result["fits"].items():
        errs = "; ".join(
            f"p={p}: {e['mean_rel'] * 100:.0f}% / {e['max_rel'] * 100:.0f}%" for p, e in f["errors"].items()
        )
        rows.append(
            [
                m,
                f"{f['alpha_s'] * 1e6:.2f}",
                f"{f['beta_s_per_byte'] * 1e9:.3f}",
                f"{f['bandwidth_gbps']:.2f}",
                f"{f['gamma_s_per_byte'] * 1e9:.3f}",
                errs,
            ]
        )
    lines.append(
        markdown_table(
            [
                "model",
                "alpha (us)",
                "beta (ns/B)",
                "bandwidth (Gb/s)",
                "gamma (ns/B)",
                "fit error by ranks (mean / max)",
            ],
            rows,
            align=["l", "r", "r", "r", "r", "l"],
        )
    )
    t = result["target"]
    lines += ["", f"Target network: alpha = {t['alpha_us']} us, bandwidth = {t['bandwidth_gbps']} Gb/s.", ""]
    if result["projections"]:
        lines += [
            "## Projected scaling",
            "",
            "Step = measured compute per step + modelled allreduce of the gradient, no "
            "overlap (a lower bound on efficiency). `measured` uses the fitted alpha/beta "
            "of this machine (hypothetical beyond one node), `target` the given network.",
            "",
            markdown_table(
                [
                    "scheme",
                    "network",
                    "model",
                    "ranks",
                    "step (ms)",
                    "allreduce (ms)",
                    "samples/s",
                    "efficiency",
                ],
                [
                    [
                        r["norm"],
                        r["network"],
                        r["model"],
                        r["ranks"],
                        f"{r['step_s'] * 1e3:.2f}",
                        f"{r['allreduce_s'] * 1e3:.3f}",
                        f"{r['samples_per_s']:.0f}",
                        f"{r['efficiency']:.2f}",
                    ]
                    for r in result["projections"]
                ],
                align=["l", "l", "l", "r", "r", "r", "r", "r"],
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = fit_and_project(
            args.allreduce,
            args.out,
            scaling=args.scaling,
            backend=args.backend,
            gamma=args.gamma,
            alpha_us=args.alpha_us,
            bandwidth_gbps=args.bandwidth_gbps,
            ranks=args.ranks,
            grad_bytes=args.grad_bytes,
        )
    except CostModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for m, f in result["fits"].items():
        print(
            f"{m:>13}: alpha {f['alpha_s'] * 1e6:.2f} us, beta {f['beta_s_per_byte'] * 1e9:.3f}"
            f" ns/B ({f['bandwidth_gbps']:.2f} Gb/s)"
        )
    print(f"wrote {args.out / 'costmodel.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
