"""gn-ws (issue 26, item 3): GroupNorm with weight-standardized convolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disdl_mpi.models import build_model
from disdl_mpi.norms import get_scheme
from disdl_mpi.norms.weight_standardization import WSConv2d, standardize_convolutions, standardized
from tests.mpi_helpers import trained_record


def _model(name: str = "cnn", shape=(1, 8, 8)) -> nn.Module:
    scheme = get_scheme("gn-ws")
    torch.manual_seed(0)
    return scheme.adapt_model(build_model(name, shape, 10, scheme.layer))


def test_every_convolution_uses_a_standardized_weight():
    model = _model()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    names = [n for n, _ in model.named_parameters()]
    for conv in convs:
        assert isinstance(conv, WSConv2d)
        raw = conv.weight.flatten(1)
        w = standardized(conv.weight).flatten(1)  # what the forward convolves with
        var = raw.var(1, unbiased=False)
        torch.testing.assert_close(w.mean(1), torch.zeros(w.shape[0]), atol=1e-6, rtol=0)
        torch.testing.assert_close(w.var(1, unbiased=False), var / (var + 1e-5), atol=1e-6, rtol=1e-5)
        # the forward is a plain convolution with that weight
        x = torch.randn(2, conv.in_channels, 8, 8)
        want = nn.functional.conv2d(x, w.view_as(conv.weight), conv.bias, conv.stride, conv.padding)
        torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)
    assert standardize_convolutions(model) == 3  # idempotent: not standardized twice
    assert [n for n, _ in model.named_parameters()] == names  # names and order kept
    plain = build_model("cnn", (1, 8, 8), 10, get_scheme("gn").layer)
    assert names == [n for n, _ in plain.named_parameters()]


def test_a_convolution_of_another_kind_is_refused():
    class Odd(nn.Conv2d):
        pass

    with pytest.raises(TypeError, match="Odd"):
        standardize_convolutions(nn.Sequential(Odd(1, 2, 3)))


def test_the_gradient_is_the_standardizations_by_autograd():
    """layer_norm's fused backward against the standardization written out op by op."""
    torch.manual_seed(1)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(w)
    (standardized(w) * g).sum().backward()
    fused = w.grad.clone()
    w.grad = None
    flat = w.flatten(1)
    var, mean = torch.var_mean(flat, 1, unbiased=False, keepdim=True)
    (((flat - mean) / (var + 1e-5).sqrt()).view_as(w) * g).sum().backward()
    torch.testing.assert_close(fused, w.grad, rtol=1e-10, atol=1e-12)


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
    g = conv.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # the standardization's gradient is orthogonal to a shift of each output channel's weights
    torch.testing.assert_close(g.flatten(1).sum(1), torch.zeros(g.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.mpi
def test_gn_ws_trains_end_to_end(digits_partition, tmp_path):
    rec = trained_record(digits_partition(2), "--norm gn-ws --epochs 3 --save-model", tmp_path / "o")
    assert rec["norm"] == "gn-ws" and rec["test_accuracy"] > 0.5, rec
