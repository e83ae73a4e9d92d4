"""bn-recal in one process: exact statistics, mode/buffer restoration, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from disdl_mpi.norms import get_scheme
from disdl_mpi.norms.recalibration import recalibrate_batchnorm


@pytest.fixture(scope="module")
def scheme():
    s = get_scheme("bn-recal")
    yield s
    s.close()


def test_single_layer_equals_data_statistics(scheme):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(37, 4)) * [1, 2, 3, 4] + [1e3, 0, -5, 2]).astype(np.float32)
    bn = scheme.layer(4)
    scheme.recalibrate(nn.Sequential(bn), x, 8)  # 37 = 4 batches of 8 + 5: uneven batches
    xd = x.astype(np.float64)
    np.testing.assert_allclose(bn.running_mean.numpy(), xd.mean(0), rtol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), xd.var(0, ddof=1), rtol=1e-5)


def test_differs_from_ema_statistics_and_restores_state(scheme):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), scheme.layer(4), nn.ReLU())
    x = torch.randn(20, 1, 6, 6) + 3
    model.train()
    model(x[:5])  # one EMA update: running stats are far from the data's statistics
    ema = model[1].running_mean.clone()
    nbt = model[1].num_batches_tracked.clone()
    model.eval()
    scheme.recalibrate(model, x, 6)
    with torch.no_grad():
        z = model[0](x).transpose(0, 1).reshape(4, -1).double()
    assert torch.allclose(model[1].running_mean.double(), z.mean(1), rtol=1e-5)
    assert not torch.allclose(model[1].running_mean, ema, rtol=1e-2)
    assert not model.training and torch.equal(model[1].num_batches_tracked, nbt)


def test_empty_training_data_keeps_statistics(scheme):
    bn = scheme.layer(3)
    with torch.no_grad():
        bn.running_mean.fill_(2.0)
    scheme.recalibrate(nn.Sequential(bn), np.zeros((0, 3), np.float32), 4)
    assert torch.equal(bn.running_mean, torch.full((3,), 2.0))


def test_errors_are_named(scheme):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        scheme.recalibrate(nn.Sequential(scheme.layer(2)), np.zeros((3, 2), np.float32), 0)
    sync = get_scheme("syncbn")
    try:
        with pytest.raises(ValueError, match="layer '0' is a SyncBatchNorm"):
            recalibrate_batchnorm(nn.Sequential(sync.layer(2)), torch.zeros(3, 2), 2, scheme.comm)
    finally:
        sync.close()
