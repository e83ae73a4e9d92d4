"""What a finished scheme leaves behind: its entry of summary.json and its saved model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from disdl_mpi.comm.world import RankInfo
from disdl_mpi.config import RunConfig
from disdl_mpi.files import atomic_path
from disdl_mpi.observe.timing import timing_fields
from disdl_mpi.train_context import SchemeResult
from disdl_mpi.virtual_ranks import rank_state_dict


@dataclass(frozen=True)
class RunFacts:
    """What every scheme's record of one run shares (docs/CONTRACTS.md, summary.json)."""

    info: RankInfo
    machine: dict
    model_name: str
    dataset: str
    partition: str
    data_dir: Path
    startup_s: float
    measured_wait: bool
    cuda: bool


def scheme_record(
    cfg: RunConfig, res: SchemeResult, phases: dict, facts: RunFacts, *, wall: float, peak_rss: list[int]
) -> dict:
    """One scheme's entry of summary.json (docs/CONTRACTS.md)."""
    machine = facts.machine
    record = {
        # isolated ranks; processes x virtual_ranks of them (per-phase times are per process)
        "world_size": cfg.isolated_ranks(facts.info.world_size),
        "processes": facts.info.world_size,
        "virtual_ranks": cfg.virtual_ranks,
        "norm": res.norm,
        "model": facts.model_name,
        "dataset": facts.dataset,
        "partition": facts.partition,
        "data_dir": str(facts.data_dir),
        "epochs": res.epochs,
        "steps": res.steps,
        "test_accuracy": res.test_accuracy,
        "samples_per_s": res.samples / max(1e-9, res.train_s),
        "phases": {k: v["mean"] for k, v in phases.items()},
        "phases_detail": phases,
        "device": machine["device"],
        "mpi_library": machine["mpi_library"],
        "allreduce_path": res.allreduce_path,
        "cuda_aware": res.cuda_awareness,
        "threads_per_rank": machine["threads_per_rank"],
        "wall_s": wall,
        "train_s": res.train_s,
        "global_batch_size": cfg.global_batch_size,
        "batching": cfg.batching,
        "per_rank_accuracy": res.per_rank_accuracy,
        "domain_accuracy": res.domain_accuracy,
        "domain_accuracy_mean": (
            sum(res.domain_accuracy) / len(res.domain_accuracy) if res.domain_accuracy else None
        ),
        "epochs_log": res.epochs_log,
        "grad_bytes": sum(p.numel() * p.element_size() for p in res.model.parameters() if p.requires_grad),
        "skipped_steps": res.skipped_steps,
        "lr_schedule": cfg.lr_schedule,
        "warmup_epochs": cfg.warmup_epochs,
        "time_to_accuracy": res.time_to_accuracy,
        "startup_s": facts.startup_s,
        "peak_rss_bytes": peak_rss,
    }
    record.update(timing_fields(phases, measured_wait=facts.measured_wait, cuda=facts.cuda))
    return record


def save_model(
    model: torch.nn.Module, scheme_dir: Path, rank: int, *, per_rank: bool, virtual_ranks: int = 1
) -> None:
    """Rank 0's state_dict as model.pt; with rank-local state (fedbn) every rank's copy too.

    Under ``--virtual-ranks K`` process ``rank`` holds isolated ranks rank*K .. rank*K+K-1;
    each one's state_dict is the plain model's (its own copies of the norm layers), as the
    MPI rank would have saved it."""
    targets = []
    for k in range(virtual_ranks):
        isolated = rank * virtual_ranks + k
        names = (["model.pt"] if isolated == 0 else []) + (
            [f"model_rank{isolated:05d}.pt"] if per_rank else []
        )
        if not names:
            continue
        state = {n: v.detach().cpu() for n, v in rank_state_dict(model, k).items()}
        targets += [(scheme_dir / name, state) for name in names]
    for target, state in targets:
        with atomic_path(target) as tmp:
            torch.save(state, tmp)
