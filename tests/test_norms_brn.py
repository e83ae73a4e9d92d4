"""Batch Renormalization: warm-up schedule values and the normalization it computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from disdl_mpi.norms import get_scheme
from disdl_mpi.norms.batch_renorm import BatchRenorm, RenormSchedule


def test_schedule_values():
    s = RenormSchedule(warmup_steps=100)
    assert (s.r_max, s.d_max) == (1.0, 0.0)
    s.set_step(25)
    assert s.r_max == pytest.approx(1.5) and s.d_max == pytest.approx(1.25)
    s.set_step(50)
    assert s.r_max == pytest.approx(2.0) and s.d_max == pytest.approx(2.5)
    s.set_step(100)
    assert (s.r_max, s.d_max) == (3.0, 5.0)
    s.set_step(10_000)
    assert (s.r_max, s.d_max) == (3.0, 5.0)
    assert (RenormSchedule(0).r_max, RenormSchedule(0).d_max) == (3.0, 5.0)


def test_before_step_drives_every_layer_and_options():
    scheme = get_scheme("brn", brn_warmup_steps=10, r_max=2.0, d_max=1.0)
    a, b = scheme.layer(4), scheme.layer(8)
    scheme.before_step(nn.Sequential(a, b), None, 1, 5, 100)
    assert a.schedule is b.schedule
    assert a.schedule.r_max == pytest.approx(1.5) and b.schedule.d_max == pytest.approx(0.5)
    with pytest.raises(ValueError, match="r_max >= 1"):
        get_scheme("brn", r_max=0.5)


def test_at_warmup_start_it_is_plain_batchnorm():
    torch.manual_seed(0)
    layer = BatchRenorm(3, RenormSchedule(50))
    with torch.no_grad():
        layer.running_mean.fill_(4.0)  # far from the batch: r, d would matter if not clipped
        layer.running_var.fill_(9.0)
    x = torch.randn(16, 3, 4, 4) * 2 + 1
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    ref = F.batch_norm(x, rm, rv, layer.weight, layer.bias, training=True, momentum=0.1)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert torch.allclose(layer.running_mean, rm) and torch.allclose(layer.running_var, rv)


def test_within_clip_it_uses_running_statistics():
    """With r, d unclipped, (x-mu_B)/sigma_B*r + d == (x - mu)/sigma: training == inference."""
    torch.manual_seed(1)
    layer = BatchRenorm(3, RenormSchedule(0))
    x = torch.randn(32, 3) * 1.5 + 0.5
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.3, 0.6, 0.4]))
        layer.running_var.copy_(torch.tensor([2.0, 2.5, 1.8]))
    expect = (x - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps)
    assert torch.allclose(layer(x), expect, atol=1e-5)
    assert not torch.allclose(F.batch_norm(x, None, None, training=True), expect, atol=1e-2)


def test_clipping_limits_the_correction_and_gradients_flow():
    torch.manual_seed(2)
    sched = RenormSchedule(100)
    sched.set_step(50)  # r_max 2, d_max 2.5
    layer = BatchRenorm(2, sched)
    with torch.no_grad():
        layer.running_mean.fill_(100.0)  # d would be huge: clipped to -d_max
    x = torch.randn(20, 2, requires_grad=True)
    y = layer(x)
    # d = -2.5 is added to every normalized value, so the output mean is -2.5 per channel.
    assert torch.allclose(y.mean(0), torch.full((2,), -2.5), atol=1e-5)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
