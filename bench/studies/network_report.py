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
    lines = [
        f"# Network study: emulated nodes at {link} per node",
        "",
        "Emulator ceiling (unshaped busbw, best size >= 1 MiB): "
        + ", ".join(f"{n} nodes {v:.2f} Gbit/s" for n, v in res["ceilings"].items()),
        "",
    ]
    lines += _link_lines(res["links"], (rate_bits(link) or 0) / 1e9)
    lines += _validation_lines(res["validation"])
    for model, rows in res["scaling"].items():
        lines += [f"## Weak scaling, {model}", "", _table(SCALING_COLUMNS, rows), ""]
    if res.get("fp16"):
        lines += _fp16_lines(res["fp16"])
    return "\n".join(lines) + "\n"


# (header, key, format string or function of the value) of the weak-scaling table's columns
SCALING_COLUMNS = (
    ("ranks (nodes)", "ranks", "{}"),
    ("scheme", "norm", "{}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("predicted ms", "predicted_ms", "{:.1f}"),
    ("comm %", "comm_fraction", lambda v: f"{100 * v:.0f}"),
    ("allreduce predicted ms", "predicted_allreduce_ms", "{:.1f}"),
    ("in flight ms", "inflight_ms", "{:.1f}"),
    ("exposed ms", "exposed_ms", "{:.1f}"),
    ("backward ms", "backward_ms", "{:.1f}"),
    ("norm coll. ms", "norm_ms", "{:.1f}"),
    ("overlap limit ms", "limit_ms", "{:.1f}"),
)


def _table(columns: tuple, rows: list[dict]) -> str:
    def cell(fmt, value) -> str:
        return fmt(value) if callable(fmt) else fmt.format(value)

    return markdown_table(
        [c[0] for c in columns], [[cell(fmt, r[key]) for _, key, fmt in columns] for r in rows]
    )


def _link_lines(links: dict, gbit: float) -> list[str]:
    """Our allreducer's busbw against raw MPI's and the link, per node count and algorithm set."""
    rows = []
    for n, parts in links.items():
        for kind in ("default", "selected"):
            by = {(r["backend"], r["bytes"]): r for r in parts[kind]}
            for b in sorted({r["bytes"] for r in parts[kind]}):
                mpi, ours = by.get(("mpi", b)), by.get(("disdl", b))
                if not mpi or not ours:
                    continue
                rows.append(
                    [n, kind, b, f"{mpi['busbw_gbps'] * 8:.3f}", f"{ours['busbw_gbps'] * 8:.3f}"]
                    + [f"{ours['busbw_gbps'] * 8 / gbit:.2f}" if gbit else "-"]
                    + [f"{ours['busbw_gbps'] / mpi['busbw_gbps']:.2f}"]
                )
    header = ["nodes", "algorithms", "bytes", "raw MPI busbw (Gbit/s)", "ours busbw (Gbit/s)"]
    lines = [markdown_table(header + ["ours / link", "ours / raw"], rows), ""]
    burst = links["2"]["burst"]
    if burst:
        lines += [
            "Burst check (2 nodes, tbf bucket 64 KiB): "
            + ", ".join(f"{r['bytes'] // 1024} KiB at {r['busbw_gbps'] * 8:.3f} Gbit/s" for r in burst),
            "",
        ]
    return lines


def _validation_lines(v: dict) -> list[str]:
    """The 2-node fit and its predictions against the measured times at every node count."""
    columns = (
        ("nodes", "nodes", "{}"),
        ("bytes", "bytes", "{}"),
        ("algorithm", "algorithm", "{}"),
        ("measured (us)", "measured_us", "{:.0f}"),
        ("predicted (us)", "predicted_us", "{:.0f}"),
        ("error", "error", lambda v: f"{100 * v:+.0f} %"),
    )
    return [
        f"Cost model fitted on 2 nodes (messages >= {v.get('fit_from_bytes', 0) // 1024} KiB): "
        f"alpha {v['alpha_us']:.1f} us, beta "
        f"{v['beta_ns_per_byte']:.2f} ns/B ({v['bandwidth_gbps']:.2f} Gbit/s).",
        "",
        _table(columns, v["rows"]),
        "",
    ]


def _fp16_lines(f16: dict) -> list[str]:
    cut = 1 - f16["fp16"]["allreduce"] / f16["none"]["allreduce"] if f16["none"]["allreduce"] else 0
    rows = [
        [
            k,
            f"{v['step']:.1f}",
            f"{v['allreduce_total']:.1f}",
            f"{v['allreduce']:.1f}",
            f"{v['backward']:.1f}",
        ]
        for k, v in f16.items()
    ]
    return [
        "## fp16 wire format, widecnn on 2 nodes",
        "",
        markdown_table(["wire", "step ms", "in flight ms", "exposed ms", "backward ms"], rows),
        "",
        f"fp16 cuts the exposed allreduce by {100 * cut:.0f} %.",
        "",
    ]


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
