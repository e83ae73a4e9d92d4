"""MPICH's allreduce algorithm, chosen by message size (a collective-selection JSON file).

MPICH's default for a non-power-of-two communicator is recursive doubling below a power-of-two
element count and reduce-scatter + allgather (Rabenseifner) above; on 3 nodes both first fold
the extra rank in, which moves about twice the bytes: the measured busbw on 3 nodes at 1 Gbit/s
is under half the link. The ring moves the minimum, 2(p-1)/p of the message, at p-1 extra
latencies per phase, so it wins for large messages and loses for small ones. This file keeps
MPICH's own choices for power-of-two communicators and for messages below ``ring_from`` bytes,
and picks the ring above it, for the blocking and the nonblocking allreduce (our gradient
buckets use the latter). ``MPIR_CVAR_COLL_SELECTION_TUNING_JSON_FILE`` points MPICH at it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

ENV = "MPIR_CVAR_COLL_SELECTION_TUNING_JSON_FILE"
DEFAULT_RING_FROM = 64 * 1024


def _default(blocking: bool) -> dict:
    """MPICH 5's own intra-communicator allreduce subtree for messages above 8 bytes."""
    rd = (
        "algorithm=MPIR_Allreduce_intra_recursive_doubling"
        if blocking
        else "algorithm=MPIR_Iallreduce_intra_sched_recursive_doubling"
    )
    rsag = (
        "algorithm=MPIR_Allreduce_intra_reduce_scatter_allgather"
        if blocking
        else "algorithm=MPIR_Iallreduce_intra_sched_reduce_scatter_allgather"
    )
    return {
        "is_op_built_in=no": {rd: {}},
        "is_op_built_in=yes": {"count<pow2": {rd: {}}, "count=any": {rsag: {}}},
    }


def _tree(blocking: bool, ring_from: int) -> dict:
    ring = "algorithm=MPIR_Allreduce_intra_ring" if blocking else "algorithm=MPIR_Iallreduce_intra_tsp_ring"
    rd = (
        "algorithm=MPIR_Allreduce_intra_recursive_doubling"
        if blocking
        else "algorithm=MPIR_Iallreduce_intra_sched_recursive_doubling"
    )
    small = "avg_msg_size<=8" if blocking else "avg_msg_size<=2048"
    return {
        "comm_type=intra": {
            "comm_size=pow2": {small: {rd: {}}, "avg_msg_size=any": _default(blocking)},
            "comm_size=any": {
                small: {rd: {}},
                f"avg_msg_size<{ring_from}": _default(blocking),
                "avg_msg_size=any": {"is_op_built_in=no": {rd: {}}, "is_op_built_in=yes": {ring: {}}},
            },
        }
    }


def builtin_selection(library: Path) -> Optional[dict]:
    """The MPIR-level selection tree compiled into the MPICH library (every collective), or
    None when the library holds none (another MPI, another version)."""
    try:
        data = library.read_bytes()
    except OSError:
        return None
    decoder = json.JSONDecoder()
    for m in re.finditer(rb'\{"collective=bcast":\{"comm_type=intra":\{"comm_size<8"', data):
        end = data.find(b"\0", m.start())
        try:
            tree, _ = decoder.raw_decode(data[m.start() : end].decode("ascii"))
        except ValueError:
            continue
        if "collective=iallreduce" in tree and "collective=allreduce" in tree:
            return tree
    return None


def selection(base: dict, ring_from: int = DEFAULT_RING_FROM) -> dict:
    """``base`` (MPICH's own tree) with its intra-communicator allreduce choices replaced."""
    tree = json.loads(json.dumps(base))
    for name, blocking in (("collective=allreduce", True), ("collective=iallreduce", False)):
        tree[name] = {**tree[name], **_tree(blocking, ring_from)}
    return tree


def write(path: Path, library: Path, ring_from: int = DEFAULT_RING_FROM) -> Optional[Path]:
    """Write the selection file for ``library``; None when it has no tree to start from."""
    base = builtin_selection(library)
    if base is None:
        return None
    path.write_text(json.dumps(selection(base, ring_from)) + "\n")
    return path


def mpich_library() -> Path:
    """The libmpi that mpi4py loads (the MPICH wheel's, in the venv)."""
    from mpi4py import MPI

    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libmpi.so" in line:
            return Path(line.split()[-1])
    return Path(MPI.__file__)


def describe(ring_from: int = DEFAULT_RING_FROM) -> str:
    """The choice, in words, for logs and reports."""
    return (
        f"allreduce: MPICH's default on power-of-two communicators and below "
        f"{ring_from // 1024} KiB; ring at >= {ring_from // 1024} KiB on other sizes"
    )
