"""The step guard in one process: the agreed NaN/signal decision and the gradient probe."""

from __future__ import annotations

import os
import signal

import torch
from mpi4py import MPI
from torch import nn

from disdl_mpi.reliability.guards import GradFiniteProbe, SignalWatch, StepGuard, signal_name


def test_the_decision_names_the_rank_and_the_kind_of_non_finite():
    guard = StepGuard(MPI.COMM_SELF, None)
    clean = guard.decide(False, False)
    assert not clean.nonfinite and not clean.preempt
    loss = guard.decide(True, False)
    assert loss.nonfinite_rank == 0 and loss.nonfinite_kind == "loss"
    both = guard.decide(True, True)
    assert both.nonfinite_kind == "loss and gradient" and not both.preempt
    assert guard.seconds > 0


def test_a_signal_becomes_a_preemption_decision():
    watch = SignalWatch((signal.SIGUSR1,)).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == signal.SIGUSR1
        d = StepGuard(MPI.COMM_SELF, watch).decide(False, False)
        assert d.preempt and d.signal_rank == 0 and d.signum == signal.SIGUSR1
        assert signal_name(d.signum) == "SIGUSR1"
    finally:
        watch.restore()


def test_the_probe_sees_a_non_finite_gradient_once():
    model = nn.Linear(3, 1)
    probe = GradFiniteProbe(model)
    try:
        model(torch.ones(2, 3)).sum().backward()
        assert probe.take() is False
        (model(torch.ones(2, 3)) * float("nan")).sum().backward()
        assert probe.take() is True
        assert probe.take() is False  # reset for the next step
    finally:
        probe.close()
