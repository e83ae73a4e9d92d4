"""Normalization schemes for data-isolated training (registry in registry.py)."""
from __future__ import annotations

from .registry import (SCHEMES, NormScheme, NormSpec, available_norms, get_norm,
                       is_norm_layer)

__all__ = ["SCHEMES", "NormScheme", "NormSpec", "available_norms", "get_norm", "is_norm_layer"]
