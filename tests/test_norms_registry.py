"""Registry: every scheme builds, runs forward/backward on (N,C,H,W) and (N,C), and is named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disdl_mpi.norms import SCHEMES, available_schemes, get_scheme, is_norm_layer
from disdl_mpi.norms.local_layers import gn_groups_for

FULL_ORDER = [
    "bn",
    "syncbn",
    "gn",
    "gn-ws",
    "evonorm-s0",
    "ln",
    "in",
    "brn",
    "fedbn",
    "bn-recal",
    "bn-fix",
    "bn-carry",
    "none",
]


def test_order_is_the_registry_order():
    names = available_schemes()
    assert names == [n for n in FULL_ORDER if n in names]
    assert set(names) == set(SCHEMES)
    assert {"bn", "gn", "none"} <= set(names)


@pytest.mark.parametrize("name", available_schemes())
@pytest.mark.parametrize("shape", [(6, 8, 5, 5), (6, 8)])
def test_every_scheme_forward_backward(name, shape):
    scheme = get_scheme(name)
    try:
        layer = scheme.layer(8)
        torch.manual_seed(0)
        x = (torch.randn(*shape) * 3 + 1).requires_grad_()
        y = layer(x)
        assert y.shape == x.shape
        (y * torch.randn_like(y)).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        if name != "none":
            assert is_norm_layer(layer)
            # Every normalizing scheme removes most of the input's scale of 3 and, but for
            # EvoNorm-S0 (a normalization-activation: x * sigmoid(v x) is gated, not centred),
            # its offset of +1.
            assert y.std().item() < 2.0
            assert name == "evonorm-s0" or abs(y.mean().item()) < 0.5
        layer.eval()
        assert torch.isfinite(layer(x.detach())).all()
        scheme.before_step(nn.Sequential(layer), x.detach(), 6, 3, 20)  # step 3 of 20: no freeze
        scheme.after_step(nn.Sequential(layer), 3)
        assert scheme.comm_seconds() >= 0.0
    finally:
        scheme.close()


def _recalibration_changes(scheme) -> bool:
    """Whether the scheme's recalibrate hook moves a BN layer's running statistics."""
    layer = scheme.layer(3)
    before = layer.running_mean.clone()
    scheme.recalibrate(nn.Sequential(layer), torch.randn(16, 3) + 5.0, 8)
    return not torch.equal(layer.running_mean, before)


def test_flags():
    fed = get_scheme("fedbn")
    assert fed.local_params and fed.per_rank_eval and not _recalibration_changes(fed)
    bn = get_scheme("bn")
    assert not bn.local_params and not bn.per_rank_eval and not _recalibration_changes(bn)
    recal = get_scheme("bn-recal")
    try:  # the check above can fail: a scheme that recalibrates moves the statistics
        assert _recalibration_changes(recal)
    finally:
        recal.close()


def test_unknown_scheme_and_options_are_named():
    with pytest.raises(ValueError, match="unknown normalization scheme 'batchnorm'"):
        get_scheme("batchnorm")
    with pytest.raises(ValueError, match="norm 'gn' takes no options"):
        get_scheme("gn", momentum=0.3)


def test_gn_groups_divide_channels():
    assert gn_groups_for(64, 8) == 8
    assert gn_groups_for(4, 8) == 4
    assert gn_groups_for(12, 8) == 6
    assert gn_groups_for(7, 8) == 7
    layer = get_scheme("gn", gn_groups=8).layer(12)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 6


def test_ln_and_in_statistics():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, 6) * 5 + 2
    ln = get_scheme("ln").layer(4)(x)
    assert torch.allclose(ln.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    inst = get_scheme("in").layer(4)(x)
    assert torch.allclose(inst.mean(dim=(2, 3)), torch.zeros(3, 4), atol=1e-5)
    flat = get_scheme("in").layer(4)(x[:, :, 0, 0])  # (N,C): per-sample over features
    assert torch.allclose(flat.mean(dim=1), torch.zeros(3), atol=1e-5)


def test_local_bn_corner_cases():
    layer = get_scheme("bn").layer(3)
    before = layer.running_mean.clone(), layer.running_var.clone()
    empty = torch.zeros(0, 3, requires_grad=True)
    out = layer(empty)
    assert out.shape == (0, 3)
    one = torch.randn(1, 3, requires_grad=True)
    out1 = layer(one)  # a single value per channel: normalizes to the bias
    assert torch.allclose(out1, layer.bias.detach().expand(1, 3))
    out1.sum().backward()
    assert torch.equal(one.grad, torch.zeros(1, 3))
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    # A normal batch agrees with torch's BatchNorm1d.
    ref = nn.BatchNorm1d(3)
    x = torch.randn(10, 3)
    assert torch.allclose(layer(x), ref(x), atol=1e-6)
    assert torch.allclose(layer.running_var, ref.running_var)


def test_the_registry_says_which_schemes_need_the_whole_test_set():
    """run.py decides from the registry entry whether ranks load the whole test set or their
    shard; the entry must agree with what the built scheme does."""
    from disdl_mpi.norms import SCHEMES, get_scheme

    for name, spec in SCHEMES.items():
        scheme = get_scheme(name)
        try:
            assert spec.per_rank_eval == scheme.per_rank_eval, name
        finally:
            scheme.close()
    assert [n for n, s in SCHEMES.items() if s.per_rank_eval] == ["fedbn"]
