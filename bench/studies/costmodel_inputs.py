"""What the cost model is fitted to: bench.allreduce rows and a scaling sweep's measured steps."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.harness import read_rows


class CostModelError(ValueError):
    """Unusable input: the message names the file and field."""


@dataclass(frozen=True)
class Sample:
    """One measured allreduce: ``bytes`` per rank, mean wall ``time_s``, over ``ranks``."""

    backend: str
    ranks: int
    bytes: int
    time_s: float


ROW_FIELDS = ("backend", "ranks", "bytes", "time_us")  # what bench.allreduce --json writes


def load_allreduce(paths: list[Path]) -> list[Sample]:
    """The rows of ``bench.allreduce --json`` files (``bench.harness.read_rows``)."""
    out: list[Sample] = []
    for path in paths:
        try:
            rows = read_rows(path)
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise CostModelError(f"{path}: cannot read allreduce results ({exc})") from exc
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise CostModelError(f"{path}: row {i} is not an object")
            for key in ROW_FIELDS:
                if row.get(key) is None:
                    raise CostModelError(f"{path}: row {i} has no {key} field")
            out.append(
                Sample(str(row["backend"]), int(row["ranks"]), int(row["bytes"]), float(row["time_us"]) / 1e6)
            )
    return out


def pick_backend(samples: list[Sample], wanted: Optional[str]) -> str:
    names = sorted({s.backend for s in samples})
    if not names:
        raise CostModelError("no allreduce measurements")
    if wanted:
        if wanted not in names:
            raise CostModelError(f"--backend {wanted!r} not in the measurements: {', '.join(names)}")
        return wanted
    # The raw MPI path is what the gradient allreducer uses on the CPU.
    for name in names:
        if "mpi" in name.lower() and "gloo" not in name.lower() and "torch" not in name.lower():
            return name
    return names[0]


@dataclass
class Measured:
    """One scheme at one rank count from a scaling sweep (per-step seconds, rank means)."""

    norm: str
    ranks: int
    mode: str
    step_s: float
    compute_s: float
    allreduce_s: float
    samples_per_s: float
    efficiency: Optional[float]
    grad_bytes: int


def load_scaling(directory: Path) -> list[Measured]:
    """Per-step times from ``DIR/scaling.csv`` (bench.studies.scaling)."""
    path = Path(directory) / "scaling.csv"
    if not path.exists():
        raise CostModelError(f"{path}: no scaling.csv (run python -m bench.studies.scaling first)")
    out = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            try:
                steps = max(1.0, float(row["steps"]))
                step = float(row["step_s"]) / steps
                ar = float(row["allreduce_s"]) / steps
                wait = float(row.get("imbalance_wait_s") or 0.0) / steps
                eff = row.get("efficiency")
                out.append(
                    Measured(
                        norm=row["norm"],
                        ranks=int(row["ranks"]),
                        mode=row["mode"],
                        step_s=step,
                        compute_s=max(0.0, step - ar - wait),
                        allreduce_s=ar,
                        samples_per_s=float(row["samples_per_s"]),
                        efficiency=float(eff) if eff not in (None, "") else None,
                        grad_bytes=int(float(row.get("grad_bytes") or 0)),
                    )
                )
            except (KeyError, ValueError) as exc:
                raise CostModelError(f"{path}: row {i + 2}: bad or missing field ({exc})") from exc
    return out
