"""bn-carry and bn-fix against a centralized computation (one process), and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from disdl_mpi.norms import get_scheme
from disdl_mpi.norms.carried import CarryBatchNorm, StatsPayload
from disdl_mpi.norms.fixed import FixBatchNorm
from disdl_mpi.schedule import lr_factor


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0] + list(range(2, x.dim()))
    return x.double().mean(dims), x.double().var(dims, unbiased=False)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 3)])
def test_carry_sums_over_ranks_give_the_union_statistics(shape):
    torch.manual_seed(0)
    layer = CarryBatchNorm(3, eval_stats="last").train()
    model = torch.nn.Sequential(layer)
    payload = StatsPayload(model)
    assert payload.numel == 1 + 2 * 3
    # step 0: three "ranks" with unequal batches (one empty), normalized locally
    batches = [torch.randn(*shape) * 2 + 1, torch.randn(1, *shape[1:]) - 3, torch.randn(0, *shape[1:])]
    summed = torch.zeros(payload.numel, dtype=torch.float64)
    for xb in batches:
        y = model(xb)
        if len(xb) > 1:
            want = F.batch_norm(xb, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
            assert torch.allclose(y, want, atol=1e-5)
        part = torch.zeros(payload.numel, dtype=torch.float64)
        payload.fill(part)
        summed += part
    payload.consume(summed)
    mean, var = _stats(torch.cat(batches))
    assert torch.allclose(layer.global_mean.double(), mean, atol=1e-6)
    assert torch.allclose(layer.global_var.double(), var, atol=1e-5)
    # step 1: every rank normalizes with step 0's global statistics (value), sums shifted
    x1 = torch.randn(*shape)
    y1 = model(x1)
    ref = (x1 - mean.float().view([1, -1] + [1] * (x1.dim() - 2))) / (var.float() + layer.eps).sqrt().view(
        [1, -1] + [1] * (x1.dim() - 2)
    )
    assert torch.allclose(y1, ref * 1.0, atol=1e-5)
    y1.square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    part = torch.zeros(payload.numel, dtype=torch.float64)
    payload.fill(part)
    payload.consume(part)  # one rank only: the global statistics are x1's
    mean1, var1 = _stats(x1)
    assert torch.allclose(layer.global_mean.double(), mean1, atol=1e-6)
    assert torch.allclose(layer.global_var.double(), var1, atol=1e-5)
    # with eval_stats='last', evaluation uses the statistics the model was last trained with
    layer.eval()
    assert torch.allclose(
        model(x1),
        (
            (x1 - mean1.float().view([1, -1] + [1] * (x1.dim() - 2)))
            / (var1.float() + layer.eps).sqrt().view([1, -1] + [1] * (x1.dim() - 2))
        ),
        atol=1e-5,
    )


def test_a_rank_without_a_forward_contributes_zeros():
    model = torch.nn.Sequential(CarryBatchNorm(2))
    payload = StatsPayload(model)
    out = torch.ones(payload.numel)
    payload.fill(out)
    assert float(out.abs().sum()) == 0.0


def test_fix_freezes_at_half_with_the_global_statistics():
    torch.manual_seed(1)
    scheme = get_scheme("bn-fix", comm=MPI.COMM_WORLD.Dup(), fix_ramp=0)  # at once, as FixBN
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), scheme.layer(4))
    data = torch.randn(40, 1, 6, 6)
    layer = model[1]
    for step in range(5):
        scheme.before_step(model, data, 16, step, 10)
        assert bool(layer.fixed) is False
    scheme.before_step(model, data, 16, 5, 10)  # T* = 10 // 2
    assert bool(layer.fixed) is True
    with torch.no_grad():
        mean, var = _stats(model[0](data))
    assert torch.allclose(layer.running_mean.double(), mean, atol=1e-5)
    n = mean.new_tensor(40 * 16)
    assert torch.allclose(layer.running_var.double(), var * n / (n - 1), atol=1e-4)
    # frozen: training and evaluation normalize with the same statistics; they no longer move
    x = torch.randn(8, 1, 6, 6)
    model.train()
    y_train = model(x)
    model.eval()
    y_eval = model(x)
    assert torch.allclose(y_train, y_eval, atol=1e-5)
    before = layer.running_mean.clone()
    model.train()
    model(x).sum().backward()
    assert torch.equal(layer.running_mean, before) and torch.isfinite(model[0].weight.grad).all()
    assert isinstance(layer, FixBatchNorm)


def test_learning_rate_schedules():
    assert lr_factor("constant", 5, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 10, 10) == pytest.approx(0)
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert [lr_factor("step", s, 100) for s in (0, 49, 50, 74, 75)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert [lr_factor("cosine", s, 110, warmup=10) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor("cosine", 60, 110, warmup=10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    with pytest.raises(ValueError, match="--lr-schedule"):
        lr_factor("linear", 0, 10)


def test_fix_ramps_from_the_batch_statistics_to_the_frozen_ones():
    """Over --fix-ramp steps after T* the value moves from local BN's to the frozen one."""
    torch.manual_seed(2)
    scheme = get_scheme("bn-fix", comm=MPI.COMM_WORLD.Dup(), fix_at=4, fix_ramp=4)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), scheme.layer(4))
    data = torch.randn(40, 1, 6, 6)
    x = torch.randn(8, 1, 6, 6) * 8 + 5  # a batch whose statistics are far from the frozen ones

    def gap(step: int) -> tuple[float, float]:
        """|train - local BN| and |train - frozen| at ``step``."""
        scheme.before_step(model, data, 16, step, 100)
        model.train()
        with torch.no_grad():
            h = model[0](x)
            y = model[1](h)
            local = torch.nn.functional.batch_norm(
                h, None, None, model[1].weight, model[1].bias, True, 0.0, 1e-5
            )
            frozen = torch.nn.functional.batch_norm(
                h,
                model[1].running_mean,
                model[1].running_var,
                model[1].weight,
                model[1].bias,
                False,
                0.0,
                1e-5,
            )
        return float((y - local).abs().max()), float((y - frozen).abs().max())

    at_start = gap(4)  # T*: r_max 1, d_max 0 -> exactly the batch's normalization
    assert at_start[0] < 1e-5 and at_start[1] > 1e-2
    middle = gap(6)
    assert middle[0] > 1e-4 and middle[1] > 1e-4  # in between
    after = gap(8)  # the ramp is over: clipped at RAMP_END, still short of the frozen value here
    assert after[1] > 1e-4 and after[1] < middle[1] and after[0] > 1e-2
    assert scheme.schedule.clip_at(6, 100) == (3.0, 2.5) and scheme.schedule.clip_at(50, 100) == (5.0, 5.0)
    assert scheme.schedule.clip_at(3, 100) is None  # before T*: local BN
    x = torch.randn(8, 1, 6, 6)  # a batch like the data: inside the clip, the frozen value
    assert gap(9)[1] < 1e-5
