"""``python -m disdl_mpi.run`` with every model in float64, for the virtual-rank equivalence test.

Why: the test compares 8 MPI ranks with 2 processes x 4 virtual ranks, which sum the same
numbers in a different order. On a skewed partition with tiny ranks a float32 run is too
ill-conditioned for that comparison to mean anything: a 1.5e-8 change of the first conv's
weights (the size of one reordered float32 sum) changes one rank's second-step BN gradient by
1e-3 relative (measured, tests/test_virtual_ranks.py). In float64 the same reordering is 1e-16,
so a difference left at 1e-5 is the virtual-rank logic's, not the rounding's.

Models are built in float64 (torch's default dtype) and take their float32 inputs through a
forward pre-hook that casts them; nothing else of the run changes.
"""

from __future__ import annotations

import sys

import torch

import disdl_mpi.trainer as trainer
from disdl_mpi.run import main

_build = trainer.build_model


def _build_float64(*args, **kwargs):
    model = _build(*args, **kwargs)
    model.register_forward_pre_hook(lambda _m, inputs: tuple(t.double() for t in inputs))
    return model


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    trainer.build_model = _build_float64
    sys.exit(main(sys.argv[1:]))
