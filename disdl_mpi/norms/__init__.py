"""Normalization schemes for data-isolated training (the registry is in registry.py)."""
from __future__ import annotations

from disdl_mpi.norms.registry import (SCHEMES, NormScheme, NormSpec, available_schemes,
                                      get_scheme, is_norm_layer, norm_layers, norm_state_ids,
                                      resolve_schemes)

__all__ = ["SCHEMES", "NormScheme", "NormSpec", "available_schemes", "get_scheme",
           "is_norm_layer", "norm_layers", "norm_state_ids", "resolve_schemes"]
