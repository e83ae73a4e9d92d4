"""How fast can a streamed batch be read? Random-row reads from HDF5 layouts of x.

    python -m bench.h5_layout --shape 3,32,32 --rows 50000
    python -m bench.h5_layout --shape 3,224,224 --rows 2000

Writes the same random uint8 x three ways (contiguous, ~1 MiB chunks, one row per chunk) into
a temporary folder, then times what ``stream`` residency does per step: one read of a batch's
random rows, in file order. The files are small enough to sit in the page cache, so this
measures HDF5's work per read, not the disk. The result chose data_prep.writer's layout.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from bench.harness import write_rows
from disdl_mpi.options import add_json, program_parser

LAYOUTS = ("contiguous", "chunks-1MiB", "chunk-per-row")


def chunks(layout: str, shape: tuple[int, ...], rows: int = 1 << 62) -> tuple[int, ...] | None:
    per_row = int(np.prod(shape))
    if layout == "chunks-1MiB":
        return (max(1, min(rows, (1 << 20) // per_row)), *shape)
    return (1, *shape) if layout == "chunk-per-row" else None


def measure(shape: tuple[int, ...], rows: int, batch: int, reads: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (rows, *shape), dtype=np.uint8)
    batches = [np.sort(rng.choice(rows, batch, replace=False)) for _ in range(reads)]
    out = {"shape": list(shape), "rows": rows, "batch": batch, "reads": reads}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in LAYOUTS:
            path = Path(tmp) / f"{layout}.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset("x", data=x, chunks=chunks(layout, shape, rows))
            with h5py.File(path, "r") as f:
                d = f["x"]
                for b in batches[:10]:  # warm-up: page cache, HDF5's metadata
                    d[b]
                t0 = time.perf_counter()
                for b in batches:
                    d[b]
                out[f"{layout}_ms"] = (time.perf_counter() - t0) / reads * 1e3
    return out


def main(argv: list[str] | None = None) -> int:
    p = program_parser("python -m bench.h5_layout", __doc__)
    p.add_argument("--shape", default="3,32,32", help="sample shape, e.g. 3,224,224")
    p.add_argument("--rows", type=int, default=50000)
    p.add_argument("--batch", type=int, default=16, help="random rows per read (one step)")
    p.add_argument("--reads", type=int, default=200)
    add_json(p)
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    res = measure(shape, args.rows, args.batch, args.reads)
    print(
        f"# bench.h5_layout: {args.rows} rows of {args.shape} uint8, {args.reads} reads of "
        f"{args.batch} random rows (ms per read)"
    )
    for layout in LAYOUTS:
        print(f"  {layout:>14} {res[f'{layout}_ms']:9.3f}")
    if args.json_path:
        write_rows(args.json_path, "bench.h5_layout", [res])
    return 0


if __name__ == "__main__":
    sys.exit(main())
