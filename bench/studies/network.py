"""The network study on the emulated cluster: ``python -m bench.studies.network --out DIR``.

Runs, as root, on clusters that ``bench.cluster`` builds and removes itself (name ``netstudy``):

1. the emulator's own ceiling: unshaped allreduce busbw on 2 and 4 nodes;
2. at ``--link`` per node: raw MPI and our allreducer on 2, 3 and 4 nodes, once with MPICH's
   default algorithms and once with the size-based selection (ring >= 64 KiB off powers of two),
   plus a burst check (messages just below and above the tbf bucket);
3. the cost model fitted on the 2-node points only, predicting 3 and 4 nodes per message size
   with the algorithm that ran there (ring on 3, Rabenseifner on 4);
4. a weak-scaling sweep over 1-4 nodes (bn, syncbn, gn; ResNet-20 and the 8.5 M-parameter
   widecnn) through the cluster launcher, with the cost model's predicted step next to the
   measured one;
5. overlap against its physical limit max(0, in flight - backward), and fp16 compression of the
   large model, on 2 nodes.

Each part writes its JSON into DIR as it finishes (a rerun skips finished parts); DIR/network.md
tabulates everything. Every figure depends on this machine: on 2 cores, 3 and 4 nodes share
cores, and the report says so.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from bench.harness import read_rows
from bench.studies.costmodel import fit, predict
from bench.studies.costmodel_inputs import Sample
from bench.studies.network_report import algorithm, markdown, per_step, scaling_rows
from disdl_mpi.files import write_json, write_text
from disdl_mpi.options import program_parser

NAME = "netstudy"
PY = sys.executable


def cluster(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    verb, rest = args[0], list(args[1:])
    cmd = [PY, "-m", "bench.cluster", verb, "--name", NAME, *rest]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return proc


def with_cluster(nodes: int, link: str, body: Callable[[], Any]) -> Any:
    subprocess.run([PY, "-m", "bench.cluster", "down", "--name", NAME], capture_output=True)
    cluster("up", "--nodes", str(nodes), "--link", link)
    try:
        return body()
    finally:
        cluster("down")


def allreduce(
    ranks: int,
    out: Path,
    sizes: tuple[str, str],
    *,
    backends: str = "mpi,disdl",
    default_algorithms: bool = False,
    iters: int = 5,
) -> list[dict]:
    flags = ["--mpi-default-algorithms"] if default_algorithms else []
    cluster(
        "exec",
        "-n",
        str(ranks),
        *flags,
        "--",
        PY,
        "-m",
        "bench.allreduce",
        "--min-bytes",
        sizes[0],
        "--max-bytes",
        sizes[1],
        "--factor",
        "4",
        "--backends",
        backends,
        "--iters",
        str(iters),
        "--warmup",
        "2",
        "--json",
        str(out),
    )
    return read_rows(out)


def part(out: Path, name: str, run: Callable[[], Any]) -> Any:
    """Run a part once; its result is kept in OUT/<name>.json."""
    path = out / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    print(f"[network] {name} ...", flush=True)
    result = run()
    write_json(path, result)
    return result


# ---------------------------------------------------------------------------- parts 1-3


def ceilings(out: Path) -> dict:
    res = {}
    for n in (2, 4):
        rows = with_cluster(
            n, "none", lambda n=n: allreduce(n, out / f"raw-ceiling-n{n}.json", ("1M", "16M"), backends="mpi")
        )
        res[str(n)] = max(r["busbw_gbps"] * 8 for r in rows)
    return res


def links(out: Path, link: str) -> dict:
    res = {}
    for n in (2, 3, 4):

        def body(n=n):
            return {
                "default": allreduce(
                    n, out / f"raw-default-n{n}.json", ("4K", "16M"), default_algorithms=True
                ),
                "selected": allreduce(n, out / f"raw-selected-n{n}.json", ("4K", "16M")),
                "burst": allreduce(n, out / f"raw-burst-n{n}.json", ("32K", "128K"), backends="mpi", iters=20)
                if n == 2
                else [],
            }

        res[str(n)] = with_cluster(n, link, body)
    return res


FIT_FROM = 64 * 1024  # the tbf bucket: smaller messages can pass at more than the link rate


def validate(links_res: dict) -> dict:
    """Fit on 2 nodes only (messages >= the tbf bucket, where the link is the limit); predict
    3 and 4 nodes at every measured size."""
    two = [
        Sample("mpi", r["ranks"], r["bytes"], r["time_us"] / 1e6)
        for r in links_res["2"]["selected"]
        if r["backend"] == "mpi" and r["bytes"] >= FIT_FROM
    ]
    f = fit(two, "ring")  # on 2 ranks ring and Rabenseifner are the same formula
    rows = []
    for n in ("3", "4"):
        for r in links_res[n]["selected"]:
            if r["backend"] != "mpi":
                continue
            p, b = int(n), r["bytes"]
            model = algorithm(p, b)
            t = predict(model, p, b, f.alpha_s, f.beta_s_per_byte)
            rows.append(
                {
                    "nodes": p,
                    "bytes": b,
                    "algorithm": model,
                    "measured_us": r["time_us"],
                    "predicted_us": t * 1e6,
                    "error": t * 1e6 / r["time_us"] - 1,
                }
            )
    return {
        "alpha_us": f.alpha_s * 1e6,
        "beta_ns_per_byte": f.beta_s_per_byte * 1e9,
        "bandwidth_gbps": f.bandwidth_gbps,
        "fit_from_bytes": FIT_FROM,
        "rows": rows,
    }


# ---------------------------------------------------------------------------- parts 4-5


def sweep(out: Path, link: str, model: str, steps: int) -> list[dict]:
    target = out / f"scaling-{model}"
    cmd = [
        PY,
        *"-m bench.studies.scaling --ranks 1 2 3 4 --norm bn,syncbn,gn".split(),
        *"--mode weak --model".split(),
        model,
        *"--dataset synthetic --shape 3,32,32 --num-samples 512".split(),
        *"--partition iid --batch-per-rank 32 --steps".split(),
        str(steps),
        *"--cores 2 --timeout 900 --launcher".split(),
        f"cluster:{NAME}",
        *"--progress lines --out".split(),
        str(target),
    ]

    def body():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"scaling sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads((target / "scaling.json").read_text())["rows"]

    return with_cluster(4, link, body)


def fp16(out: Path, link: str, steps: int) -> dict:
    """widecnn on 2 nodes, fp32 against fp16 on the wire (same run otherwise)."""
    res = {}

    def body():
        from data_prep.ensure import ensure_partition

        data = out / "data-fp16"
        ensure_partition(data, "synthetic", 2, "iid", 0, num_samples=512, shape=(3, 32, 32))
        for compress in ("none", "fp16"):
            target = out / f"fp16-{compress}"
            cluster(
                "exec",
                "-n",
                "2",
                "--",
                PY,
                "-m",
                "disdl_mpi.run",
                "--data-dir",
                str(data),
                "--model",
                "widecnn",
                "--norm",
                "bn",
                "--steps",
                str(steps),
                "--global-batch-size",
                "64",
                "--eval-every",
                "0",
                "--compress",
                compress,
                "--progress",
                "none",
                "--out",
                str(target),
            )
            rec = json.loads((target / "summary.json").read_text())["runs"][0]
            res[compress] = per_step(rec["phases"], rec["steps"])
        return res

    return with_cluster(2, link, body)


# ---------------------------------------------------------------------------- report


def main(argv: Optional[list[str]] = None) -> int:
    p = program_parser("python -m bench.studies.network", __doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--link", default="1gbit")
    p.add_argument("--steps", type=int, default=10, help="steps per scheme in the sweeps")
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"link": args.link}
    res["ceilings"] = part(out, "ceilings", lambda: ceilings(out))
    res["links"] = part(out, "links", lambda: links(out, args.link))
    res["validation"] = part(out, "validation", lambda: validate(res["links"]))
    res["scaling"] = {}
    for model in ("resnet20", "widecnn"):
        rows = part(out, f"sweep-{model}", lambda m=model: sweep(out, args.link, m, args.steps))
        res["scaling"][model] = scaling_rows(rows, res["validation"])
    res["fp16"] = part(out, "fp16", lambda: fp16(out, args.link, args.steps))
    write_json(out / "network.json", res)
    write_text(out / "network.md", markdown(res, args.link))
    print(f"wrote {out / 'network.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
