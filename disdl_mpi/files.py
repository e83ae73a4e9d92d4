"""Files a reader can trust: atomic writes, JSON-safe values, Markdown tables.

Every file the toolkit writes goes through :func:`atomic_path`: the content is written to a
temporary file beside the target and renamed over it only on success, so a reader (or a job
killed mid-write) never sees half a file, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    ``fsync`` flushes the finished file to stable storage before the rename (checkpoints,
    manifests: what a restart must find intact after a power loss or a node crash).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; results are meant to be shared, so honour the umask instead.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any, *, fsync: bool = False) -> None:
    write_text(path, json.dumps(jsonable(obj), indent=2) + "\n", fsync=fsync)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: numpy/torch scalars become numbers, tuples lists, anything
    else its ``str``; a value read back from disk compares equal to the one written."""
    return json.loads(json.dumps(obj, default=_plain))


def _plain(o: Any) -> Any:
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    if hasattr(o, "tolist") and callable(o.tolist):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str | Sequence[str] = "r"
) -> str:
    """A pipe table; ``align`` is one of l/r/c per column (or one letter for all but the first,
    which is left-aligned). Cells are written with ``str``."""
    if isinstance(align, str):
        align = ["l"] + [align] * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
