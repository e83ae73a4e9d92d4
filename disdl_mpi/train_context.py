"""What one scheme's training is given and what it returns: the contract between
:mod:`disdl_mpi.run` (which builds the context once per run) and :mod:`disdl_mpi.trainer`
(which trains one scheme with it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from mpi4py import MPI

from disdl_mpi.comm.world import RankInfo
from disdl_mpi.config import RunConfig
from disdl_mpi.data.residency import StreamedInputs
from disdl_mpi.data.standardize import StandardizedInputs
from disdl_mpi.evaluate import evaluate_sharded
from disdl_mpi.observe.profiler import StepProfiler
from disdl_mpi.observe.timeline import TraceRecorder
from disdl_mpi.reliability.checkpoint import Checkpointer, Loaded
from disdl_mpi.reliability.guards import StepGuard
from disdl_mpi.reliability.watchdog import StallWatchdog
from disdl_mpi.step import LossFn, summed_cross_entropy

# evaluate(model, x_test, y_test, comm) -> global accuracy (sharded, counts reduced)
Evaluator = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, MPI.Comm], float]
# on_step(step, total_steps, label), after every optimizer step (progress displays)
StepCallback = Callable[[int, int, str], None]
Inputs = Union[torch.Tensor, StandardizedInputs, StreamedInputs]


@dataclass
class RankData:
    """This rank's resident data: its own training partition and its shard of the test set.

    Inputs are indexed, never used whole: a tensor, or ``StandardizedInputs`` that keeps the
    stored dtype and standardizes each indexed batch. The whole test set is held only when a
    scheme scores every rank's model on all of it (fedbn).
    """

    x_train: Inputs
    y_train: torch.Tensor
    x_test: Inputs  # the rows this rank scores (data.layout.shard_bounds)
    y_test: torch.Tensor
    sizes: list[int]
    num_classes: int
    sample_shape: tuple[int, ...]
    x_domain: Optional[Inputs] = None  # feature shift: this rank's own-domain test split
    y_domain: Optional[torch.Tensor] = None
    x_test_all: Optional[Inputs] = None  # the whole test set, for per-rank evaluation
    y_test_all: Optional[torch.Tensor] = None

    def close_stream(self) -> Optional[str]:
        """Stop a streamed input's prefetcher; how well it hid the reads (None: not streamed)."""
        if not isinstance(self.x_train, StreamedInputs):
            return None
        report = self.x_train.report()
        self.x_train.close()
        return report


@dataclass
class TrainHooks:
    """The seams of the training loop: what the step computes and how a scheme is scored.

    Defaults are the real thing; the fault-injection tests pass their own (a poisoned loss, an
    evaluator with an extra collective, a step callback that records progress).
    """

    loss_fn: LossFn = summed_cross_entropy
    evaluate: Evaluator = evaluate_sharded
    on_step: Optional[StepCallback] = None


@dataclass
class TrainContext:
    """Everything a scheme's training needs that does not change between schemes."""

    cfg: RunConfig
    comm: MPI.Comm  # gradients, evaluation, control
    norm_comm: MPI.Comm  # the schemes' own collectives (syncbn, bn-recal)
    info: RankInfo
    device: torch.device
    data: RankData
    model_name: str
    log: Callable[[str], None] = print
    epoch_lines: bool = True  # one line per epoch (off under a progress bar or quiet)
    hooks: TrainHooks = field(default_factory=TrainHooks)
    wait_comm: Optional[MPI.Comm] = None  # timing detail: the imbalance probe
    trace: Optional[TraceRecorder] = None
    guard: Optional[StepGuard] = None
    checkpointer: Optional[Checkpointer] = None
    checkpoint_every: Optional[tuple[str, int]] = None  # ("steps"|"epochs", N)
    scheme_index: int = 0  # position in the run's scheme list
    run_records: list[dict] = field(default_factory=list)  # finished schemes, for checkpoints
    resume: Optional[Loaded] = None  # positioned inside this scheme
    watchdog: Optional[StallWatchdog] = None  # --stall-timeout
    profiler: Optional[StepProfiler] = None  # --profile-steps


@dataclass
class SchemeResult:
    """What one scheme's training produced on this rank (rank 0's copy is reported)."""

    norm: str
    model: torch.nn.Module
    test_accuracy: float
    per_rank_accuracy: Optional[list[float]]
    epochs: int
    steps: int
    samples: int
    train_s: float
    phases: dict[str, float]
    allreduce_path: str
    cuda_awareness: Optional[str]
    epochs_log: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    time_to_accuracy: Optional[dict] = None  # first epoch/time at --target-accuracy
    domain_accuracy: Optional[list[float]] = None  # each rank on its own domain (feature shift)
