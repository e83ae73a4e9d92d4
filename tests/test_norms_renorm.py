"""local_layers.renormalize (bn-fix, bn-carry, brn): one fused function against the formula it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from disdl_mpi.norms.local_layers import batch_stats_of, renormalize


def _reference(x, mean, var, w, b, eps, clip=None):
    """Batch Renorm written out with autograd: BN on the batch, then the constants r and d."""
    var_b, mean_b = batch_stats_of(x)
    std = (var + eps).sqrt()
    r = ((var_b + eps).sqrt() / std).detach()
    d = ((mean_b - mean) / std).detach()
    if clip is not None:
        r, d = r.clamp(1 / clip[0], clip[0]), d.clamp(-clip[1], clip[1])
    return F.batch_norm(x, None, None, w * r, w * d + b, True, 0.0, eps)


@pytest.mark.parametrize("shape", [(16, 5, 4, 4), (9, 7), (6, 3, 11)])
@pytest.mark.parametrize("clip", [None, (1.5, 0.5)])
def test_value_and_gradients_match_batch_renorm_written_out(shape, clip):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 7).requires_grad_()
    c = shape[1]
    mean, var = (
        torch.randn(c, generator=g, dtype=torch.float64) + 7,
        torch.rand(c, dtype=torch.float64) * 9 + 1,
    )
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    outs = []
    for fn in (renormalize, _reference):
        y = fn(x, mean, var, w, b, 1e-5, clip=clip)
        outs.append((y.detach(), *torch.autograd.grad(y, (x, w, b), dy)))
    for ours, ref in zip(*outs):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    if clip is None:  # unclipped, the value is the given statistics' normalization exactly
        view = [1, -1] + [1] * (len(shape) - 2)
        want = (x - mean.view(view)) / (var.view(view) + 1e-5).sqrt() * w.view(view) + b.view(view)
        torch.testing.assert_close(outs[0][0], want.detach(), rtol=1e-9, atol=1e-9)


def test_without_affine_parameters_the_input_gradient_is_the_same():
    """weight and bias None: as ones and zeros (r and d are constants, so this is not the true
    derivative of the value, which gradcheck would demand)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    dy = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(renormalize(x, mean, var, None, None, 1e-5), x, dy)[0]
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    ref = torch.autograd.grad(_reference(x, mean, var, ones, zeros, 1e-5), x, dy)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
