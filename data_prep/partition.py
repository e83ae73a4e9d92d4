"""Split a dataset into private per-rank HDF5 partitions (``python -m data_prep.partition``).

Writes ``OUT/rank_00000.h5`` .. ``rank_{N-1:05d}.h5``, ``OUT/test.h5`` and, last,
``OUT/partition.json`` (the manifest). Every file is written under a temporary name and
renamed into place; a reader that finds the manifest finds a complete partition.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from data_prep.domains import domains
from data_prep.errors import DataPrepError
from data_prep.partition_spec import assign, parse_partition
from data_prep.sources import open_source
from data_prep.writer import write_rank_files, write_test_file
from disdl_mpi.data.layout import FORMAT, MANIFEST, TEST_FILE
from disdl_mpi.files import jsonable, write_json
from disdl_mpi.options import add_dataset, add_partition


def _existing_files(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.glob("rank_*.h5")) + [
        p for p in (out / TEST_FILE, out / MANIFEST) if p.exists()
    ]


def _read_manifest(out: Path) -> dict | None:
    try:
        data = json.loads((out / MANIFEST).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def value_max(src) -> float:
    """The top of a source's value range: the data's own maximum where it is in memory, else
    255 for 8-bit images and 1.0 for floats (feature-shift transforms scale by it)."""
    x = getattr(src, "x_train", None)
    if x is not None and len(x):
        return float(np.max(x))
    return 255.0 if src.x_dtype == np.uint8 else 1.0


def build_partitions(
    dataset: str,
    ranks: int,
    spec: str,
    seed: int,
    out: str | Path,
    *,
    source_dir: str | Path | None = None,
    min_per_rank: int = 1,
    force: bool = False,
    **source_opts,
) -> dict:
    """Partition ``dataset`` into ``ranks`` private files under ``out``; return the manifest.

    An identical request on an existing partition is a no-op; a different one is refused
    unless ``force``. Raises ``DataPrepError`` with a readable message on bad input.
    """
    sch = parse_partition(spec)
    ranks, seed, min_per_rank = int(ranks), int(seed), int(min_per_rank)
    if ranks < 1:
        raise DataPrepError(f"--ranks must be at least 1, got {ranks}")
    if min_per_rank < 0:
        raise DataPrepError(f"--min-per-rank must be >= 0, got {min_per_rank}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"--out {out} exists and is not a folder")
    src = open_source(dataset, source_dir, seed=seed, **source_opts)
    request = jsonable(
        {
            "dataset": src.name,
            "ranks": ranks,
            "scheme": sch.name,
            "seed": seed,
            "min_per_rank": min_per_rank,
            "source_sha256": src.sha256,
            "source_options": src.options,
        }
    )

    existing = _same_partition_or_refuse(out, request, force)
    if existing is not None:
        return existing
    parts = assign(src.y_train, src.num_classes, ranks, sch, seed, min_per_rank)
    doms = domains(sch.domain, ranks, value_max(src)) if sch.kind == "feature" else None
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        entries = write_rank_files(src, parts, sch, seed, tmp, doms)
        test_entry, domain_tests = write_test_file(src, sch, seed, tmp, doms)
        manifest = {
            "format": FORMAT,
            "dataset": src.name,
            "scheme": sch.name,
            "scheme_params": sch.params,
            "world_size": ranks,
            "num_classes": src.num_classes,
            "sample_shape": list(src.sample_shape),
            "x_dtype": src.x_dtype.name,
            "seed": seed,
            "min_per_rank": min_per_rank,
            "source": src.name,
            "source_sha256": src.sha256,
            "source_options": src.options,
            "train_size": int(src.n_train),
            "sizes": [e["size"] for e in entries],
            "class_counts": np.bincount(src.y_train, minlength=src.num_classes).tolist(),
            "ranks": entries,
            "test": test_entry,
            "request": request,
        }
        if doms is not None:
            manifest["domains"] = [d.as_dict() for d in doms]
            manifest["domain_tests"] = domain_tests
        _commit(out, tmp, [e["file"] for e in entries], [e["file"] for e in domain_tests], manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return jsonable(manifest)


def _same_partition_or_refuse(out: Path, request: dict, force: bool) -> Optional[dict]:
    """The manifest of an identical partition already in ``out`` (reuse it), None when there is
    none or ``force``; a DataPrepError for another partition's files."""
    if not _existing_files(out):
        return None
    manifest = _read_manifest(out)
    if (
        manifest is not None
        and manifest.get("request") == request
        and all((out / e["file"]).is_file() for e in manifest.get("ranks", []))
        and (out / TEST_FILE).is_file()
    ):
        return manifest
    if force:
        return None
    what = (
        (
            f"a different partition ({manifest.get('dataset')}, "
            f"{manifest.get('scheme')}, {manifest.get('world_size')} ranks, seed "
            f"{manifest.get('seed')})"
        )
        if manifest
        else "partition files without a valid manifest"
    )
    raise DataPrepError(
        f"--out {out} already holds {what}; refusing to overwrite it (use --force, or another --out)"
    )


def _commit(out: Path, tmp: Path, rank_files: list[str], domain_files: list[str], manifest: dict) -> None:
    """Drop the old manifest first so no manifest ever describes a mix of old and new files,
    move the new files in from ``tmp``, remove stale rank files, write the manifest last."""
    (out / MANIFEST).unlink(missing_ok=True)
    for name in [*rank_files, TEST_FILE, *domain_files]:
        os.replace(tmp / name, out / name)
    keep = set(rank_files) | set(domain_files)
    for p in [*out.glob("rank_*.h5"), *out.glob("test_rank_*.h5")]:
        if p.name not in keep:
            p.unlink()
    write_json(out / MANIFEST, manifest, fsync=True)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected C,H,W or D") from None
    if len(dims) not in (1, 3) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected C,H,W or D, positive")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.partition",
        description="Split a dataset into private per-rank HDF5 partitions with controlled "
        "label and size skew (rank_XXXXX.h5, test.h5, partition.json).",
    )
    add_dataset(p, required=True)
    p.add_argument("--ranks", type=int, required=True, help="number of partitions (MPI ranks)")
    add_partition(p, "iid", old="--scheme")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--source-dir", help="folder (or .npz / .tar.gz file) holding the source")
    p.add_argument(
        "--min-per-rank", type=int, default=1, help="minimum training samples per rank (0 allows empty ranks)"
    )
    p.add_argument("--force", action="store_true", help="replace a different partition already in --out")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="stratified test split for sources without one (default 0.2)",
    )
    p.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="a fixed class-stratified subset of N training samples (the test set stays whole)",
    )
    g = p.add_argument_group("synthetic source")
    g.add_argument("--num-samples", type=int, help="training samples (default 10000)")
    g.add_argument("--num-test", type=int, help="test samples (default 2000)")
    g.add_argument("--shape", type=_shape, help="sample shape C,H,W or D (default 3,32,32)")
    g.add_argument("--num-classes", type=int, help="classes (default 10; npz: override)")
    g.add_argument("--dtype", choices=("uint8", "float32"), help="synthetic dtype (default uint8)")
    return p


def summary(manifest: dict) -> str:
    sizes = manifest["sizes"]
    return (
        f"{manifest['dataset']} {manifest['scheme']}: {manifest['train_size']} training "
        f"samples over {manifest['world_size']} ranks (min {min(sizes)}, max {max(sizes)}), "
        f"{manifest['test']['size']} test samples, sample shape "
        f"{tuple(manifest['sample_shape'])} {manifest['x_dtype']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = {
        "num_samples": args.num_samples,
        "num_test": args.num_test,
        "shape": args.shape,
        "num_classes": args.num_classes,
        "dtype": args.dtype,
        "test_fraction": args.test_fraction,
        "train_subset": args.train_subset,
    }
    try:
        manifest = build_partitions(
            args.dataset,
            args.ranks,
            args.partition,
            args.seed,
            args.out,
            source_dir=args.source_dir,
            min_per_rank=args.min_per_rank,
            force=args.force,
            **opts,
        )
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {summary(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
