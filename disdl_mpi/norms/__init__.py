"""Normalization schemes for data-isolated training (the registry is in registry.py)."""

from __future__ import annotations

from disdl_mpi.norms.registry import (
    SCHEMES,
    available_schemes,
    build_for_run,
    get_scheme,
    is_norm_layer,
    norm_layers,
    norm_state_ids,
    resolve_schemes,
    scheme_class,
    scheme_config_errors,
)
from disdl_mpi.norms.scheme import CommTimer, NormScheme

__all__ = [
    "SCHEMES",
    "CommTimer",
    "NormScheme",
    "available_schemes",
    "build_for_run",
    "get_scheme",
    "is_norm_layer",
    "norm_layers",
    "norm_state_ids",
    "resolve_schemes",
    "scheme_class",
    "scheme_config_errors",
]
