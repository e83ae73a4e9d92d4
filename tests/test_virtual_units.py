"""virtual_ranks' pieces without MPI: the K batch plans as one, the K layer copies, state dicts."""

from __future__ import annotations

import numpy as np
import torch

from disdl_mpi.batching import BatchPlan
from disdl_mpi.models import build_model
from disdl_mpi.norms import get_scheme
from disdl_mpi.virtual_ranks import VirtualPlan, rank_state_dict, scheme_layers, segments_of

SIZES = [35, 1, 435, 4, 5, 892, 54, 12]


def test_a_virtual_plan_is_its_ranks_plans_concatenated():
    plan = VirtualPlan(SIZES, 1, 4, 128, "proportional")  # process 1: ranks 4..7
    assert plan.rows == [(0, 5), (5, 897), (897, 951), (951, 963)]
    steps = plan.epoch_indices(2, 7)
    for (lo, _), r in zip(plan.rows, range(4, 8)):
        own = BatchPlan(SIZES, r, 128, "proportional").epoch_indices(2, 7)
        for s, idx in enumerate(steps):
            start = sum(plan.shares(s)[: r - 4])
            mine = idx[start : start + plan.shares(s)[r - 4]] - lo
            assert np.array_equal(mine, own[s])
    assert plan.global_count(0) == BatchPlan(SIZES, 0, 128, "proportional").global_count(0)


def test_per_rank_layers_are_copied_and_shared_ones_are_not():
    layer, seg = scheme_layers(get_scheme("gn"), 4)
    assert seg is None  # a batch-independent layer serves K ranks as it is
    layer, seg = scheme_layers(get_scheme("bn"), 4)
    model = build_model("cnn", (1, 8, 8), 10, layer)
    assert segments_of(model) is seg and seg.k == 4
    first = model.features[0][1]
    assert all(m.weight is first.members[0].weight for m in first.members)  # one shared tensor
    layer, _ = scheme_layers(get_scheme("fedbn"), 4)
    fed = build_model("cnn", (1, 8, 8), 10, layer)
    ws = [m.weight for m in fed.features[0][1].members]
    assert len({id(w) for w in ws}) == 4  # rank-local: one each


def test_a_virtual_ranks_state_dict_is_the_plain_models():
    layer, seg = scheme_layers(get_scheme("bn"), 3)
    model = build_model("cnn", (1, 8, 8), 10, layer)
    with torch.no_grad():
        model.features[0][1].members[2].running_mean.fill_(7.0)
    plain = build_model("cnn", (1, 8, 8), 10, get_scheme("bn").layer)
    state = rank_state_dict(model, 2)
    assert state.keys() == plain.state_dict().keys()
    assert torch.all(state["features.0.1.running_mean"] == 7.0)
    assert torch.all(rank_state_dict(model, 0)["features.0.1.running_mean"] == 0.0)


def test_the_partition_size_refusal_says_how_to_launch():
    from disdl_mpi.data.partition_io import _relaunch_hint

    assert _relaunch_hint(8, 1) == "launch with mpiexec -n 8"
    assert "mpiexec -n 2 ... --virtual-ranks 4 (= 8 isolated ranks)" in _relaunch_hint(8, 4)
    assert "K dividing 8" in _relaunch_hint(8, 3)
