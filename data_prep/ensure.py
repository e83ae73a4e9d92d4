"""Build a partition unless it is already there: the one function that the run, the sweeps and
the studies share.

Where a partition lives is the format's rule (:func:`disdl_mpi.data.layout.partition_dir`). A
folder found on disk is still checked against its manifest before it is used: a partition built
with other settings is refused with the field that differs, never silently reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from data_prep.errors import DataPrepError
from data_prep.partition_spec import parse_partition
from disdl_mpi.data.layout import MANIFEST, source_options


def manifest_differences(
    manifest: dict,
    dataset: str,
    spec: str,
    ranks: int,
    seed: int,
    min_per_rank: Optional[int] = None,
    **source_opts: Any,
) -> list[str]:
    """Fields of an existing manifest that differ from the request (empty: same partition)."""
    want: dict[str, Any] = {
        "dataset": dataset,
        "scheme": parse_partition(spec).name,
        "world_size": int(ranks),
        "seed": int(seed),
    }
    if min_per_rank is not None:
        want["min_per_rank"] = int(min_per_rank)
    out = [
        f"field '{k}' is {manifest.get(k)!r}, the request has {v!r}"
        for k, v in want.items()
        if manifest.get(k) != v
    ]
    have = manifest.get("source_options") or {}
    for k, v in source_options(source_opts).items():
        if k in have and have[k] != (list(v) if isinstance(v, tuple) else v):
            out.append(f"field 'source_options.{k}' is {have[k]!r}, the request has {v!r}")
    return out


def ensure_partition(
    data_dir: str | Path,
    dataset: str,
    ranks: int,
    spec: str,
    seed: int,
    *,
    source_dir: Optional[str] = None,
    min_per_rank: int = 1,
    **source_opts: Any,
) -> dict:
    """Build the partition in ``data_dir`` unless it is there; return its manifest.

    An existing partition is checked against the request and refused (``DataPrepError``,
    naming the manifest and the differing field) when any setting differs.
    """
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataPrepError(f"{path}: unreadable manifest ({exc})") from None
        diff = manifest_differences(manifest, dataset, spec, ranks, seed, min_per_rank, **source_opts)
        if diff:
            raise DataPrepError(
                f"{path}: this folder holds another partition: "
                + "; ".join(diff)
                + "; remove the folder or choose another one"
            )
        return manifest
    from data_prep.partition import build_partitions

    opts = source_options(source_opts)
    return build_partitions(
        dataset, ranks, spec, seed, data_dir, source_dir=source_dir, min_per_rank=min_per_rank, **opts
    )


def explicit_mismatch(
    manifest: dict, where: Path, *, dataset: Optional[str] = None, spec: Optional[str] = None
) -> Optional[str]:
    """A ``--dataset`` or ``--partition`` given explicitly (None: not given) that the partition
    whose manifest is ``where`` was not built with; None when both agree."""
    if dataset is not None and manifest.get("dataset") != dataset:
        return (
            f"{where}: field 'dataset' is {manifest.get('dataset')!r}, but --dataset {dataset} was asked for"
        )
    if spec is not None and manifest.get("scheme") != parse_partition(spec).name:
        return f"{where}: field 'scheme' is {manifest.get('scheme')!r}, but --partition {spec} was asked for"
    return None
