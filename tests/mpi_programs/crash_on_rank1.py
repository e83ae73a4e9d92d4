"""The main job with a loss that raises on rank 1: the whole job must abort at once."""

import sys

from mpi4py import MPI

import disdl_mpi.run as run
from disdl_mpi.step import summed_cross_entropy
from disdl_mpi.train_context import TrainHooks


def failing(logits, labels):
    if MPI.COMM_WORLD.Get_rank() == 1:
        raise RuntimeError("injected failure on rank 1")
    return summed_cross_entropy(logits, labels)


if __name__ == "__main__":
    sys.exit(run.main(sys.argv[1:], hooks=TrainHooks(loss_fn=failing)))
