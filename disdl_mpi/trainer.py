"""Synchronous data-isolated SGD for one normalization scheme.

:func:`train_scheme` reads as its named steps; :class:`SchemeTraining` holds one scheme's state
and implements them: ``restore`` (from a checkpoint), ``step`` (one :func:`disdl_mpi.step.sync_step`
with its timing), ``decide`` (the guard's agreed NaN/signal decision), ``checkpoint``,
``end_of_epoch`` and ``evaluate``. What it is given and returns (``TrainContext``,
``SchemeResult``) lives in :mod:`disdl_mpi.train_context`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import numpy as np
import torch
from mpi4py import MPI

from disdl_mpi.batching import BatchPlan
from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.comm.model_sync import broadcast_module_
from disdl_mpi.comm.torch_group import over_torch
from disdl_mpi.comm.world import where
from disdl_mpi.config import RunConfig
from disdl_mpi.device import seed_everything
from disdl_mpi.evaluate import count_correct, evaluate_per_rank
from disdl_mpi.files import jsonable
from disdl_mpi.models import build_model
from disdl_mpi.norms import build_for_run, norm_state_ids
from disdl_mpi.observe.timing import PhaseTimer
from disdl_mpi.reliability.checkpoint import Loaded, model_parts, restore_model, rng_state, set_rng_state
from disdl_mpi.reliability.guards import GradFiniteProbe, NumericalError, Preempted, StepDecision, signal_name
from disdl_mpi.schedule import lr_factor
from disdl_mpi.step import StepResult, sync_step
from disdl_mpi.train_context import SchemeResult, TrainContext
from disdl_mpi.virtual_ranks import VirtualPlan, batch_plan, copy_first_member, scheme_layers


def total_steps(cfg: RunConfig, plan: BatchPlan) -> tuple[int, int]:
    """(epochs, steps) actually run: --steps overrides --epochs."""
    if cfg.steps is not None:
        return max(1, -(-cfg.steps // plan.steps_per_epoch)), cfg.steps
    return cfg.epochs, cfg.epochs * plan.steps_per_epoch


class SchemeTraining:
    """One scheme's model, optimizer, allreducer and position; see the module docstring."""

    def __init__(self, ctx: TrainContext, norm_name: str) -> None:
        cfg, comm, data = ctx.cfg, ctx.comm, ctx.data
        self.ctx, self.cfg, self.comm, self.data, self.name = ctx, cfg, comm, data, norm_name
        self.scheme = build_for_run(norm_name, cfg, ctx.norm_comm)
        # --virtual-ranks K: K copies of each norm layer where the scheme keeps per-rank state
        layer, self.segments = scheme_layers(self.scheme, cfg.virtual_ranks)
        seed_everything(cfg.seed)  # the same initial weights for every scheme
        model = build_model(ctx.model_name, data.sample_shape, data.num_classes, layer)
        self.model = self.scheme.adapt_model(model).to(ctx.device)
        self.local_ids = norm_state_ids(self.model) if self.scheme.local_params else set()
        broadcast_module_(self.model, comm, exclude=self.local_ids)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.reducer = GradientAllreducer(
            self.model,
            comm,
            bucket_mb=cfg.bucket_mb,
            overlap=cfg.overlap,
            compress=cfg.compress,
            cuda_aware=cfg.cuda_aware,
            skip=lambda name, p: id(p) in self.local_ids,
            payload=self.scheme.payload(self.model),
            torch_group=True if over_torch(cfg.comm) else None,
        )
        self.plan = batch_plan(data.sizes, comm.Get_rank(), cfg, self.segments)
        self.epochs, self.max_steps = total_steps(cfg, self.plan)
        self.warmup_steps = round(cfg.warmup_epochs * self.plan.steps_per_epoch)
        self.timer = PhaseTimer(
            ctx.device,
            wait_comm=ctx.wait_comm,
            trace=ctx.trace,
            on_phase=ctx.watchdog.enter if ctx.watchdog else None,
        )
        if ctx.watchdog is not None:
            reducer = self.reducer
            ctx.watchdog.detail = lambda: (
                "" if reducer.waiting_for is None else f"gradient bucket {reducer.waiting_for}"
            )
        self.probe = GradFiniteProbe(self.model) if ctx.guard is not None else None
        self.norm_comm_start = self.scheme.comm_seconds()
        self.guard_start = ctx.guard.seconds if ctx.guard is not None else 0.0
        # position and results so far (restored on resume)
        self.epoch = self.batch = self.step_no = self.samples = self.skipped = 0
        self.train_s = 0.0
        self.epoch_start = time.perf_counter()
        self.acc: float = 0.0
        self.per_rank: Optional[list[float]] = None
        self.log: list[dict] = []
        self.loss_sum = np.zeros(2, dtype=np.float64)  # [sum of sample losses, samples]
        self.reached: Optional[dict] = None  # when --target-accuracy was first met
        self.domain_acc: Optional[list[float]] = None

    # ----------------------------------------------------------------- restore
    def restore(self, loaded: Loaded) -> None:
        """Continue from a checkpoint inside this scheme: bitwise an uninterrupted run."""
        restore_model(self.model, self.optimizer, loaded.shared, loaded.local)
        pos, st = loaded.shared["position"], loaded.shared["scheme_state"]
        self.epoch, self.batch, self.step_no = pos["epoch"], pos["batch"], pos["step"]
        self.samples, self.train_s, self.skipped = st["samples"], st["train_s"], st["skipped"]
        self.log, self.acc, self.per_rank = list(st["epochs_log"]), st["acc"], st["per_rank"]
        self.reached = st.get("reached")
        self.loss_sum = loaded.local["loss_sum"].numpy().astype(np.float64).copy()
        set_rng_state(loaded.local["rng"])
        for k, v in st.get("phases", {}).items():
            self.timer.add(k, v)  # phase totals cover the whole scheme, before and after

    # ----------------------------------------------------------------- step
    def step(
        self, idx: np.ndarray, n_global: int, shares: Optional[list[int]] = None
    ) -> tuple[StepResult, Optional[StepDecision]]:
        """One optimizer step on this rank's batch ``idx`` (virtual ranks: ``shares`` rows of
        each, in order); returns it and the guard's verdict."""
        timer, ctx, cfg = self.timer, self.ctx, self.cfg
        self.scheme.before_step(
            self.model, self.data.x_train, cfg.global_batch_size, self.step_no, self.max_steps
        )
        rate = cfg.lr * lr_factor(cfg.lr_schedule, self.step_no, self.max_steps, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        if ctx.profiler is not None:
            ctx.profiler.before_step(self.step_no, timer)
        timer.begin_step(self.step_no)
        with timer.phase("data"):
            index = torch.as_tensor(idx, device=ctx.device, dtype=torch.long)
            xb, yb = self.data.x_train[index], self.data.y_train[index]
        # --on-nan skip must undo what forward did to the running statistics.
        saved = [b.detach().clone() for b in self.model.buffers()] if self.cfg.on_nan == "skip" else None
        verdict: list[Optional[StepDecision]] = [None]

        def before_update(res: StepResult) -> bool:
            timer.add("allreduce_total", res.comm.get("total_s", 0.0))
            if ctx.trace is not None:
                ctx.trace.buckets(self.reducer.events, self.reducer.step_origin)
            verdict[0] = self.decide(res)
            if verdict[0] is not None and verdict[0].nonfinite:
                self.skip_step(verdict[0], saved)
                return False
            return True

        split = (
            self.segments.split(shares)
            if self.segments is not None and shares is not None
            else contextlib.nullcontext()
        )
        with split:
            res = sync_step(
                self.model,
                self.optimizer,
                self.reducer,
                xb,
                yb,
                n_global,
                loss_fn=ctx.hooks.loss_fn,
                phase=timer.phase,
                forward_when_empty=self.scheme.collective_forward,
                before_sync=timer.wait_for_peers,
                before_update=before_update,
            )
        timer.end_step()
        self.scheme.after_step(self.model, self.step_no)
        if res.loss_sum is not None and not (verdict[0] and verdict[0].nonfinite):
            self.loss_sum += (res.loss_sum, res.samples)
        self.step_no += 1
        self.samples += n_global
        if ctx.profiler is not None:
            ctx.profiler.after_step(self.step_no - 1, self.name)
        if ctx.hooks.on_step is not None:
            ctx.hooks.on_step(
                self.step_no, self.max_steps, f"{self.name} epoch {self.epoch + 1}/{self.epochs}"
            )
        return res, verdict[0]

    # ----------------------------------------------------------------- decide
    def decide(self, res: StepResult) -> Optional[StepDecision]:
        """Collective: every rank agrees on NaN/Inf anywhere and on signals received."""
        guard = self.ctx.guard
        if guard is None:
            return None
        with self.timer.phase("guard"):
            return guard.decide(not res.loss_finite, self.probe.take())

    def rank_name(self, rank: int) -> str:
        return where(rank, self.ctx.info.hostnames[rank], self.cfg.virtual_ranks)

    def skip_step(self, d: StepDecision, saved: Optional[list[torch.Tensor]]) -> None:
        """A non-finite step: stop every rank, or (``--on-nan skip``) undo it everywhere."""
        what = (
            f"non-finite {d.nonfinite_kind} on {self.rank_name(d.nonfinite_rank)} at optimizer step "
            f"{self.step_no + 1} (scheme {self.name}, epoch {self.epoch + 1})"
        )
        if saved is None:
            raise NumericalError(
                f"{what}: stopping (--on-nan stop); lower --lr, or use --on-nan skip to skip such steps"
            )
        self.ctx.log(f"  {what}: step skipped (--on-nan skip)")
        with torch.no_grad():
            for b, old in zip(self.model.buffers(), saved):
                b.copy_(old)
        self.skipped += 1

    def preempt(self, d: StepDecision) -> None:
        """A signal arrived on some rank: checkpoint this step boundary, then stop all."""
        name = signal_name(d.signum)
        if self.ctx.checkpointer is None:
            raise Preempted(
                f"{name} received on {self.rank_name(d.signal_rank)}: stopped at step "
                f"{self.step_no} of scheme {self.name} (no checkpointer)",
                d.signum,
            )
        path = self.checkpoint(self.epoch, self.batch, f"{name} at step {self.step_no}")
        raise Preempted(
            f"{name} received on {self.rank_name(d.signal_rank)}: checkpoint of scheme "
            f"{self.name} at step {self.step_no} written to {path}; resume with "
            f"--resume auto (same --out)",
            d.signum,
        )

    # ----------------------------------------------------------------- checkpoint
    def checkpoint(self, epoch: int, batch: int, label: str):
        """Collective: commit the state at this step boundary (position = next batch)."""
        shared, local = model_parts(self.model, self.optimizer)
        shared["position"] = {
            "scheme_index": self.ctx.scheme_index,
            "norm": self.name,
            "epoch": epoch,
            "batch": batch,
            "step": self.step_no,
        }
        in_epoch = time.perf_counter() - self.epoch_start if batch else 0.0
        shared["scheme_state"] = {
            "samples": self.samples,
            "train_s": self.train_s + in_epoch,
            "skipped": self.skipped,
            "epochs_log": jsonable(self.log),
            "acc": float(self.acc),
            "per_rank": self.per_rank,
            "reached": self.reached,
            "phases": {k: float(v) for k, v in self.timer.seconds.items()},
        }
        shared["run"] = jsonable({"scheme_index": self.ctx.scheme_index, "records": self.ctx.run_records})
        local["rng"] = rng_state()
        local["loss_sum"] = torch.from_numpy(self.loss_sum.copy())
        return self.ctx.checkpointer.save(shared, local, label=label)

    def maybe_checkpoint(self, unit: str) -> None:
        """The --checkpoint-every schedule, at a step (unit 'steps') or epoch boundary."""
        every = self.ctx.checkpoint_every
        if not every or every[0] != unit:
            return
        if unit == "steps" and self.step_no % every[1] == 0 and self.step_no < self.max_steps:
            self.checkpoint(self.epoch, self.batch, f"every {every[1]} steps")
        if unit == "epochs" and (self.epoch + 1) % every[1] == 0:
            self.checkpoint(self.epoch + 1, 0, f"every {every[1]} epochs")

    # ----------------------------------------------------------------- epochs
    def end_of_epoch(self) -> None:
        """Sum the epoch's loss over ranks, evaluate when due, log the epoch."""
        self.train_s += time.perf_counter() - self.epoch_start
        self.comm.Allreduce(MPI.IN_PLACE, self.loss_sum, op=MPI.SUM)
        last = self.epoch == self.epochs - 1 or self.step_no >= self.max_steps
        every = self.cfg.eval_every
        if last or (every > 0 and (self.epoch + 1) % every == 0):
            self.acc, self.per_rank = self.evaluate()
            target = self.cfg.target_accuracy
            if target is not None and self.reached is None and self.acc >= target:
                self.reached = {
                    "target": target,
                    "epoch": self.epoch + 1,
                    "step": self.step_no,
                    "train_s": self.train_s,
                }
        self.log.append(
            {
                "epoch": self.epoch + 1,
                "step": self.step_no,
                "train_loss": self.loss_sum[0] / max(1.0, self.loss_sum[1]),
                "test_accuracy": self.acc,
                "wall_s": self.train_s,
            }
        )
        if self.ctx.epoch_lines:
            self.ctx.log(
                f"  {self.name:>9} epoch {self.epoch + 1:3d}/{self.epochs}  loss "
                f"{self.log[-1]['train_loss']:.4f}  test acc {self.acc:.4f}"
            )

    def evaluate(self) -> tuple[float, Optional[list[float]]]:
        """Collective: this scheme's test accuracy (per rank too, for rank-local models)."""
        with self.timer.phase("eval"):
            data = self.data
            self.scheme.recalibrate(self.model, data.x_train, self.cfg.global_batch_size)
            if not self.scheme.per_rank_eval:
                # Like DDP's broadcast_buffers: running statistics come from rank 0 (of
                # virtual ranks: copy 0 of process 0).
                copy_first_member(self.model)
                broadcast_module_(self.model, self.comm, buffers_only=True, exclude=self.local_ids)
            if data.x_domain is not None:  # each rank's model on its own domain's split
                own = count_correct(self.model, data.x_domain, data.y_domain)
                self.domain_acc = [float(a) for a in self.comm.allgather(own / max(1, len(data.y_domain)))]
            if self.scheme.per_rank_eval:
                members = self.segments.members() if self.segments is not None else ()
                return evaluate_per_rank(self.model, data.x_test_all, data.y_test_all, self.comm, members)
            return self.ctx.hooks.evaluate(self.model, data.x_test, data.y_test, self.comm), None

    def finish(self) -> SchemeResult:
        if self.ctx.profiler is not None:  # a window that outlasted the scheme's steps
            self.ctx.profiler.finish(self.name)
        if self.probe is not None:
            self.probe.close()
        self.reducer.close()
        self.timer.add("norm_comm", self.scheme.comm_seconds() - self.norm_comm_start)
        if self.ctx.guard is not None:
            self.timer.add("step_guard", self.ctx.guard.seconds - self.guard_start)
        awareness = self.reducer.cuda_awareness
        return SchemeResult(
            norm=self.name,
            model=self.model,
            test_accuracy=self.acc,
            per_rank_accuracy=self.per_rank,
            epochs=len(self.log),
            steps=self.step_no,
            samples=self.samples,
            train_s=self.train_s,
            phases=self.timer.totals(),
            allreduce_path=self.reducer.path,
            cuda_awareness=awareness.reason if awareness is not None else None,
            epochs_log=self.log,
            skipped_steps=self.skipped,
            time_to_accuracy=self.reached,
            domain_accuracy=self.domain_acc,
        )


def train_scheme(ctx: TrainContext, norm_name: str) -> SchemeResult:
    """Train one scheme from the shared initial weights (or ``ctx.resume``) and evaluate it."""
    t = SchemeTraining(ctx, norm_name)
    if ctx.trace is not None:
        ctx.trace.args = {"scheme": norm_name}
    scheme_start = time.perf_counter()
    if ctx.resume is not None:
        t.restore(ctx.resume)
    start_epoch, start_batch = t.epoch, t.batch
    for epoch in range(start_epoch, t.epochs):
        t.epoch = epoch
        t.model.train()
        t.epoch_start = time.perf_counter()
        first = start_batch if epoch == start_epoch else 0
        if first == 0:
            t.loss_sum = np.zeros(2, dtype=np.float64)
        batches = t.plan.epoch_indices(epoch, ctx.cfg.seed)
        getattr(t.data.x_train, "schedule", lambda _: None)(batches[first:])  # stream: read ahead
        for i in range(first, len(batches)):
            if t.step_no >= t.max_steps:
                break
            n_global = t.plan.global_count(i)
            if n_global == 0:
                continue  # every rank knows this step is empty everywhere
            shares = t.plan.shares(i) if isinstance(t.plan, VirtualPlan) else None
            _, decision = t.step(batches[i], n_global, shares)
            t.batch = i + 1
            if decision is not None and decision.preempt:
                t.preempt(decision)
            t.maybe_checkpoint("steps")
        t.end_of_epoch()
        if t.step_no >= t.max_steps:
            break
        t.maybe_checkpoint("epochs")
    result = t.finish()
    if ctx.trace is not None:
        ctx.trace.complete(
            f"scheme {norm_name}", scheme_start, time.perf_counter() - scheme_start, cat="scheme"
        )
    return result
