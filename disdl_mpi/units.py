"""Units as people write them and as reports add them up: byte sizes (``4K``, ``512M``, ``2GiB``,
powers of 1024) and covered wall time."""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, flag: str = "size") -> int:
    """Bytes from '4096', '4K', '512M', '1.5G', '2GiB', '16gb' (powers of 1024); errors name
    ``flag``, the option the text came from."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{flag}: cannot read {text!r} as a size (e.g. 4096, 4K, 512M, 2G)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise ValueError(f"{flag} must be at least one byte, got {text!r}")
    return int(value)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Wall time covered by at least one interval (communication in flight)."""
    if len(intervals) == 1:
        return intervals[0][1] - intervals[0][0]
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total
