"""gn-ws (issue 26, item 3): GroupNorm with weight-standardized convolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disdl_mpi.models import build_model
from disdl_mpi.norms import get_scheme
from disdl_mpi.norms.weight_standardization import Standardized, standardize_convolutions
from tests.mpi_helpers import trained_record


def _model(name: str = "cnn", shape=(1, 8, 8)) -> nn.Module:
    scheme = get_scheme("gn-ws")
    torch.manual_seed(0)
    return scheme.adapt_model(build_model(name, shape, 10, scheme.layer))


def test_every_convolution_uses_a_standardized_weight():
    model = _model()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for conv in convs:
        w = conv.weight.flatten(1)  # the parametrized weight, as the forward uses it
        raw = conv.parametrizations.weight.original.flatten(1)
        var = raw.var(1, unbiased=False)
        torch.testing.assert_close(w.mean(1), torch.zeros(w.shape[0]), atol=1e-6, rtol=0)
        torch.testing.assert_close(w.var(1, unbiased=False), var / (var + 1e-5), atol=1e-6, rtol=1e-5)
    assert standardize_convolutions(model) == 3  # idempotent: not standardized twice
    assert sum(1 for m in model.modules() if isinstance(m, Standardized)) == 3


def test_the_output_of_a_sample_does_not_depend_on_its_batch():
    """Batch-independent by construction: no rank's batch reaches another sample's output."""
    model = _model("resnet20", (3, 8, 8)).train()
    x = torch.randn(6, 3, 8, 8)
    whole = model(x)
    for i in range(6):
        torch.testing.assert_close(model(x[i : i + 1]), whole[i : i + 1], rtol=1e-5, atol=1e-5)


def test_the_gradient_flows_through_the_standardization():
    model = _model()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    g = conv.parametrizations.weight.original.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # the standardization's gradient is orthogonal to a shift of each output channel's weights
    torch.testing.assert_close(g.flatten(1).sum(1), torch.zeros(g.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.mpi
def test_gn_ws_trains_end_to_end(digits_partition, tmp_path):
    rec = trained_record(digits_partition(2), "--norm gn-ws --epochs 3 --save-model", tmp_path / "o")
    assert rec["norm"] == "gn-ws" and rec["test_accuracy"] > 0.5, rec
