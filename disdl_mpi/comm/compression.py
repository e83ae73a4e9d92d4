"""Wire formats for gradient buckets: what dtype travels through MPI.

``none`` sends gradients in their own dtype; ``fp16`` sends float16 (half the bytes of float32).
bfloat16 has no MPI reduction op in any MPI we know (mpi4py maps it to no MPI datatype), so a
bfloat16 gradient travels as float32 (``none``) or float16 (``fp16``) and is cast back after the
reduction. float16 sums are done by MPI in float16: the relative error of one sum is about
2**-11 (~5e-4) per element, and values beyond 65504 overflow to inf, so ``fp16`` suits gradients
of ordinary magnitude (the weighting by local/global samples happens before the cast, which
keeps the summands small).
"""

from __future__ import annotations

import torch

COMPRESSORS = ("none", "fp16")
# dtypes MPI can reduce natively through mpi4py's buffer typecodes
MPI_FLOAT_DTYPES = (torch.float16, torch.float32, torch.float64)


def check(compress: str) -> str:
    if compress not in COMPRESSORS:
        raise ValueError(f"compress must be one of {', '.join(COMPRESSORS)}, got {compress!r}")
    return compress


def wire_dtype(grad_dtype: torch.dtype, compress: str) -> torch.dtype:
    """The dtype a gradient of ``grad_dtype`` travels in under ``compress``."""
    check(compress)
    if not grad_dtype.is_floating_point:
        raise TypeError(f"gradients must be floating point, got {grad_dtype}")
    if compress == "fp16" and grad_dtype in (torch.float32, torch.float64, torch.bfloat16):
        return torch.float16
    if grad_dtype in MPI_FLOAT_DTYPES:
        return grad_dtype
    return torch.float32  # bfloat16 (and any exotic float) travels as float32
