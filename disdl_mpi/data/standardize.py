"""Input standardization from allreduced sums: no rank needs anyone else's samples."""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI


def standardize(x_train: np.ndarray, others: list[np.ndarray], comm: MPI.Comm,
                device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-channel (images) or per-feature (flat) standardization of the training split and,
    with the same statistics, of ``others`` (the test splits).

    Only counts, sums and sums of squares travel (one Allreduce); the statistics are those of
    the union of all ranks' training partitions.
    """
    axes = (0,) + tuple(range(2, x_train.ndim))
    xt = torch.from_numpy(np.ascontiguousarray(x_train)).to(device, torch.float32)
    xs = [torch.from_numpy(np.ascontiguousarray(x)).to(device, torch.float32) for x in others]
    per_value = int(np.prod([x_train.shape[a] for a in axes[1:]], dtype=np.int64))
    stats = np.concatenate([
        [x_train.shape[0] * per_value],
        xt.double().sum(dim=axes).cpu().numpy(),
        (xt.double() ** 2).sum(dim=axes).cpu().numpy(),
    ])
    comm.Allreduce(MPI.IN_PLACE, stats, op=MPI.SUM)
    c = (stats.size - 1) // 2
    count = max(1.0, stats[0])
    mean = stats[1:1 + c] / count
    var = np.maximum(stats[1 + c:] / count - mean ** 2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0  # constant features (e.g. blank digit borders) stay as they are
    shape = (1, c) + (1,) * (x_train.ndim - 2)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
    return (xt - m) / s, [(x - m) / s for x in xs]
