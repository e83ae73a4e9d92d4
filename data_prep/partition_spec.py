"""Partition specs (``--partition``): which rank gets which training sample.

Every spec gives, per rank, the sorted global indices of its samples; together they cover
every training sample exactly once. Randomness comes only from the seed.

- ``iid``: a random permutation cut into near-equal parts.
- ``quantity:BETA``: rank sizes from Dirichlet(BETA) (size skew), labels IID.
- ``dirichlet:ALPHA``: each rank's class mix is drawn from Dirichlet(ALPHA); the mixes are
  then scaled by iterative proportional fitting so that every sample is used once and the rank
  sizes meet their targets (equal sizes, or Dirichlet(BETA) sizes with ``+quantity:BETA``).
- ``shards:K``: each rank holds exactly K classes; every class is held by at least one rank;
  a class held by several ranks is split evenly among them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from data_prep.errors import DataPrepError


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec; ``name`` is the canonical spelling stored in the outputs."""

    kind: str  # iid | quantity | dirichlet | shards | feature
    alpha: float | None = None  # label skew (dirichlet)
    beta: float | None = None  # size skew (quantity)
    shards: int | None = None  # classes per rank (shards)
    domain: str | None = None  # feature shift: rotate | contrast | noise | mixed
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.kind == "iid":
            return "iid"
        if self.kind == "shards":
            return f"shards:{self.shards}"
        if self.kind == "feature":
            return f"feature:{self.domain}"
        parts = []
        if self.alpha is not None:
            parts.append(f"dirichlet:{_fmt(self.alpha)}")
        if self.beta is not None:
            parts.append(f"quantity:{_fmt(self.beta)}")
        return "+".join(parts)


def _fmt(v: float) -> str:
    """Shortest exact spelling: 1.0 -> '1', 0.1 -> '0.1'."""
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _positive(text: str, what: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataPrepError(f"partition {spec!r}: {what} {text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise DataPrepError(f"partition {spec!r}: {what} must be a positive finite number, got {text}")
    return v


def parse_partition(spec: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:A``, ``quantity:B``, ``dirichlet:A+quantity:B``, ``shards:K``,
    ``feature:KIND`` (IID labels, a per-rank input domain; data_prep/domains.py)."""
    usage = (
        "expected iid, dirichlet:ALPHA, quantity:BETA, dirichlet:ALPHA+quantity:BETA, "
        "shards:K or feature:KIND"
    )
    text = (spec or "").strip().lower()
    if text == "iid":
        return PartitionSpec("iid", params={})
    if text.startswith("feature:"):
        from data_prep.domains import KINDS

        kind = text.partition(":")[2]
        if kind not in KINDS:
            raise DataPrepError(f"partition {spec!r}: the domain kind must be one of {', '.join(KINDS)}")
        return PartitionSpec("feature", domain=kind, params={"domain": kind})
    alpha = beta = shards = None
    for part in text.split("+"):
        key, sep, val = part.strip().partition(":")
        if not sep or not val:
            raise DataPrepError(f"partition {spec!r}: {usage}")
        if key == "dirichlet" and alpha is None:
            alpha = _positive(val, "ALPHA", spec)
        elif key == "quantity" and beta is None:
            beta = _positive(val, "BETA", spec)
        elif key == "shards" and shards is None and "+" not in text:
            try:
                shards = int(val)
            except ValueError:
                raise DataPrepError(f"partition {spec!r}: K must be an integer, got {val!r}") from None
            if shards < 1:
                raise DataPrepError(f"partition {spec!r}: K must be at least 1, got {shards}")
        else:
            raise DataPrepError(f"partition {spec!r}: {usage}")
    if shards is not None:
        return PartitionSpec("shards", shards=shards, params={"shards": shards})
    params = {}
    if alpha is not None:
        params["alpha"] = alpha
    if beta is not None:
        params["beta"] = beta
    return PartitionSpec(
        "dirichlet" if alpha is not None else "quantity", alpha=alpha, beta=beta, params=params
    )


def split_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` that sum to ``total`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    if total == 0 or w.sum() <= 0:
        out = np.zeros(len(w), dtype=np.int64)
        if total:  # no weight at all: spread evenly
            out += total // len(w)
            out[: total - out.sum()] += 1
        return out
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    rest = total - int(out.sum())
    if rest:
        # Ties broken by index, so the result depends only on the weights.
        order = np.lexsort((np.arange(len(w)), -(exact - out)))
        out[order[:rest]] += 1
    return out


def _enforce_min_sizes(sizes: np.ndarray, min_per_rank: int) -> np.ndarray:
    """Raise ranks below the minimum by taking samples from the largest ranks."""
    sizes = sizes.copy()
    for r in np.flatnonzero(sizes < min_per_rank):
        while sizes[r] < min_per_rank:
            d = int(np.argmax(sizes))
            take = min(min_per_rank - sizes[r], sizes[d] - min_per_rank)
            sizes[d] -= take
            sizes[r] += take
    return sizes


def target_sizes(
    total: int, ranks: int, beta: float | None, rng: np.random.Generator, min_per_rank: int
) -> np.ndarray:
    """Per-rank sample counts: equal, or Dirichlet(beta)-skewed, honouring the minimum."""
    if beta is None:
        weights = np.ones(ranks)
    else:
        weights = rng.dirichlet(np.full(ranks, beta))
    return _enforce_min_sizes(split_counts(total, weights), min_per_rank)


def _ipf(q: np.ndarray, rows: np.ndarray, cols: np.ndarray, iters: int = 5000) -> np.ndarray:
    """Scale ``q`` (ranks x classes) so its row sums are ``rows`` and column sums ``cols``."""
    a = q.copy()
    for _ in range(iters):
        rs = a.sum(axis=1)
        a *= np.divide(rows, rs, out=np.zeros_like(rs), where=rs > 0)[:, None]
        cs = a.sum(axis=0)
        a *= np.divide(cols, cs, out=np.zeros_like(cs), where=cs > 0)[None, :]
        if np.abs(a.sum(axis=1) - rows).max() <= 1e-6 * max(1.0, rows.max()):
            break
    return a


def dirichlet_counts(
    class_counts: np.ndarray, sizes: np.ndarray, alpha: float, rng: np.random.Generator, min_per_rank: int
) -> np.ndarray:
    """Integer matrix (ranks x classes): rank mixes ~ Dirichlet(alpha), exact class totals."""
    ranks, ncls = len(sizes), len(class_counts)
    q = rng.dirichlet(np.full(ncls, alpha), size=ranks)
    # A tiny floor keeps IPF well defined when alpha is small and a mix is numerically one-hot.
    q = np.maximum(q, 1e-12) * (class_counts > 0)[None, :]
    fitted = _ipf(q, sizes.astype(np.float64), class_counts.astype(np.float64))
    counts = np.stack([split_counts(int(class_counts[c]), fitted[:, c]) for c in range(ncls)], axis=1)
    # Rounding can leave a rank a little short of the minimum: move single samples over,
    # choosing the class the receiving rank likes best among those the donor holds.
    for r in range(ranks):
        while counts[r].sum() < min_per_rank:
            row_sums = counts.sum(axis=1)
            d = int(np.argmax(row_sums))
            held = counts[d] > 0
            c = int(np.argmax(np.where(held, q[r], -1.0)))
            counts[d, c] -= 1
            counts[r, c] += 1
    return counts


def shard_classes(
    ranks: int, k: int, num_classes: int, present: np.ndarray, rng: np.random.Generator
) -> list[list[int]]:
    """K distinct classes per rank, every present class held by at least one rank."""
    classes = [c for c in range(num_classes) if present[c]]
    n = len(classes)
    if k > n:
        raise DataPrepError(
            f"partition shards:{k}: each rank must hold {k} distinct classes, but "
            f"the training set has only {n} classes"
        )
    if ranks * k < n:
        raise DataPrepError(
            f"partition shards:{k} with {ranks} ranks gives {ranks * k} class slots, fewer than the "
            f"{n} classes in the training set, so some classes would be dropped; use more ranks "
            f"or a larger K (at least {math.ceil(n / ranks)})"
        )
    perm = [classes[i] for i in rng.permutation(n)]
    # Walking the permuted class list cyclically gives K consecutive (hence distinct, as K<=n)
    # classes per rank and spreads the holders of each class as evenly as possible.
    return [[perm[(r * k + i) % n] for i in range(k)] for r in range(ranks)]


def assign(
    y: np.ndarray, num_classes: int, ranks: int, spec: PartitionSpec, seed: int, min_per_rank: int = 1
) -> list[np.ndarray]:
    """Sorted global sample indices per rank; every index in exactly one rank."""
    if ranks < 1:
        raise DataPrepError(f"--ranks must be at least 1, got {ranks}")
    if min_per_rank < 0:
        raise DataPrepError(f"--min-per-rank must be >= 0, got {min_per_rank}")
    total = len(y)
    if total < ranks * min_per_rank:
        raise DataPrepError(
            f"{total} training samples cannot give {ranks} ranks at least "
            f"{min_per_rank} each (--min-per-rank 0 allows empty ranks)"
        )
    ss = np.random.SeedSequence([int(seed), 0x5EED])
    draw_rng, shuffle_rng = (np.random.default_rng(s) for s in ss.spawn(2))
    class_counts = np.bincount(y, minlength=num_classes).astype(np.int64)

    if spec.kind in ("iid", "quantity", "feature"):
        sizes = target_sizes(total, ranks, spec.beta, draw_rng, min_per_rank)
        perm = shuffle_rng.permutation(total)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        parts = [perm[bounds[r] : bounds[r + 1]] for r in range(ranks)]
    else:
        if spec.kind == "dirichlet":
            sizes = target_sizes(total, ranks, spec.beta, draw_rng, min_per_rank)
            counts = dirichlet_counts(class_counts, sizes, spec.alpha, draw_rng, min_per_rank)
        else:
            counts = _shard_counts(class_counts, ranks, spec.shards, draw_rng, min_per_rank)
        parts_by_rank: list[list[np.ndarray]] = [[] for _ in range(ranks)]
        by_class = np.argsort(y, kind="stable")
        starts = np.concatenate([[0], np.cumsum(class_counts)])
        for c in range(num_classes):
            members = by_class[starts[c] : starts[c + 1]]
            members = members[shuffle_rng.permutation(len(members))]
            cut = np.concatenate([[0], np.cumsum(counts[:, c])])
            for r in range(ranks):
                parts_by_rank[r].append(members[cut[r] : cut[r + 1]])
        parts = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts_by_rank]
    out = [np.sort(p).astype(np.int64) for p in parts]
    if sum(len(p) for p in out) != total:  # a bug, never bad input
        raise AssertionError("partition does not cover the training set exactly once")
    return out


def _shard_counts(
    class_counts: np.ndarray, ranks: int, k: int, rng: np.random.Generator, min_per_rank: int
) -> np.ndarray:
    held = shard_classes(ranks, k, len(class_counts), class_counts > 0, rng)
    counts = np.zeros((ranks, len(class_counts)), dtype=np.int64)
    for c in range(len(class_counts)):
        holders = [r for r in range(ranks) if c in held[r]]
        if not holders:
            continue
        share = split_counts(int(class_counts[c]), np.ones(len(holders)))
        if share.min() == 0:
            raise DataPrepError(
                f"partition shards:{k}: class {c} has {class_counts[c]} samples but is shared by "
                f"{len(holders)} ranks, so some rank would not hold exactly {k} classes; "
                f"use fewer ranks or a smaller K"
            )
        counts[holders, c] = share
    small = np.flatnonzero(counts.sum(axis=1) < min_per_rank)
    if len(small):
        r = int(small[0])
        raise DataPrepError(
            f"partition shards:{k}: rank {r} gets only {counts[r].sum()} samples, "
            f"below --min-per-rank {min_per_rank}"
        )
    return counts
