"""bn-carry's variants (issue 26): the gradient path (local, exact, none) and the evaluation
statistics (last, running), against centralized computations where the mathematics says they
agree. Two ranks are simulated in one process: two layers, their payloads summed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from disdl_mpi.norms.carried import CarryBatchNorm, check_variant

C = 3


def _ranks(grad: str, eval_stats: str = "last") -> list[CarryBatchNorm]:
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        m = CarryBatchNorm(C, grad=grad, eval_stats=eval_stats).double()
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
        layers.append(m)
    return layers


def _step(layers, batches):
    """One training forward on each 'rank', then the allreduce of their payloads."""
    outs = [m(x) for m, x in zip(layers, batches)]
    summed = sum(m.take_sums() for m in layers)
    for m in layers:
        m.set_global(summed)
    return outs


def _data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, C, 4, 4, generator=g, dtype=torch.float64) * 2 + 3).requires_grad_()


def test_unknown_variants_are_named():
    with pytest.raises(ValueError, match="carry_grad must be one of"):
        check_variant("global", "last")
    with pytest.raises(ValueError, match="carry_eval must be one of"):
        check_variant("local", "ema")


def test_exact_normalizes_with_own_current_and_others_previous_moments():
    layers = _ranks("exact")
    a0, b0 = _data(1, 6), _data(2, 10)
    _step(layers, [a0, b0])  # step 0: local BN; the sums give the others' moments
    _step(layers, [_data(3, 6), _data(4, 10)])  # step 1: every layer has global statistics
    a2, b1 = _data(5, 6), _data(4, 10)  # rank b's step-1 batch is what rank a pools with
    y = layers[0](a2)
    pooled = torch.cat([a2, b1.detach()])
    var, mean = torch.var_mean(pooled, [0, 2, 3], unbiased=False)
    w, b = layers[0].weight, layers[0].bias
    ref = (a2 - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + layers[0].eps).sqrt()
    ref = ref * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (a2, w, b), dy)
    want = torch.autograd.grad(ref, (a2, w, b), dy)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_none_is_an_affine_map_with_the_carried_statistics():
    layers = _ranks("none")
    _step(layers, [_data(1, 6), _data(2, 10)])
    x = _data(3, 6)
    y = layers[0](x)
    m = layers[0]
    ref = F.batch_norm(x, m.global_mean, m.global_var, m.weight, m.bias, False, 0.0, m.eps)
    dy = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, (x, m.weight), dy), torch.autograd.grad(ref, (x, m.weight), dy)):
        torch.testing.assert_close(g, r)
    # the global statistics are the union's (the forward is not the batch's)
    union = torch.cat([_data(1, 6), _data(2, 10)])
    var, mean = torch.var_mean(union, [0, 2, 3], unbiased=False)
    torch.testing.assert_close(m.global_mean, mean.detach())
    torch.testing.assert_close(m.global_var, var.detach())


@pytest.mark.parametrize("eval_stats", ["last", "running"])
def test_evaluation_uses_the_chosen_statistics(eval_stats):
    layers = _ranks("local", eval_stats)
    for seed in range(3):
        _step(layers, [_data(10 + seed, 6), _data(20 + seed, 10)])
    m = layers[0].eval()
    x = _data(7, 5)
    mean, var = (m.global_mean, m.global_var) if eval_stats == "last" else (m.running_mean, m.running_var)
    torch.testing.assert_close(m(x), F.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps))
    assert not torch.allclose(m.global_mean, m.running_mean)  # the two choices differ


@pytest.mark.mpi
@pytest.mark.parametrize(
    "variant, at_least",
    # no gradient through the statistics loses BN's scale invariance: on digits at lr 0.05 it
    # does not learn in 2 epochs (12 %), so only that it runs to the end is asserted; nor does
    # the carried backward (22 %: a stale mean of dy leaves a component that moves the
    # features' mean and scale every step; one rank, iid, 20 % against local's 81 %)
    [
        ("--carry-grad exact", 0.3),
        ("--carry-grad carried", 0.0),
        ("--carry-grad none --carry-eval running", 0.0),
    ],
)
def test_each_variant_trains_end_to_end(variant, at_least, digits_partition, tmp_path):
    import json

    from tests.mpi_helpers import run_job

    out = tmp_path / "o"
    run_job(digits_partition(2), f"--norm bn-carry {variant} --epochs 2", out, timeout=180, check=True)
    summary = json.loads((out / "summary.json").read_text())
    (rec,) = summary["runs"]
    assert rec["norm"] == "bn-carry" and at_least <= rec["test_accuracy"] <= 1.0, rec
    assert summary["config"]["carry_grad"] == variant.split()[1], summary["config"]


def test_carried_is_syncbns_backward_when_the_carried_means_are_current():
    """With the previous step's statistics and gradient means equal to the current ones (the
    same batches twice, the weights unchanged), the carried backward is syncbn's: each rank's
    dx in global units is the centralized BN's dx on its rows, and the rank-weighted sums of
    dw and db are the centralized ones."""
    layers = _ranks("carried")
    a, b = _data(1, 6), _data(2, 10)
    n = len(a) + len(b)
    _step(layers, [a, b])  # step 0: local BN; the global statistics become the union's
    union = torch.cat([a, b]).detach().requires_grad_()
    ref = F.batch_norm(union, None, None, layers[0].weight, layers[0].bias, True, 0.0, layers[0].eps)
    dy = torch.randn_like(ref)  # dL/dy of the global-batch mean loss
    want_x, want_w, want_b = torch.autograd.grad(ref, (union, layers[0].weight, layers[0].bias), dy)
    for m in layers:  # what the gradient allreduce of the (same) step would have summed
        m.carry_grad_sums(want_b, want_w)
    rows = [slice(0, len(a)), slice(len(a), n)]
    sum_w = sum_b = 0
    for m, x, r in zip(layers, (a, b), rows):
        y = m(x)
        scale = n / len(x)  # the rank's loss is its own batch's mean
        gx, gw, gb = torch.autograd.grad(y, (x, m.weight, m.bias), dy[r] * scale)
        torch.testing.assert_close(gx / scale, want_x[r], rtol=1e-10, atol=1e-10)
        sum_w, sum_b = sum_w + gw / scale, sum_b + gb / scale
    torch.testing.assert_close(sum_w, want_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum_b, want_b, rtol=1e-10, atol=1e-10)


def test_the_default_is_the_ablations_best():
    """docs/RESULTS.md's 12-epoch ablation: local gradient with running-average evaluation."""
    from disdl_mpi.config import RunConfig
    from disdl_mpi.norms.carried import BNCarry

    cfg = RunConfig()
    assert (cfg.carry_grad, cfg.carry_eval) == ("local", "running")
    scheme = BNCarry(None)
    assert (scheme.carry_grad, scheme.carry_eval) == ("local", "running")
    assert scheme.layer(3).eval_stats == "running"
