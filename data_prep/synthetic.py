"""Synthetic class-conditional data of any size, generated in blocks, deterministic by seed.

Sample i of class c is ``mean_c / 2 + noise / 2`` (8-bit), where every class has its own random
mean image and the noise is uniform; block b of the training set comes from its own random
stream, so any block can be produced alone and the data never needs to exist in memory whole.
A block is handed out in pieces of at most ``PIECE_BYTES`` (the same bytes as drawn whole), so
memory does not grow with the sample size: a block of 16 384 images of 3x224x224 is 2.3 GiB.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.source_base import Source, sha256_arrays

GEN_BLOCK = 16384  # samples per random stream; fixed, so the data does not depend on chunking
PIECE_BYTES = 64 << 20  # at most this much of a block is in memory at once


class SyntheticSource(Source):
    def __init__(
        self,
        *,
        seed: int = 0,
        num_samples: int = 10000,
        num_test: int = 2000,
        shape: tuple[int, ...] = (3, 32, 32),
        num_classes: int = 10,
        dtype: str = "uint8",
    ):
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise DataPrepError(f"synthetic: --shape {shape} must be C,H,W or D, all positive")
        if num_samples < 1 or num_test < 0:
            raise DataPrepError(
                f"synthetic: --num-samples must be >= 1 and --num-test >= 0, got {num_samples} and {num_test}"
            )
        if not 2 <= num_classes <= 1_000_000:
            raise DataPrepError(f"synthetic: --num-classes must be >= 2, got {num_classes}")
        if dtype not in ("uint8", "float32"):
            raise DataPrepError(f"synthetic: --dtype must be uint8 or float32, got {dtype!r}")
        self.name = "synthetic"
        self.seed = int(seed)
        self.sample_shape = shape
        self.num_classes = int(num_classes)
        self.x_dtype = np.dtype(dtype)
        self.options = {
            "num_samples": int(num_samples),
            "num_test": int(num_test),
            "shape": list(shape),
            "num_classes": int(num_classes),
            "dtype": dtype,
        }
        self._dim = int(np.prod(shape, dtype=np.int64))
        rng = np.random.default_rng([self.seed, 0])
        self._means = rng.integers(0, 256, size=(num_classes, self._dim), dtype=np.uint8) >> 1
        self.y_train = (
            np.random.default_rng([self.seed, 1]).integers(0, num_classes, size=num_samples).astype(np.int64)
        )
        self._y_test = (
            np.random.default_rng([self.seed, 2]).integers(0, num_classes, size=num_test).astype(np.int64)
        )
        # The data is a function of these parameters, so they identify it.
        self.sha256 = sha256_arrays(
            np.array([self.seed, num_samples, num_test, num_classes]),
            np.array(shape),
            np.frombuffer(dtype.encode(), np.uint8),
        )

    def _pieces(self, y: np.ndarray, stream: int, block: int) -> Iterator[tuple[int, np.ndarray]]:
        """(offset in the block, samples) in pieces of at most PIECE_BYTES of uint8."""
        gen = np.random.PCG64([self.seed, stream, block])
        rows = max(1, PIECE_BYTES // self._dim)
        carry = np.empty(0, np.uint8)  # drawn bytes that belong to the next piece
        for lo in range(0, len(y), rows):
            yp = y[lo : lo + rows]
            n = len(yp) * self._dim
            # Raw 64-bit draws viewed as bytes (~7x faster than Generator.bytes); drawn in
            # order, piece after piece, they are the bytes of the whole block drawn at once.
            words = (n - len(carry) + 7) // 8
            bits = np.concatenate([carry, gen.random_raw(words).view(np.uint8)])
            carry = bits[n:].copy()
            x = bits[:n].reshape(len(yp), self._dim)
            x >>= 1
            x += self._means[yp]  # both halves < 128: no uint8 overflow
            if self.x_dtype == np.float32:
                x = x.astype(np.float32) * np.float32(1 / 255)
            yield lo, x.reshape(len(yp), *self.sample_shape)

    def train_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n_train, GEN_BLOCK):
            y = self.y_train[start : start + GEN_BLOCK]
            for lo, x in self._pieces(y, 3, start // GEN_BLOCK):
                yield start + lo, x

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [
            x
            for s in range(0, len(self._y_test), GEN_BLOCK)
            for _, x in self._pieces(self._y_test[s : s + GEN_BLOCK], 4, s // GEN_BLOCK)
        ]
        x = np.concatenate(parts) if parts else np.zeros((0, *self.sample_shape), self.x_dtype)
        return x, self._y_test
