"""Feature shift: each rank's inputs come from a domain of its own (``--partition feature:KIND``).

Labels are split IID; what differs between ranks is the input distribution: rank r's images
(training and its own test split) pass through a fixed transform T_r:

- ``rotate``: rotation by (r mod 4) x 90 degrees (square images);
- ``contrast``: x -> c_r x + (1 - c_r) m, c_r from 1.0 (rank 0) down to 0.3 (last rank),
  m the middle of the data's value range [0, top];
- ``noise``: additive Gaussian noise, sigma_r from 0 (rank 0) to 15 % of the value range;
- ``mixed``: all three.

The global test set is the union of the ranks' domain test splits (each test image belongs to
exactly one rank's domain), so the global accuracy covers every domain; each rank also gets its
own split (``test_rank_RRRRR.h5``) to measure the accuracy on its own domain -- the case FedBN
(Li et al. 2021) is designed for. Transforms are deterministic in (seed, rank, sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.errors import DataPrepError

KINDS = ("rotate", "contrast", "noise", "mixed")


@dataclass(frozen=True)
class Domain:
    rank: int
    rotate: int  # quarter turns
    contrast: float
    noise: float  # sigma as a fraction of the value range
    top: float  # the top of the data's value range (digits 16, 8-bit images 255)

    def as_dict(self) -> dict:
        return {
            "rank": self.rank,
            "rotate_quarter_turns": self.rotate,
            "contrast": self.contrast,
            "noise": self.noise,
            "value_max": self.top,
        }


def domains(kind: str, ranks: int, top: float) -> list[Domain]:
    if kind not in KINDS:
        raise DataPrepError(f"feature:{kind}: the domain kind must be one of {', '.join(KINDS)}")
    out = []
    for r in range(ranks):
        t = r / max(1, ranks - 1)
        out.append(
            Domain(
                r,
                r % 4 if kind in ("rotate", "mixed") else 0,
                1.0 - 0.7 * t if kind in ("contrast", "mixed") else 1.0,
                0.15 * t if kind in ("noise", "mixed") else 0.0,
                float(top),
            )
        )
    return out


def apply(x: np.ndarray, d: Domain, seed: int, first_index: int) -> np.ndarray:
    """T_r of a block of samples (N, C, H, W) or (N, D) whose first global index is given."""
    if d.rotate == 0 and d.contrast == 1.0 and d.noise == 0.0:
        return x
    out = x.astype(np.float32)
    if d.rotate:
        if out.ndim != 4 or out.shape[2] != out.shape[3]:
            raise DataPrepError("feature:rotate needs square images (N, C, H, W)")
        out = np.rot90(out, d.rotate, axes=(2, 3))
    integer = np.issubdtype(x.dtype, np.integer)
    top = d.top
    if d.contrast != 1.0:
        out = d.contrast * out + (1.0 - d.contrast) * (top / 2)
    if d.noise:
        rng = np.random.default_rng([int(seed), 0xD0, d.rank, int(first_index)])
        out = out + rng.standard_normal(out.shape, dtype=np.float32) * (d.noise * top)
    if integer:
        out = np.clip(np.rint(out), 0, top)
    return np.ascontiguousarray(out.astype(x.dtype))


def test_split(n: int, ranks: int, seed: int) -> np.ndarray:
    """The domain (rank) of each test sample: a seeded, near-equal split."""
    owner = np.arange(n) % ranks
    return np.random.default_rng([int(seed), 0xD1]).permutation(owner)
