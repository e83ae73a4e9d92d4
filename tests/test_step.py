"""sync_step in one process: the weighted gradient, the empty batch, the guard's veto."""

from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.step import StepResult, summed_cross_entropy, sync_step


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_without_a_reducer_it_is_one_sgd_step_on_the_mean_loss():
    model, ref = _model(), _model()
    x, y = _batch(6)
    res = sync_step(model, torch.optim.SGD(model.parameters(), lr=0.1), None, x, y, 6)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    opt.step()
    assert res.samples == 6 and abs(res.loss_sum - 6 * loss.item()) < 1e-5
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_the_reducer_weights_the_local_mean_by_the_rank_s_share_of_the_global_batch():
    model, ref = _model(), _model()
    x, y = _batch(4)
    reducer = GradientAllreducer(model, MPI.COMM_SELF)
    try:
        # 4 of a global 8 samples: the summed gradient is half of the local mean's
        sync_step(model, torch.optim.SGD(model.parameters(), lr=0.0), reducer, x, y, 8)
    finally:
        reducer.close()
    (summed_cross_entropy(ref(x), y) / 4).backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, 0.5 * b.grad, atol=1e-7)


def test_an_empty_batch_runs_no_forward_unless_asked():
    calls = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return x[:, :3] * self.w

    model = Spy()
    x, y = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = sync_step(model, opt, None, x, y, 8)
    assert calls == [] and res.loss_sum is None and res.loss_finite and res.samples == 0
    sync_step(model, opt, None, x, y, 8, forward_when_empty=True)
    assert calls == [0]


def test_before_update_can_veto_the_update():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(5)
    seen: list[StepResult] = []

    def veto(res: StepResult) -> bool:
        seen.append(res)
        return False

    sync_step(model, torch.optim.SGD(model.parameters(), lr=1.0), None, x, y, 5, before_update=veto)
    assert len(seen) == 1 and seen[0].loss_sum is not None
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
