"""The schemes that are nothing but a layer with no communication: bn, gn, ln, in, fedbn, none."""

from __future__ import annotations

from typing import Any

from torch import nn

from disdl_mpi.norms.local_layers import InstanceNormAny, LocalBatchNorm, gn_groups_for
from disdl_mpi.norms.scheme import NormScheme


class LocalBN(NormScheme):
    name = "bn"
    layer_type = LocalBatchNorm
    per_rank_layers = True
    summary = (
        "local BatchNorm (Ioffe & Szegedy 2015) over each rank's own batch: the baseline; its "
        "statistics follow the rank's skewed label mix"
    )


class GroupNormScheme(NormScheme):
    name = "gn"
    summary = (
        "GroupNorm (Wu & He 2018): per-sample statistics over channel groups, independent of "
        "the batch and so of the skew"
    )

    def __init__(self, comm: Any = None, *, gn_groups: int = 8) -> None:
        gn_groups_for(1, gn_groups)  # validates early
        super().__init__(comm)
        self.gn_groups = gn_groups

    @classmethod
    def options(cls, cfg: Any) -> dict[str, Any]:
        return {"gn_groups": cfg.gn_groups}

    def make_layer(self, num_features: int) -> nn.Module:
        return nn.GroupNorm(gn_groups_for(num_features, self.gn_groups), num_features)


class LayerNormScheme(NormScheme):
    name = "ln"
    summary = "LayerNorm over C,H,W (Ba et al. 2016), i.e. GroupNorm with one group; batch-independent"

    def make_layer(self, num_features: int) -> nn.Module:
        return nn.GroupNorm(1, num_features)


class InstanceNormScheme(NormScheme):
    name = "in"
    layer_type = InstanceNormAny
    summary = (
        "InstanceNorm with affine (Ulyanov et al. 2016): per-sample, per-channel statistics; on "
        "flat features it falls back to per-sample LayerNorm"
    )


class FedBatchNorm(LocalBatchNorm):
    """Local BN whose statistics and affine parameters are never averaged (FedBN)."""


class FedBN(NormScheme):
    name = "fedbn"
    layer_type = FedBatchNorm
    summary = (
        "FedBN (Li et al. ICLR 2021): BN statistics and affine parameters stay local to each "
        "rank; targets feature shift across ranks, not label skew; every rank evaluates with "
        "its own model"
    )
    local_params = True
    per_rank_eval = True
    per_rank_layers = True


class NoNorm(NormScheme):
    name = "none"
    summary = "no normalization (identity); conv/linear layers get biases"

    def make_layer(self, num_features: int) -> nn.Module:
        return nn.Identity()
