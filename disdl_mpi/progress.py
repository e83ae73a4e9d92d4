"""Rank-0 progress: a bar on a TTY, nothing per step in logs (epoch lines are printed instead)."""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional


def make_progress(mode: str, rank: int) -> Optional[Callable[[int, int, str], None]]:
    """A step callback drawing a bar, or None when epoch lines should be printed instead."""
    if rank != 0 or mode in ("none", "lines"):
        return None
    if mode == "auto" and not sys.stdout.isatty():
        return None
    last = [0.0]

    def bar(step: int, total: int, label: str) -> None:
        now = time.monotonic()
        if step < total and now - last[0] < 0.1:
            return  # redraw at most 10 times a second
        last[0] = now
        width = 30
        filled = int(width * step / max(1, total))
        sys.stdout.write(f"\r  {label:<28} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{step}/{total}")
        if step >= total:
            sys.stdout.write("\n")
        sys.stdout.flush()

    return bar
