"""The main job: ``mpirun -n N python -m disdl_mpi.run [options]``.

Every rank trains on its own private partition; gradients are allreduced every step; each
requested normalization scheme is trained in turn from the same initial weights and measured.
:func:`main` reads as its steps: start the job, set up the rank, load its data, build the
training context, train the schemes, end.

This is the one module of the library that calls ``data_prep`` (to build a missing partition):
the import contract in pyproject.toml allows exactly that import and no other.
"""

from __future__ import annotations

import atexit
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from mpi4py import MPI

from data_prep.ensure import ensure_partition, explicit_mismatch
from disdl_mpi.comm.collective_check import CheckedComm, CollectiveChecker
from disdl_mpi.comm.torch_group import over_torch, resolve_comm, start_process_group, stop_process_group
from disdl_mpi.comm.world import RankInfo, agree_or_raise, install_abort_handler, rank_info, world
from disdl_mpi.config import config_errors, parse_config
from disdl_mpi.data.budget import agreed_budget
from disdl_mpi.data.local_data import LocalData
from disdl_mpi.data.partition_io import load_partition
from disdl_mpi.device import seed_everything, select_device, set_threads
from disdl_mpi.errors import UserError
from disdl_mpi.files import jsonable
from disdl_mpi.job_setup import Job, announce, build_context, rank_data
from disdl_mpi.machine import peak_rss_bytes
from disdl_mpi.observe.progress import Progress
from disdl_mpi.observe.results import format_table, write_metrics, write_summary
from disdl_mpi.observe.timing import phase_summary
from disdl_mpi.reliability import outlock
from disdl_mpi.reliability.checkpoint import Loaded, rng_state
from disdl_mpi.reliability.guards import SignalWatch
from disdl_mpi.scheme_output import RunFacts, save_model, scheme_record
from disdl_mpi.train_context import RankData, TrainContext, TrainHooks
from disdl_mpi.trainer import train_scheme


def main(argv: list[str] | None = None, hooks: Optional[TrainHooks] = None) -> int:
    """The whole job on this rank; ``hooks`` are the training loop's seams (tests use them)."""
    job = start_job(argv)
    info, device, threads = set_up_rank(job)
    data_dir = job.cfg.resolved_data_dir(job.cfg.isolated_ranks(info.world_size))
    ensure_data(job, data_dir)
    local = load_local(job, data_dir, device, info)
    data = rank_data(job, local, device, info)
    # Reading, checking and standardizing, on the slowest rank (Python's start is before this).
    startup_s = job.comm.allreduce(time.perf_counter() - job.started, op=MPI.MAX)
    facts = announce(job, info, device, threads, data, local, data_dir, startup_s)
    ctx, progress, loaded = build_context(job, info, device, data, facts, local, hooks)
    try:
        records = train_schemes(job, ctx, progress, facts, loaded)
        finish(job, ctx, records, facts.machine, data)
    finally:
        # The heartbeat thread must be quiet before any exit reaches MPI_Finalize, an error's
        # included: Open MPI aborts a process that sends after it (exit code 14).
        if ctx.watchdog is not None:
            ctx.watchdog.close()
    stop_process_group()
    return 0


# ---- 1. the job: configuration, checked alike on every rank and reported once --------------


def start_job(argv: list[str] | None) -> Job:
    """Parse and check the configuration on every rank; rank 0 takes the results folder."""
    started = time.perf_counter()
    comm = world()
    install_abort_handler(comm)
    # SIGTERM/SIGUSR1 only set a flag; the step loop checkpoints and stops at a step boundary.
    watch = SignalWatch().install()
    rank = comm.Get_rank()
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    cfg = parse_config(argv, rank)
    if cfg.check_collectives:  # debug mode: every collective below is compared across ranks
        comm = CheckedComm(comm, CollectiveChecker(comm))
    errors = config_errors(cfg, comm.Get_size())
    out = cfg.resolved_out()
    lock_note = None
    if rank == 0 and not errors:
        err = outlock.check_writable(out)
        if err is None:
            err, lock_note = outlock.acquire(out)
            if err is None:  # held until this process ends, however it ends
                atexit.register(outlock.release, out)
        errors += [err] if err else []
    agree_or_raise(comm, "\n".join(errors) if errors else None)
    if lock_note:
        log(lock_note)
    return Job(
        comm=comm,
        cfg=cfg,
        argv=sys.argv[1:] if argv is None else argv,
        out=out,
        norms=cfg.schemes(),
        watch=watch,
        log=log,
        started=started,
    )


# ---- 2. this rank: device, threads, seeds ---------------------------------------------------


def set_up_rank(job: Job) -> tuple[RankInfo, torch.device, int]:
    info = rank_info(job.comm)
    device = select_device(job.cfg.device, info)
    threads = set_threads(job.cfg.threads, info)
    seed_everything(job.cfg.seed)
    # the data path: MPI, or a torch.distributed group bootstrapped from it (--comm)
    path, why = resolve_comm(job.cfg.comm, device, job.comm)
    job.cfg = dataclasses.replace(job.cfg, comm=path)
    if over_torch(path):
        start_process_group(job.comm, path)
    job.log(f"data path: {path} ({why})")
    return info, device, threads


# ---- 3. its private partition ---------------------------------------------------------------


def ensure_data(job: Job, data_dir: Path) -> None:
    """Rank 0 builds a missing partition (and checks the default folder's); the others wait.

    The default folder (no --data-dir) is named after every setting that shapes the
    partition and is checked against its manifest, so it is never reused with other settings.
    """
    cfg, comm = job.cfg, job.comm
    error = None
    if comm.Get_rank() == 0:
        missing = not (data_dir / "partition.json").exists() and not any(data_dir.glob("rank_*.h5"))
        try:
            if missing:
                print(
                    f"building partition {data_dir} ({cfg.dataset}, {cfg.partition}, "
                    f"{cfg.isolated_ranks(comm.Get_size())} ranks, seed {cfg.seed})",
                    flush=True,
                )
            if missing or cfg.data_dir is None:
                ensure_partition(
                    data_dir,
                    cfg.dataset,
                    cfg.isolated_ranks(comm.Get_size()),
                    cfg.partition,
                    cfg.seed,
                    source_dir=cfg.source_dir,
                    min_per_rank=cfg.min_per_rank,
                )
        except Exception as exc:  # reported on every rank below, never a hang
            error = f"building partition {data_dir} on rank 0 failed: {exc}" if missing else str(exc)
    error = comm.bcast(error, root=0)
    if error:
        raise UserError(error, collective=True)


def load_local(job: Job, data_dir: Path, device: torch.device, info: RankInfo) -> LocalData:
    """This rank's partition, validated on every rank, and refused if the partition on disk
    was built with another --dataset or --partition than the ones given explicitly."""
    cfg, comm = job.cfg, job.comm
    local = load_partition(
        comm,
        data_dir,
        budget=agreed_budget(comm, device, info.hostnames, cfg.memory_budget),
        test_shard=not job.whole_test,
        residency=cfg.data_residency,
        virtual_ranks=cfg.virtual_ranks,
    )

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in job.argv)

    mismatch = explicit_mismatch(
        local.manifest,
        data_dir / "partition.json",
        dataset=cfg.dataset if given("--dataset") else None,
        spec=cfg.partition if given("--partition") else None,
    )
    if mismatch:
        raise UserError(mismatch, collective=True)
    return local


# ---- 4. the training context (job_setup.build_context); 5. every scheme in turn -------------


def train_schemes(
    job: Job, ctx: TrainContext, progress: Progress, facts: RunFacts, loaded: Optional[Loaded]
) -> list[dict]:
    """Train the schemes not done yet (after ``loaded``'s, when resuming); rank 0 writes the
    results after each one."""
    cfg, comm, rank = job.cfg, job.comm, job.rank
    records: list[dict] = []
    first_scheme = 0
    if loaded is not None:
        records = list(loaded.shared["run"].get("records", []))
        first_scheme = int(loaded.shared["position"]["scheme_index"])
    for index, name in enumerate(job.norms):
        if index < first_scheme:
            continue
        ctx.scheme_index, ctx.run_records = index, records
        ctx.resume = _resume_point(loaded, index, first_scheme)
        start = time.perf_counter()
        res = train_scheme(ctx, name)
        wall = time.perf_counter() - start
        record = scheme_record(
            cfg,
            res,
            phase_summary(comm, res.phases),
            facts,
            wall=wall,
            peak_rss=comm.allgather(peak_rss_bytes()),
        )  # every rank's
        records.append(record)
        scheme_dir = job.out / name
        if rank == 0:
            write_metrics(scheme_dir / "metrics.csv", res.epochs_log)
            progress.line(
                f"{name}: test accuracy {res.test_accuracy:.4f}, "
                f"{record['samples_per_s']:.0f} samples/s, {wall:.1f} s"
            )
        if cfg.save_model:
            save_model(
                res.model,
                scheme_dir,
                rank,
                per_rank=res.per_rank_accuracy is not None,
                virtual_ranks=cfg.virtual_ranks,
            )
        if rank == 0:  # written after every scheme, so an interrupted run keeps what finished
            write_summary(job.out, records, cfg.to_dict(), facts.machine)
        if ctx.checkpoint_every and index + 1 < len(job.norms):
            # A scheme boundary: a resumed multi-scheme run skips the schemes already done.
            ctx.checkpointer.save(
                {
                    "position": {"scheme_index": index + 1, "norm": None, "epoch": 0, "batch": 0, "step": 0},
                    "run": jsonable({"scheme_index": index + 1, "records": records}),
                },
                {"rng": rng_state()},
                label=f"after scheme {name}",
            )
    progress.close()
    return records


# ---- 6. the end: timeline, final table ------------------------------------------------------


def finish(job: Job, ctx: TrainContext, records: list[dict], machine: dict, data: RankData) -> None:
    log, cfg = job.log, job.cfg
    if ctx.watchdog is not None:
        ctx.watchdog.enter(-1, "writing results")
    if job.watch.received is not None:
        log(f"note: signal {job.watch.received} arrived after the last training step; the run is complete")
    if ctx.trace is not None:
        ctx.trace.write(job.comm, cfg.timeline, metadata=machine)
        log(f"timeline: {cfg.timeline} (chrome://tracing or ui.perfetto.dev)")
    if ctx.profiler is not None and ctx.profiler.written:
        log(
            f"profiles (one per rank and scheme, chrome://tracing or tensorboard): "
            f"{ctx.profiler.written[0].parent}"
        )
    job.comm.Barrier()
    if ctx.watchdog is not None:
        ctx.watchdog.close()
    log("\n" + format_table(records))
    if job.cfg.virtual_ranks > 1:
        log(f"(per-phase times are per process, each carrying {job.cfg.virtual_ranks} virtual ranks)")
    report = data.close_stream()  # rank 0's view of how well the reads were hidden
    if report:
        log(f"stream: {report}")
    log(f"\nresults: {job.out}")


def _resume_point(loaded: Optional[Loaded], index: int, first_scheme: int) -> Optional[Loaded]:
    """The checkpoint to continue scheme ``index`` from, if it stopped inside that scheme."""
    if loaded is not None and index == first_scheme and "model" in loaded.shared:
        return loaded
    return None


if __name__ == "__main__":
    sys.exit(main())
