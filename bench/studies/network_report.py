"""network.md: the emulated cluster's measurements as tables, the cost model's predictions beside them."""

from __future__ import annotations

from bench.cluster.netns import rate_bits
from bench.studies.costmodel import predict
from disdl_mpi.files import markdown_table


def per_step(phases: dict, steps: int) -> dict:
    s = max(1, int(steps))
    return {
        k: 1e3 * float(phases.get(k, 0.0)) / s
        for k in ("step", "backward", "allreduce", "allreduce_total", "norm_comm", "compute", "comm")
    }


def markdown(res: dict, link: str) -> str:
    gbit = (rate_bits(link) or 0) / 1e9
    lines = [
        f"# Network study: emulated nodes at {link} per node",
        "",
        "Emulator ceiling (unshaped busbw, best size >= 1 MiB): "
        + ", ".join(f"{n} nodes {v:.2f} Gbit/s" for n, v in res["ceilings"].items()),
        "",
    ]
    rows = []
    for n, parts in res["links"].items():
        for kind in ("default", "selected"):
            by = {(r["backend"], r["bytes"]): r for r in parts[kind]}
            for b in sorted({r["bytes"] for r in parts[kind]}):
                mpi, ours = by.get(("mpi", b)), by.get(("disdl", b))
                if not mpi or not ours:
                    continue
                rows.append(
                    [
                        n,
                        kind,
                        b,
                        f"{mpi['busbw_gbps'] * 8:.3f}",
                        f"{ours['busbw_gbps'] * 8:.3f}",
                        f"{ours['busbw_gbps'] * 8 / gbit:.2f}" if gbit else "-",
                        f"{ours['busbw_gbps'] / mpi['busbw_gbps']:.2f}",
                    ]
                )
    lines += [
        markdown_table(
            [
                "nodes",
                "algorithms",
                "bytes",
                "raw MPI busbw (Gbit/s)",
                "ours busbw (Gbit/s)",
                "ours / link",
                "ours / raw",
            ],
            rows,
        ),
        "",
    ]
    burst = res["links"]["2"]["burst"]
    if burst:
        lines += [
            "Burst check (2 nodes, tbf bucket 64 KiB): "
            + ", ".join(f"{r['bytes'] // 1024} KiB at {r['busbw_gbps'] * 8:.3f} Gbit/s" for r in burst),
            "",
        ]
    v = res["validation"]
    lines += [
        f"Cost model fitted on 2 nodes (messages >= {v.get('fit_from_bytes', 0) // 1024} KiB): "
        f"alpha {v['alpha_us']:.1f} us, beta "
        f"{v['beta_ns_per_byte']:.2f} ns/B ({v['bandwidth_gbps']:.2f} Gbit/s).",
        "",
        markdown_table(
            ["nodes", "bytes", "algorithm", "measured (us)", "predicted (us)", "error"],
            [
                [
                    r["nodes"],
                    r["bytes"],
                    r["algorithm"],
                    f"{r['measured_us']:.0f}",
                    f"{r['predicted_us']:.0f}",
                    f"{100 * r['error']:+.0f} %",
                ]
                for r in v["rows"]
            ],
        ),
        "",
    ]
    for model, rows_ in res["scaling"].items():
        lines += [
            f"## Weak scaling, {model}",
            "",
            markdown_table(
                [
                    "ranks (nodes)",
                    "scheme",
                    "step ms",
                    "predicted ms",
                    "comm %",
                    "allreduce predicted ms",
                    "in flight ms",
                    "exposed ms",
                    "backward ms",
                    "norm coll. ms",
                    "overlap limit ms",
                ],
                [
                    [
                        r["ranks"],
                        r["norm"],
                        f"{r['step_ms']:.1f}",
                        f"{r['predicted_ms']:.1f}",
                        f"{100 * r['comm_fraction']:.0f}",
                        f"{r['predicted_allreduce_ms']:.1f}",
                        f"{r['inflight_ms']:.1f}",
                        f"{r['exposed_ms']:.1f}",
                        f"{r['backward_ms']:.1f}",
                        f"{r['norm_ms']:.1f}",
                        f"{r['limit_ms']:.1f}",
                    ]
                    for r in rows_
                ],
            ),
            "",
        ]
    f16 = res.get("fp16")
    if f16:
        cut = 1 - f16["fp16"]["allreduce"] / f16["none"]["allreduce"] if f16["none"]["allreduce"] else 0
        lines += [
            "## fp16 wire format, widecnn on 2 nodes",
            "",
            markdown_table(
                ["wire", "step ms", "in flight ms", "exposed ms", "backward ms"],
                [
                    [
                        k,
                        f"{v['step']:.1f}",
                        f"{v['allreduce_total']:.1f}",
                        f"{v['allreduce']:.1f}",
                        f"{v['backward']:.1f}",
                    ]
                    for k, v in f16.items()
                ],
            ),
            "",
            f"fp16 cuts the exposed allreduce by {100 * cut:.0f} %.",
            "",
        ]
    return "\n".join(lines) + "\n"


def scaling_rows(rows: list[dict], validation: dict) -> list[dict]:
    """Per point: the measured step and the model's prediction of it.

    The model predicts the gradient allreduce (T, fitted on 2 nodes, with the algorithm that
    ran); the step is predicted as what was measured outside the exposed allreduce plus the part
    of T that backward cannot hide, max(0, T - backward). Measured compute is used (not the
    1-rank compute) because 3 and 4 emulated nodes share this machine's 2 cores.
    """
    out = []
    for r in rows:
        steps = max(1, r["steps"])
        ms = lambda k: 1e3 * r[f"{k}_s"] / steps  # noqa: B023 (used in this iteration)
        t_ar = (
            predict(
                algorithm(r["ranks"], r["grad_bytes"]),
                r["ranks"],
                r["grad_bytes"],
                validation["alpha_us"] / 1e6,
                validation["beta_ns_per_byte"] / 1e9,
            )
            * 1e3
        )
        out.append(
            {
                "ranks": r["ranks"],
                "norm": r["norm"],
                "step_ms": ms("step"),
                "predicted_ms": ms("step") - ms("allreduce") + max(0.0, t_ar - ms("backward")),
                "predicted_allreduce_ms": t_ar,
                "comm_fraction": r["comm_fraction"],
                "inflight_ms": ms("allreduce_total"),
                "exposed_ms": ms("allreduce"),
                "backward_ms": ms("backward"),
                "norm_ms": ms("norm_comm"),
                "limit_ms": max(0.0, ms("allreduce_total") - ms("backward")),
            }
        )
    return out


def algorithm(p: int, nbytes: int) -> str:
    """The allreduce algorithm MPICH runs with the selection: ring >= 64 KiB off powers of
    two, Rabenseifner (reduce-scatter + allgather) otherwise, for these sizes."""
    return "ring" if (p & (p - 1)) and nbytes >= 64 * 1024 else "rabenseifner"
