"""Models: shapes for every input kind, deterministic init, bias only without a norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disdl_mpi.models import build_model
from disdl_mpi.norms import get_scheme, is_norm_layer

SHAPES = [
    ("cnn", (1, 8, 8)),
    ("cnn", (1, 28, 28)),
    ("cnn", (3, 32, 32)),
    ("mlp", (64,)),
    ("mlp", (1, 8, 8)),
    ("resnet20", (3, 32, 32)),
    ("resnet20", (1, 8, 8)),
    ("widecnn", (3, 32, 32)),
    ("widecnn", (1, 8, 8)),
    ("auto", (1, 8, 8)),
    ("auto", (20,)),
]


@pytest.mark.parametrize("name,shape", SHAPES)
def test_forward_backward_shapes(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 7, get_scheme("bn").layer)
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 7)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_auto_picks_cnn_or_mlp():
    norm = get_scheme("gn").layer
    assert any(isinstance(m, nn.Conv2d) for m in build_model("auto", (1, 8, 8), 10, norm).modules())
    assert not any(isinstance(m, nn.Conv2d) for m in build_model("auto", (9,), 10, norm).modules())


@pytest.mark.parametrize("name", ["cnn", "mlp", "resnet20", "widecnn"])
def test_init_is_deterministic_given_seed(name):
    def params(seed):
        torch.manual_seed(seed)
        m = build_model(name, (3, 16, 16), 10, get_scheme("bn").layer)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.equal(params(3), params(3))
    assert not torch.equal(params(3), params(4))


def test_resnet20_structure():
    model = build_model("resnet20", (3, 32, 32), 10, get_scheme("bn").layer)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20  # 19 convs + 1 linear: the "20" in ResNet-20
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < n_params < 0.28e6  # He et al. report 0.27M


def test_conv_bias_only_without_norm():
    with_norm = build_model("cnn", (1, 8, 8), 10, get_scheme("bn").layer)
    without = build_model("cnn", (1, 8, 8), 10, get_scheme("none").layer)
    assert all(c.bias is None for c in with_norm.modules() if isinstance(c, nn.Conv2d))
    assert all(c.bias is not None for c in without.modules() if isinstance(c, nn.Conv2d))
    assert sum(is_norm_layer(m) for m in with_norm.modules()) == 3
    assert sum(is_norm_layer(m) for m in without.modules()) == 0


@pytest.mark.parametrize(
    "name,shape,err",
    [
        ("cnn", (64,), "needs \\(C,H,W\\)"),
        ("vgg", (1, 8, 8), "unknown model 'vgg'"),
        ("cnn", (1, 0, 8), "bad sample_shape"),
    ],
)
def test_bad_arguments_are_named(name, shape, err):
    with pytest.raises(ValueError, match=err):
        build_model(name, shape, 10, get_scheme("bn").layer)


def test_widecnn_is_network_bound_by_size():
    """At least 8 M parameters (>= 32 MB of float32 gradients per step) with norm layers."""
    model = build_model("widecnn", (3, 32, 32), 10, get_scheme("bn").layer)
    assert sum(p.numel() for p in model.parameters()) >= 8_000_000
    assert sum(1 for m in model.modules() if is_norm_layer(m)) == 3
