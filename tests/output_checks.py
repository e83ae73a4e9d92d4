"""Checks the tests make of what the project writes: a Chrome trace that loads, a PNG that is
a PNG, the fp16 wire format's round-trip error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from disdl_mpi.comm.compression import wire_dtype

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def validate_trace(obj: Any) -> list[str]:
    """Problems that would stop chrome://tracing or Perfetto from loading ``obj`` (empty = ok)."""
    problems = []
    if not isinstance(obj, dict) or not isinstance(obj.get("traceEvents"), list):
        return ["top level must be an object with a 'traceEvents' list"]
    for i, ev in enumerate(obj["traceEvents"]):
        if not isinstance(ev, dict):
            problems.append(f"event {i}: not an object")
            continue
        for key in ("name", "ph", "pid", "tid"):
            if key not in ev:
                problems.append(f"event {i}: missing {key!r}")
        if ev.get("ph") == "X":
            for key in ("ts", "dur"):
                if not isinstance(ev.get(key), (int, float)):
                    problems.append(f"event {i}: 'X' event needs numeric {key!r}")
            if isinstance(ev.get("dur"), (int, float)) and ev["dur"] < 0:
                problems.append(f"event {i}: negative duration")
    return problems


def is_png(path: str | Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_SIGNATURE


def roundtrip_relative_error(t: torch.Tensor, compress: str) -> float:
    """max |cast(t) - t| / max |t|: the error one trip through the wire format adds."""
    back = t.to(wire_dtype(t.dtype, compress)).to(t.dtype)
    scale = float(t.abs().max()) or 1.0
    return float((back - t).abs().max()) / scale
