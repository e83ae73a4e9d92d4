"""One progress display for runs and studies: a bar when a person watches, lines in logs.

Modes (``--progress`` in every tool): ``bar``, ``lines``, ``none`` (quiet: no progress at all)
and ``auto``, which draws a bar when a person is watching and prints plain, timestamped lines
otherwise. "Watching" means standard output is a terminal, or the process still has a
controlling terminal outside a batch job: under ``mpirun`` a rank's stdout is a pipe to the
launcher, yet ``mpirun -n 2 python -m disdl_mpi.run`` typed at a prompt should show a bar, while
the same run under ``sbatch`` (no terminal) writes lines to its log. In that case the bar is
drawn on the terminal itself (``/dev/tty``), so a redirected stdout still gets clean lines.

The bar is tqdm's; only one process (rank 0, or the study driver) shows anything.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm

MODES = ("auto", "bar", "lines", "none")
BAR_FORMAT = "[{bar:24}] {n_fmt}/{total_fmt} {desc} ({elapsed}<{remaining})"


def _terminal() -> Optional[TextIO]:
    """The controlling terminal, opened for writing, or None (batch jobs, daemons, CI)."""
    if os.environ.get("SLURM_JOB_ID") and not os.environ.get("SLURM_PTY_PORT"):
        return None  # a batch job's rank may inherit no terminal worth drawing on
    try:
        return open("/dev/tty", "w")
    except OSError:
        return None


def bar_stream(mode: str, stream: Optional[TextIO] = None) -> Optional[TextIO]:
    """Where a bar is drawn under ``mode``, or None when lines (or nothing) are wanted."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    stream = stream or sys.stdout
    if mode in ("lines", "none"):
        return None
    if stream.isatty() or mode == "bar":
        return stream
    return _terminal()


class Progress:
    """Counts units of work (steps, points, scheme-epochs) towards ``total``.

    ``tty`` forces the style for tests and callers that know better (True: bar, False: lines);
    ``quiet`` (or mode ``none``) shows nothing. Messages go through :meth:`line`, which keeps
    them above a running bar.
    """

    def __init__(self, total: int, *, mode: str = "auto", stream: Optional[TextIO] = None,
                 tty: Optional[bool] = None, quiet: bool = False) -> None:
        self.total = max(0, int(total))
        self.done = 0
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        self.quiet = quiet or mode == "none"
        if tty is None:
            target = None if self.quiet else bar_stream(mode, self.stream)
        else:
            target = self.stream if tty and not self.quiet else None
        self.bar: Optional[tqdm] = None
        if target is not None:
            self.bar = tqdm(total=self.total, file=target, bar_format=BAR_FORMAT,
                            dynamic_ncols=False, ncols=100, mininterval=0.1, leave=False)

    @property
    def is_bar(self) -> bool:
        return self.bar is not None

    def line(self, text: str) -> None:
        """A message for the log (or above the bar); nothing when quiet."""
        if self.quiet:
            return
        if self.bar is not None and self.bar.fp is self.stream:
            self.bar.clear()
            self.stream.write(text + "\n")
            self.stream.flush()
            self.bar.refresh()
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _stamp(self, text: str) -> str:
        return f"[{time.strftime('%H:%M:%S')}] {text}"

    def reset(self, total: int) -> None:
        """Start counting again towards a new ``total`` (the next scheme of a run)."""
        self.total, self.done = max(0, int(total)), 0
        if self.bar is not None:
            self.bar.reset(total=self.total)

    def advance(self, n: int = 1, label: str = "") -> None:
        """``n`` more units done; the bar shows ``label``."""
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        if self.bar is not None:
            if label:
                self.bar.set_description_str(label, refresh=False)
            self.bar.update(n)

    def starting(self, label: str) -> None:
        """A unit (a sweep point) begins: the bar names it, a log gets a line."""
        if self.bar is not None:
            self.bar.set_description_str(f"running {label}")
        elif not self.quiet:
            self.line(self._stamp(f"{self.done + 1}/{self.total} start {label}"))

    def finished(self, label: str, status: str) -> None:
        """A unit ends with ``status``: one line in either style."""
        self.advance(1)
        elapsed = time.monotonic() - self.start
        msg = f"{self.done}/{self.total} {label}: {status} ({elapsed:.0f} s elapsed)"
        self.line(msg if self.bar is not None else self._stamp(msg))

    def eta(self) -> str:
        """Time left at the rate so far, e.g. '3.2 min', or '?' before the first unit."""
        if self.done == 0:
            return "?"
        left = (time.monotonic() - self.start) / self.done * (self.total - self.done)
        return f"{left / 60:.1f} min"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            if self.bar.fp is not self.stream:
                self.bar.fp.close()
            self.bar = None
