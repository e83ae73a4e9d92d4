"""Load this rank's private partition and validate it collectively.

Every rank reads ``partition.json``, its own ``rank_{r:05d}.h5`` and ``test.h5`` -- never
another rank's file. Problems found on any rank are gathered and raised on EVERY rank as one
``PartitionError`` naming file, rank and field, so a bad partition ends the job in seconds
instead of leaving healthy ranks blocked in their next collective.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from disdl_mpi.data.budget import over_budget
from disdl_mpi.data.local_data import LocalData, TestRows, TrainRows
from disdl_mpi.data.residency import choose as choose_residency
from disdl_mpi.data.standardize import ChannelSums
from disdl_mpi.data.layout import (MANIFEST, TEST_FILE, ContentHash, domain_test_file,
                                   rank_file, shard_bounds)

from disdl_mpi.errors import UserError

X_DTYPES = ("uint8", "float32")
# (file, field, problem): one finding on one rank; identical findings on several ranks merge.
Problem = tuple[str, str, str]


class PartitionError(UserError):
    """An unusable partition; raised on every rank at the same point (collective)."""

    def __init__(self, message: str, *, collective: bool = True, exit_code: int = 2):
        super().__init__(message, collective=collective, exit_code=exit_code)


def _ranks_text(ranks: list[int]) -> str:
    ranks = sorted(set(ranks))
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


def _raise_if_any(data_dir: Path, per_rank: list[list[Problem]]) -> None:
    """Raise one PartitionError listing every finding; identical ones on several ranks merge."""
    by_key: dict[Problem, list[int]] = {}
    for r, probs in enumerate(per_rank):
        for p in probs:
            by_key.setdefault(tuple(p), []).append(r)
    if by_key:
        lines = [f"  {file}: {_ranks_text(rs)}: field '{field}': {problem}"
                 for (file, field, problem), rs in by_key.items()]
        raise PartitionError(f"invalid partition in {data_dir}:\n" + "\n".join(lines))


def _agree(comm, data_dir: Path, problems: list[Problem]) -> None:
    """Allgather findings; if any rank found a problem, every rank raises the same error."""
    _raise_if_any(data_dir, comm.allgather(problems))


def _relaunch_hint(n: int, k: int) -> str:
    """How to launch a job of ``n`` isolated ranks, with ``k`` per process where k divides n."""
    if k > 1 and n % k == 0:
        return f"launch with mpiexec -n {n // k} ... --virtual-ranks {k} (= {n} isolated ranks)"
    if k > 1:
        return f"launch {n} isolated ranks (--virtual-ranks K with K dividing {n}, mpiexec -n {n}/K)"
    return f"launch with mpiexec -n {n}"


def _read_manifest(
    path: Path, world_size: int, virtual_ranks: int = 1
) -> tuple[dict | None, str, list[Problem]]:
    f = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "", [(f, "manifest", "manifest file is missing (build the partition "
                                                "with python -m data_prep.partition)")]
    except OSError as exc:
        return None, "", [(f, "manifest", f"cannot be read: {exc}")]
    digest = hashlib.sha256(raw).hexdigest()
    try:
        m = json.loads(raw)
    except ValueError as exc:
        return None, digest, [(f, "manifest", f"is not valid JSON ({exc})")]
    if not isinstance(m, dict):
        return None, digest, [(f, "manifest", "is not a JSON object")]
    probs: list[Problem] = []

    def bad(field: str, problem: str) -> None:
        probs.append((f, field, problem))

    def is_int(v: Any, lo: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    for key in ("world_size", "num_classes", "sample_shape", "x_dtype", "ranks", "test"):
        if key not in m:
            bad(key, "missing")
    if probs:
        return None, digest, probs
    n = m["world_size"]
    if not is_int(n, 1):
        bad("world_size", f"must be a positive integer, got {n!r}")
    elif n != world_size:
        bad("world_size", f"the partition has {n} ranks but the job has {world_size}; "
                          f"{_relaunch_hint(n, virtual_ranks)} or build a partition for {world_size} ranks")
    if not is_int(m["num_classes"], 1):
        bad("num_classes", f"must be a positive integer, got {m['num_classes']!r}")
    shape = m["sample_shape"]
    if not (isinstance(shape, list) and len(shape) in (1, 3) and all(is_int(s, 1) for s in shape)):
        bad("sample_shape", f"must be [C, H, W] or [D] of positive integers, got {shape!r}")
    if m["x_dtype"] not in X_DTYPES:
        bad("x_dtype", f"must be one of {', '.join(X_DTYPES)}, got {m['x_dtype']!r}")
    entries = m["ranks"]
    if not isinstance(entries, list) or (is_int(n, 1) and len(entries) != n):
        bad("ranks", f"must be a list of {n} rank entries, got "
                     f"{len(entries) if isinstance(entries, list) else type(entries).__name__}")
    else:
        for i, e in enumerate(entries):
            if not (isinstance(e, dict) and e.get("rank") == i and e.get("file") == rank_file(i)
                    and is_int(e.get("size")) and isinstance(e.get("sha256"), str)):
                bad(f"ranks[{i}]", f"must be {{rank: {i}, file: {rank_file(i)!r}, size, "
                                   f"class_counts, sha256}}, got {e!r:.200}")
                break
    t = m["test"]
    if not (isinstance(t, dict) and t.get("file") == TEST_FILE and is_int(t.get("size"))
            and isinstance(t.get("sha256"), str)):
        bad("test", f"must be {{file: {TEST_FILE!r}, size, sha256}}, got {t!r:.200}")
    dom = m.get("domain_tests")
    if dom is not None and not (isinstance(dom, list) and is_int(n, 1) and len(dom) == n and all(
            isinstance(e, dict) and e.get("rank") == i and e.get("file") == domain_test_file(i)
            and is_int(e.get("size")) and isinstance(e.get("sha256"), str)
            for i, e in enumerate(dom))):
        bad("domain_tests", f"must be {n} entries {{rank, file, size, sha256}}, got "
                            f"{dom!r:.200}")
    return (None if probs else m), digest, probs


# Rows of x read (and hashed, and checked) per block: the working set beside the kept rows.
_READ_BLOCK_BYTES = 16 << 20


def _read_rows(dx: h5py.Dataset, rows: tuple[int, int], h: ContentHash | None,
               sums: ChannelSums | None = None) -> tuple[np.ndarray, int]:
    """Rows [lo, hi) of ``dx``, reading the WHOLE dataset in bounded blocks so the content
    hash (``h``), the finiteness check and the standardization sums (``sums``) still cover
    every row, in this one pass; returns (rows, non-finite count). Memory: the kept rows plus
    one block."""
    lo, hi = rows
    n = dx.shape[0]
    row_bytes = max(1, int(np.prod(dx.shape[1:], dtype=np.int64)) * dx.dtype.itemsize)
    step = max(1, _READ_BLOCK_BYTES // row_bytes)
    out = np.empty((hi - lo,) + tuple(dx.shape[1:]), dtype=dx.dtype)
    bad = 0
    for start in range(0, n, step):
        stop = min(n, start + step)
        if h is None and sums is None and (stop <= lo or start >= hi):
            continue  # nothing to hash, sum or keep
        block = dx[start:stop]
        if h is not None:
            h.add_x(block)
        if sums is not None:
            sums.add(block)
        if block.dtype.kind == "f":
            bad += int(np.count_nonzero(~np.isfinite(block)))
        a, b = max(start, lo), min(stop, hi)
        if a < b:
            out[a - lo:b - lo] = block[a - start:b - start]
    return out, bad


def _read_h5(path: Path, m: dict, size: int, sha: str, verify: bool, attrs: dict[str, int],
             header: list, rows: tuple[int, int] | None = None,
             sums: ChannelSums | None = None
             ) -> tuple[np.ndarray | None, np.ndarray | None, list[Problem]]:
    """Open one partition file and check it against the manifest.

    ``header`` receives the file's (sample shape, dtype) when x could be found, so shapes can
    be compared across ranks even when they also disagree with the manifest. ``rows`` keeps
    only rows [lo, hi) of x (a rank's shard of the test set; none when streaming); every row
    is still read, hashed and checked, in bounded blocks, and added to ``sums``. y is
    returned whole.
    """
    f = str(path)
    if not path.is_file():
        return None, None, [(f, "file", "missing")]
    probs: list[Problem] = []
    shape, dtype, ncls = tuple(m["sample_shape"]), np.dtype(m["x_dtype"]), m["num_classes"]
    try:
        h5 = h5py.File(path, "r", locking=False)
    except Exception as exc:  # h5py raises OSError for truncated / non-HDF5 files
        return None, None, [(f, "file", f"cannot be opened as HDF5, truncated or corrupt? "
                                        f"({str(exc)[:160]})")]
    x = y = None
    with h5:
        for name, want in attrs.items():
            got = h5.attrs.get(name)
            got = np.asarray(got).tolist() if got is not None else None
            if got != want:
                probs.append((f, name, f"attribute is {got!r}, expected {want}"))
        missing = [(f, key, "dataset missing") for key in ("x", "y")
                   if key not in h5 or not isinstance(h5[key], h5py.Dataset)]
        if missing:
            return None, None, probs + missing
        dx, dy = h5["x"], h5["y"]
        header.append((tuple(int(v) for v in dx.shape[1:]), str(dx.dtype)))
        if dx.dtype != dtype:
            probs.append((f, "x", f"dtype {dx.dtype}, expected {dtype} (manifest x_dtype)"))
        if dx.shape[1:] != shape:
            probs.append((f, "x", f"sample shape {dx.shape[1:]}, expected {shape} "
                                  f"(manifest sample_shape)"))
        if dx.shape[:1] != (size,):
            probs.append((f, "x", f"holds {dx.shape[0] if dx.ndim else 0} samples, the manifest "
                                  f"says {size}"))
        if dy.dtype != np.int64 or dy.shape != (size,):
            probs.append((f, "y", f"dtype {dy.dtype} shape {dy.shape}, expected int64 ({size},)"))
        if probs:
            return None, None, probs
        h = ContentHash() if verify else None
        try:
            x, n_bad = _read_rows(dx, rows or (0, size), h, sums)
            y = dy[...]
        except Exception as exc:
            return None, None, [(f, "x/y", f"cannot be read, truncated or corrupt? "
                                           f"({str(exc)[:160]})")]
    if len(y) and (y.min() < 0 or y.max() >= ncls):
        bad = y[(y < 0) | (y >= ncls)]
        probs.append((f, "y", f"{len(bad)} label(s) outside [0, {ncls}) (num_classes), "
                              f"e.g. {int(bad[0])}"))
    if n_bad:
        probs.append((f, "x", f"holds {n_bad} NaN/Inf value(s)"))
    if h is not None and not probs and h.finish(y) != sha:
        probs.append((f, "sha256", "content hash differs from the manifest: the file was "
                                   "modified or corrupted after it was built"))
    return x, y, probs


def _cross_rank(data_dir: Path, headers: list) -> dict[int, Problem]:
    """Ranks whose x sample shape/dtype differs from the most common one."""
    seen = Counter(h for h in headers if h is not None)
    if len(seen) <= 1:
        return {}
    common = seen.most_common(1)[0][0]
    return {r: (str(data_dir / rank_file(r)), "x",
                f"sample shape/dtype {h[0]} {h[1]} differs across ranks (most have "
                f"{common[0]} {common[1]})")
            for r, h in enumerate(headers) if h is not None and h != common}


def _read_own(data_dir: Path, m: dict, own: list[int], verify: bool, mode: str,
              sums: ChannelSums) -> tuple[list, list, list, list[list[Problem]]]:
    """Read and check this process's rank files: (xs, ys, headers, problems), one per rank."""
    xs, ys, headers, probs = [], [], [], []
    for rank in own:
        entry = m["ranks"][rank]
        header: list = []
        x, y, rprobs = _read_h5(data_dir / entry["file"], m, entry["size"], entry["sha256"],
                                verify, {"rank": rank, "world_size": m["world_size"],
                                         "num_classes": m["num_classes"]}, header,
                                rows=(0, 0) if mode == "stream" else None, sums=sums)
        xs.append(x)
        ys.append(y)
        headers.append(header[0] if header else None)
        probs.append(rprobs)
    return xs, ys, headers, probs


def load_partition(comm, data_dir: str | Path, *, verify_hash: bool = True,
                   budget: tuple[int, str] | None = None,
                   test_shard: bool = False, residency: str = "device",
                   virtual_ranks: int = 1) -> LocalData:
    """Load and validate this process's partition files; raise ``PartitionError`` on every rank
    if bad.

    ``verify_hash`` re-hashes the arrays against the manifest's sha256 (one pass, cheap next
    to reading them) to catch silent corruption that HDF5 itself cannot see. ``budget``
    (bytes per rank, how it was derived; the same on every rank) refuses, before any array
    is read, a partition some rank could not hold resident in a resident ``residency``
    (``auto`` streams it instead; see data.residency). ``test_shard`` keeps only this
    process's shard of the test set (``layout.shard_bounds``), the rows it scores. In
    ``stream`` mode the training x is checked (every row hashed, in bounded blocks) but not
    kept: ``train.x`` is None and ``train.path`` the file to stream from.

    ``virtual_ranks`` K > 1: the partition has P x K isolated ranks and process p reads the
    files of ranks p*K .. p*K+K-1 (never another's), concatenated in rank order;
    ``LocalData.sizes`` lists all P x K sizes (disdl_mpi.virtual_ranks).
    """
    data_dir = Path(data_dir)
    process, processes = comm.Get_rank(), comm.Get_size()
    k = int(virtual_ranks)
    world_size = processes * k
    own = list(range(process * k, process * k + k))
    manifest, digest, probs = _read_manifest(data_dir / MANIFEST, world_size, k)
    _agree(comm, data_dir, probs)
    m = manifest
    refusal = over_budget(data_dir, m, *budget) if budget is not None else None
    mode = choose_residency(residency, refusal is None)
    if refusal and mode != "stream":
        raise PartitionError(refusal, collective=True)
    if k > 1 and (mode == "stream" or m.get("domain_tests") is not None):
        raise PartitionError(
            f"{data_dir}: --virtual-ranks {k} cannot "
            + ("stream training data (--data-residency stream, or a partition over the memory "
               "budget)" if mode == "stream" else "score per-rank domain test splits (a feature: "
               "partition)")
            + "; run one MPI rank per isolated rank (--virtual-ranks 1)", collective=True)
    # The standardization sums ride on the checking pass: one read of the file, not two.
    sums = ChannelSums(tuple(m["sample_shape"]))
    xs, ys, headers, own_probs = _read_own(data_dir, m, own, verify_hash, mode, sums)
    n_test = m["test"]["size"]
    test_rows = shard_bounds(n_test, process, processes) if test_shard else (0, n_test)
    xt, yt, tprobs = _read_h5(data_dir / TEST_FILE, m, n_test, m["test"]["sha256"],
                              verify_hash, {"num_classes": m["num_classes"]}, [],
                              rows=test_rows if test_shard else None)
    if yt is not None:
        yt = yt[test_rows[0]:test_rows[1]]
    own_probs[0] += tprobs
    xd = yd = None
    if m.get("domain_tests") is not None:
        e = m["domain_tests"][own[0]]
        xd, yd, dprobs = _read_h5(data_dir / e["file"], m, e["size"], e["sha256"], verify_hash,
                                  {"num_classes": m["num_classes"]}, [])
        own_probs[0] += dprobs
    # One allgather carries every rank's findings, its sample shape (the cross-rank check,
    # which does not trust the manifest) and its size.
    mine = [(p, (h, None if y is None else len(y))) for p, h, y in zip(own_probs, headers, ys)]
    gathered = [item for part in comm.allgather(mine) for item in part]
    probs_all = [p for p, _ in gathered]
    for r, p in _cross_rank(data_dir, [h for _, (h, _) in gathered]).items():
        probs_all[r] = probs_all[r] + [p]
    _raise_if_any(data_dir, probs_all)
    if mode == "stream":
        x = None  # read batch by batch during training
    else:
        x = xs[0] if k == 1 else np.concatenate(xs)
    y = ys[0] if k == 1 else np.concatenate(ys)
    return LocalData(
        train=TrainRows(x, y, path=data_dir / m["ranks"][own[0]]["file"], residency=mode,
                        sums=sums.values(), budget_refusal=refusal),
        test=TestRows(xt, yt, rows=test_rows, total=n_test),
        num_classes=int(m["num_classes"]), sample_shape=tuple(m["sample_shape"]),
        sizes=[n for _, (_, n) in gathered], manifest=m, manifest_sha256=digest,
        domain_test=TestRows(xd, yd, rows=(0, len(yd)), total=len(yd)) if xd is not None else None)
