"""One progress display for runs and studies: a bar when a person watches, lines in logs.

Modes (``--progress`` in every tool): ``bar``, ``lines``, ``none`` (quiet: no progress at all)
and ``auto``, which draws a bar when a person is watching and prints plain, timestamped lines
otherwise. "Watching" means standard output is a terminal -- or, for an MPI rank, that the
launcher's is: under ``mpirun`` a rank's stdout is a pipe to the launcher (and Hydra starts
each rank in a session of its own, without a terminal), yet ``mpirun -n 2 python -m
disdl_mpi.run`` typed at a prompt should show a bar, which the launcher forwards to the
terminal; the same run in a batch job, or with the launcher's output redirected, logs lines.
Open MPI's launcher forwards a rank's output only at line ends, so a bar redrawn with carriage
returns would never reach the terminal: under Open MPI ``auto`` prints lines.

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
# Processes that start MPI ranks and forward their output (MPICH Hydra, Open MPI / PRRTE).
LAUNCHERS = frozenset(
    {
        "mpiexec",
        "mpirun",
        "mpiexec.hydra",
        "hydra_pmi_proxy",
        "orterun",
        "orted",
        "prterun",
        "prted",
        "mpiexec.openmpi",
        "mpirun.openmpi",
    }
)
# Open MPI's: they pass a rank's output on line by line (seen with Open MPI 5.0.11), no bar.
LINE_FORWARDING = frozenset({"orterun", "orted", "prterun", "prted"})


def _parent(pid: int) -> tuple[int, str]:
    """(parent pid, command name) of ``pid`` from /proc (Linux); (0, "") elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/comm") as fh:
            comm = fh.read().strip()
    except OSError:
        return 0, ""
    return int(stat.rsplit(")", 1)[1].split()[1]), comm


def launchers_above(pid: Optional[int] = None) -> list[tuple[int, str]]:
    """(pid, command name) of the MPI launcher processes above this one, nearest first."""
    out: list[tuple[int, str]] = []
    pid = _parent(pid or os.getpid())[0]
    for _ in range(8):  # a few levels at most
        if pid <= 1:
            break
        ppid, comm = _parent(pid)
        if comm not in LAUNCHERS:
            break
        out.append((pid, comm))
        pid = ppid
    return out


def launcher_on_terminal(pid: Optional[int] = None) -> bool:
    """True when an MPI launcher above this process (rank -> proxy -> mpirun) writes its
    output to a terminal; False for a process that no launcher started."""
    for lpid, _ in launchers_above(pid):
        try:
            if os.readlink(f"/proc/{lpid}/fd/1").startswith(("/dev/pts/", "/dev/tty")):
                return True
        except OSError:
            return False
    return False


def wants_bar(mode: str, stream: Optional[TextIO] = None) -> bool:
    """Whether ``mode`` draws a bar on ``stream`` (stdout by default) here."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode in ("lines", "none"):
        return False
    if mode == "bar":
        return True
    if any(comm in LINE_FORWARDING for _, comm in launchers_above()):
        return False
    return (stream or sys.stdout).isatty() or launcher_on_terminal()


class Progress:
    """Counts units of work (steps, points, scheme-epochs) towards ``total``.

    ``tty`` forces the style for tests and callers that know better (True: bar, False: lines);
    ``quiet`` (or mode ``none``) shows nothing. Messages go through :meth:`line`, which keeps
    them above a running bar.
    """

    def __init__(
        self,
        total: int,
        *,
        mode: str = "auto",
        stream: Optional[TextIO] = None,
        tty: Optional[bool] = None,
        quiet: bool = False,
    ) -> None:
        self.total = max(0, int(total))
        self.done = 0
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        self.quiet = quiet or mode == "none"
        bar = (wants_bar(mode, self.stream) if tty is None else tty) and not self.quiet
        self.bar: Optional[tqdm] = None
        if bar:
            self.bar = tqdm(
                total=self.total,
                file=self.stream,
                bar_format=BAR_FORMAT,
                dynamic_ncols=False,
                ncols=100,
                mininterval=0.1,
                leave=False,
            )

    @property
    def is_bar(self) -> bool:
        return self.bar is not None

    def line(self, text: str) -> None:
        """A message for the log (or above the bar); nothing when quiet."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.bar is not None:
            self.bar.refresh()

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
            self.bar = None
