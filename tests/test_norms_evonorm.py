"""evonorm-s0 (issue 26, item 3): the layer against its formula, batch independence, training."""

from __future__ import annotations

import pytest
import torch

from disdl_mpi.models import build_model
from disdl_mpi.norms import get_scheme
from disdl_mpi.norms.evonorm import EvoNormS0
from tests.mpi_helpers import trained_record


def test_the_layer_is_its_formula_with_per_sample_group_statistics():
    torch.manual_seed(0)
    layer = EvoNormS0(8, groups=2).double()
    with torch.no_grad():
        for p in (layer.v, layer.weight, layer.bias):
            p.uniform_(-1.5, 1.5)
    x = torch.randn(5, 8, 3, 3, dtype=torch.float64) * 3 + 1
    want = torch.empty_like(x)
    for i in range(5):
        for g in range(2):
            block = x[i, 4 * g : 4 * g + 4]
            std = (block.var(unbiased=False) + layer.eps).sqrt()
            v, w, b = (t[4 * g : 4 * g + 4].view(4, 1, 1) for t in (layer.v, layer.weight, layer.bias))
            want[i, 4 * g : 4 * g + 4] = block * torch.sigmoid(v * block) / std * w + b
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    for i in range(5):  # a sample's output does not depend on the rest of its batch
        torch.testing.assert_close(layer(x[i : i + 1]), want[i : i + 1], rtol=1e-12, atol=1e-12)


def test_the_gradient_is_the_formulas():
    """The fused expression's backward against autograd through the formula written out."""
    torch.manual_seed(1)
    layer = EvoNormS0(8, groups=4).double()
    with torch.no_grad():
        for p in (layer.v, layer.weight, layer.bias):
            p.uniform_(-1.5, 1.5)
    x = (torch.randn(3, 8, 4, 4, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    g = torch.randn_like(x)
    params = (x, layer.v, layer.weight, layer.bias)
    fused = torch.autograd.grad((layer(x) * g).sum(), params)
    shape = (1, 8, 1, 1)
    grouped = x.reshape(3, 4, -1)
    std = (grouped.var(-1, unbiased=False, keepdim=True) + layer.eps).sqrt().expand_as(grouped)
    plain = x * torch.sigmoid(layer.v.view(shape) * x) / std.reshape(x.shape)
    plain = plain * layer.weight.view(shape) + layer.bias.view(shape)
    for a, b in zip(fused, torch.autograd.grad((plain * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_scheme_builds_every_model_and_refuses_bad_groups():
    scheme = get_scheme("evonorm-s0")
    for name, shape in (("cnn", (1, 8, 8)), ("resnet20", (3, 8, 8))):
        model = build_model(name, shape, 10, scheme.layer)
        assert any(isinstance(m, EvoNormS0) for m in model.modules())
        model(torch.randn(2, *shape)).sum().backward()
    with pytest.raises(ValueError, match="do not split"):
        EvoNormS0(6, groups=4)


@pytest.mark.mpi
def test_evonorm_trains_end_to_end(digits_partition, tmp_path):
    rec = trained_record(digits_partition(2), "--norm evonorm-s0 --epochs 3", tmp_path / "o")
    assert rec["norm"] == "evonorm-s0" and rec["test_accuracy"] > 0.5, rec
