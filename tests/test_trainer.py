"""train_scheme in one process (a world of one rank): the step count, and that the trainer drives
a scheme only through its hooks -- a new scheme is one class plus one registry entry."""

from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from disdl_mpi.batching import BatchPlan
from disdl_mpi.comm.world import rank_info
from disdl_mpi.config import RunConfig
from disdl_mpi.norms import SCHEMES, NormScheme
from disdl_mpi.norms.local_layers import LocalBatchNorm
from disdl_mpi.train_context import RankData, TrainContext
from disdl_mpi.trainer import total_steps, train_scheme


class RecordingBN(NormScheme):
    """Local BN that records every hook call the trainer makes."""

    name = "recording"
    summary = "local BN, recording the trainer's hook calls (test only)"

    def __init__(self, comm=None) -> None:
        super().__init__(comm)
        self.calls: list[tuple] = []
        RecordingBN.last = self

    def make_layer(self, num_features: int) -> nn.Module:
        return LocalBatchNorm(num_features)

    def before_step(self, model, x_train, batch_size, step, total_steps) -> None:
        self.calls.append(("before", step, total_steps, batch_size))

    def after_step(self, model, step) -> None:
        self.calls.append(("after", step))

    def recalibrate(self, model, x_train, batch_size) -> None:
        self.calls.append(("recalibrate", len(x_train)))


def _context(cfg: RunConfig) -> TrainContext:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    data = RankData(
        x_train=x, y_train=y, x_test=x[:10], y_test=y[:10], sizes=[40], num_classes=3, sample_shape=(6,)
    )
    comm = MPI.COMM_SELF
    return TrainContext(
        cfg=cfg,
        comm=comm,
        norm_comm=comm,
        info=rank_info(comm),
        device=torch.device("cpu"),
        data=data,
        model_name="mlp",
        log=lambda _: None,
    )


def test_steps_override_epochs():
    plan = BatchPlan([40], 0, 8, "proportional")  # 5 steps an epoch
    assert total_steps(RunConfig(epochs=3), plan) == (3, 15)
    assert total_steps(RunConfig(epochs=3, steps=7), plan) == (2, 7)


def test_the_trainer_calls_a_registered_scheme_s_hooks_and_nothing_else(monkeypatch):
    monkeypatch.setitem(SCHEMES, RecordingBN.name, RecordingBN)  # the one registry line
    cfg = RunConfig(norm="recording", steps=7, global_batch_size=8, eval_every=1)
    res = train_scheme(_context(cfg), "recording")
    assert res.steps == 7 and res.epochs == 2 and 0.0 <= res.test_accuracy <= 1.0
    calls = RecordingBN.last.calls
    befores = [c for c in calls if c[0] == "before"]
    assert befores == [("before", s, 7, 8) for s in range(7)]
    assert [c for c in calls if c[0] == "after"] == [("after", s) for s in range(7)]  # the step just done
    # Before each of the two evaluations (one per epoch), over this rank's training data.
    assert [c for c in calls if c[0] == "recalibrate"] == [("recalibrate", 40)] * 2
