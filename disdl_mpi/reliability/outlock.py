"""One run per results folder: ``OUT/.lock`` names its holder (host, pid, start time, job).

Two runs writing into the same ``--out`` would overwrite each other's summaries and meet in
each other's checkpoint folder. The first run takes the lock with an exclusive create; a second
one is refused at start, before any work, with the holder named. A lock whose holder is gone is
taken over and said so: a holder on this host whose pid no longer runs, or the same SLURM job
(a requeued job restarts, possibly on another node, and finds its own lock).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK = ".lock"


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another node: it cannot be checked from here, so it is respected
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        return True
    try:  # a killed process whose parent has not reaped it yet is gone too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def check_writable(out: Path) -> Optional[str]:
    """Prove the results folder is writable before any training starts (None: it is)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return f"--out {out}: results folder is not writable ({exc.strerror or exc})"
    return None


def acquire(out: Path) -> tuple[Optional[str], Optional[str]]:
    """Take ``out``'s lock; returns (error, note): an error names the live holder, a note says
    that a dead holder's lock was taken over."""
    path = out / LOCK
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "job": os.environ.get("SLURM_JOB_ID"),
    }
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            same_job = me["job"] is not None and holder.get("job") == me["job"]
            if holder and not same_job and _holder_alive(holder):
                return (
                    f"--out {out} is in use by another run: host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, started {holder.get('started')}"
                    + (f", SLURM job {holder['job']}" if holder.get("job") else "")
                    + f"; choose another --out, or remove {path} if that run is gone"
                ), None
            note = (
                f"note: took over the lock of a run that is gone (pid {holder.get('pid')} "
                f"on {holder.get('host')}, started {holder.get('started')})"
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return None, note
    return f"--out {out}: could not take {path}", None


def release(out: Path) -> None:
    """Drop the lock if this process holds it."""
    path = out / LOCK
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
