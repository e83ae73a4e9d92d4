"""The registry of normalization schemes: name -> NormSpec, and the NormScheme object the run uses."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from disdl_mpi.norms.local_layers import InstanceNormAny, LocalBatchNorm, gn_groups_for


class CommTimer:
    """Cumulative wall seconds spent in a scheme's own collectives (shared by its layers)."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds += time.perf_counter() - t0


class NormScheme:
    """One normalization scheme as the trainer sees it (see docs/CONTRACTS.md).

    ``layer(C)`` builds a norm layer for C channels/features; ``recalibrate`` is a callable
    ``(model, x_train, batch_size)`` to run before every evaluation, or None; ``on_step(step)``
    is called once per optimizer step; ``comm_seconds()`` reports the time spent in the
    scheme's own collectives. Schemes that communicate own a duplicated communicator; call
    ``close()`` when done with the scheme to free it.
    """

    def __init__(self, name: str, layer_fn: Callable[[int], nn.Module], *,
                 local_params: bool = False, per_rank_eval: bool = False,
                 recalibrate: Optional[Callable[..., None]] = None,
                 on_step: Optional[Callable[[int], None]] = None,
                 comm: Any = None, owns_comm: bool = False,
                 timer: Optional[CommTimer] = None, collective_forward: bool = False,
                 before_step: Optional[Callable[..., None]] = None,
                 payload: Optional[Callable[[nn.Module], Any]] = None,
                 description: str = "") -> None:
        self.name = name
        self._layer_fn = layer_fn
        self.local_params = local_params
        self.per_rank_eval = per_rank_eval
        self.recalibrate = recalibrate
        self._on_step = on_step
        self.comm = comm
        self._owns_comm = owns_comm
        self.timer = timer or CommTimer()
        # True when forward runs collectives: a rank with an empty batch must still call it.
        self.collective_forward = collective_forward
        # (model, x_train, batch_size, step, total_steps) before every step (bn-fix's freeze)
        self.before_step = before_step
        # model -> a Payload the gradient allreduce sums for the scheme (bn-carry's statistics)
        self.payload = payload
        self.description = description

    def layer(self, num_features: int) -> nn.Module:
        """A fresh norm layer for ``num_features`` channels; works on (N,C,H,W) and (N,C)."""
        if int(num_features) < 1:
            raise ValueError(f"norm '{self.name}': num_features must be >= 1, got {num_features}")
        return self._layer_fn(int(num_features))

    __call__ = layer  # so the scheme itself can be passed as ``norm_layer``

    def on_step(self, step: int) -> None:
        """Per-step hook (Batch Renorm's r_max/d_max warm-up); a no-op for most schemes."""
        if self._on_step is not None:
            self._on_step(int(step))

    def comm_seconds(self) -> float:
        """Cumulative seconds this scheme spent in its own collectives."""
        return self.timer.seconds

    def close(self) -> None:
        """Free the communicator the scheme duplicated itself (when get_scheme got comm=None)."""
        if self.comm is not None and self._owns_comm:
            try:
                self.comm.Free()
            finally:
                self.comm = None

    def __repr__(self) -> str:
        return f"NormScheme({self.name!r})"


@dataclass(frozen=True)
class NormSpec:
    """A registry entry: the scheme's name, a one-line summary and its factory."""

    name: str
    summary: str
    factory: Callable[..., NormScheme]
    communicates: bool = False
    per_rank_eval: bool = False   # every rank scores its own model on the whole test set


def _no_opts(name: str, opts: dict) -> None:
    if opts:
        raise ValueError(f"norm '{name}' takes no options, got {sorted(opts)}")


# ---- schemes without communication -------------------------------------------------------

def _bn(*, comm=None, gn_groups=8, **opts) -> NormScheme:
    _no_opts("bn", opts)
    return NormScheme("bn", LocalBatchNorm, description=SCHEMES["bn"].summary)


def _gn(*, comm=None, gn_groups=8, **opts) -> NormScheme:
    _no_opts("gn", opts)
    gn_groups_for(1, gn_groups)  # validates early
    return NormScheme("gn", lambda c: nn.GroupNorm(gn_groups_for(c, gn_groups), c),
                      description=SCHEMES["gn"].summary)


def _ln(*, comm=None, gn_groups=8, **opts) -> NormScheme:
    _no_opts("ln", opts)
    return NormScheme("ln", lambda c: nn.GroupNorm(1, c), description=SCHEMES["ln"].summary)


def _in(*, comm=None, gn_groups=8, **opts) -> NormScheme:
    _no_opts("in", opts)
    return NormScheme("in", InstanceNormAny, description=SCHEMES["in"].summary)


class FedBatchNorm(LocalBatchNorm):
    """Local BN whose statistics and affine parameters are never averaged (FedBN)."""


def _fedbn(*, comm=None, gn_groups=8, **opts) -> NormScheme:
    _no_opts("fedbn", opts)
    return NormScheme("fedbn", FedBatchNorm, local_params=True, per_rank_eval=True,
                      description=SCHEMES["fedbn"].summary)


def _none(*, comm=None, gn_groups=8, **opts) -> NormScheme:
    _no_opts("none", opts)
    return NormScheme("none", lambda c: nn.Identity(), description=SCHEMES["none"].summary)


# ---- schemes that communicate or need more than a layer ----------------------------------

def _syncbn(*, comm=None, gn_groups=8, grad_convention: str = "local_mean",
            **opts) -> NormScheme:
    from disdl_mpi.norms.sync_batch_norm import SyncBatchNorm
    _no_opts("syncbn", opts)
    timer = CommTimer()
    SyncBatchNorm(1, comm, timer, convention=grad_convention)  # validates the convention
    return NormScheme("syncbn", lambda c: SyncBatchNorm(c, comm, timer,
                                                        convention=grad_convention),
                      comm=comm, timer=timer, collective_forward=True,
                      description=SCHEMES["syncbn"].summary)


def _brn(*, comm=None, gn_groups=8, brn_warmup_steps: int = 100, r_max: float = 3.0,
         d_max: float = 5.0, **opts) -> NormScheme:
    from disdl_mpi.norms.batch_renorm import BatchRenorm, RenormSchedule
    _no_opts("brn", opts)
    schedule = RenormSchedule(brn_warmup_steps, r_max, d_max)
    scheme = NormScheme("brn", lambda c: BatchRenorm(c, schedule), on_step=schedule.set_step,
                        description=SCHEMES["brn"].summary)
    scheme.schedule = schedule  # type: ignore[attr-defined]  # for logs and tests
    return scheme


def _bn_recal(*, comm=None, gn_groups=8, **opts) -> NormScheme:
    from disdl_mpi.norms.recalibration import RecalBatchNorm, recalibrate_batchnorm
    _no_opts("bn-recal", opts)
    timer = CommTimer()

    def recalibrate(model: nn.Module, x_train: Any, batch_size: int) -> None:
        recalibrate_batchnorm(model, x_train, batch_size, comm, timer)

    return NormScheme("bn-recal", RecalBatchNorm, recalibrate=recalibrate, comm=comm,
                      timer=timer, description=SCHEMES["bn-recal"].summary)


def _bn_fix(*, comm=None, gn_groups=8, fix_at: Optional[int] = None, **opts) -> NormScheme:
    from disdl_mpi.norms.fixed import FixBatchNorm, FixSchedule
    _no_opts("bn-fix", opts)
    timer = CommTimer()
    return NormScheme("bn-fix", FixBatchNorm, comm=comm, timer=timer,
                      before_step=FixSchedule(comm, timer, fix_at),
                      description=SCHEMES["bn-fix"].summary)


def _bn_carry(*, comm=None, gn_groups=8, **opts) -> NormScheme:
    from disdl_mpi.norms.carried import CarryBatchNorm, StatsPayload
    _no_opts("bn-carry", opts)
    return NormScheme("bn-carry", CarryBatchNorm, payload=StatsPayload,
                      description=SCHEMES["bn-carry"].summary)


# The registry; its order is the order of ``--norm all``. Adding a scheme is one entry here.
SCHEMES: dict[str, NormSpec] = {
    "bn": NormSpec("bn", "local BatchNorm (Ioffe & Szegedy 2015) over each rank's own batch: "
                         "the baseline; its statistics follow the rank's skewed label mix", _bn),
    "syncbn": NormSpec("syncbn", "synchronized BatchNorm: statistics of the whole global batch "
                                 "via MPI allreduce (exact for unequal/empty local batches); what "
                                 "one machine would compute, at one small allreduce per layer "
                                 "per pass", _syncbn, communicates=True),
    "gn": NormSpec("gn", "GroupNorm (Wu & He 2018): per-sample statistics over channel groups, "
                         "independent of the batch and so of the skew", _gn),
    "ln": NormSpec("ln", "LayerNorm over C,H,W (Ba et al. 2016), i.e. GroupNorm with one group; "
                         "batch-independent", _ln),
    "in": NormSpec("in", "InstanceNorm with affine (Ulyanov et al. 2016): per-sample, "
                         "per-channel statistics; on flat features it falls back to per-sample "
                         "LayerNorm", _in),
    "brn": NormSpec("brn", "Batch Renormalization (Ioffe 2017): local batch statistics corrected "
                           "towards the running ones (r/d clipping, warm-up r_max 1->3, "
                           "d_max 0->5); for small or non-i.i.d. local batches", _brn),
    "fedbn": NormSpec("fedbn", "FedBN (Li et al. ICLR 2021): BN statistics and affine "
                               "parameters stay local to each rank; targets feature shift across "
                               "ranks, not label skew; every rank evaluates with its own model",
                      _fedbn, per_rank_eval=True),
    "bn-recal": NormSpec("bn-recal", "local BN in training, then precise-BN recalibration (Wu & "
                                     "Johnson 2021) of the running mean/var over ALL ranks' "
                                     "training data by allreduce of per-channel moments before "
                                     "every evaluation", _bn_recal, communicates=True),
    "bn-fix": NormSpec("bn-fix", "FixBN (Zhong, Chen & Chao 2023): local BN until step T* "
                                 "(--fix-at, default half the run), then statistics "
                                 "recalibrated over all ranks once and frozen, used in training "
                                 "and evaluation; no per-step collective", _bn_fix,
                       communicates=True),
    "bn-carry": NormSpec("bn-carry", "BN with global statistics carried in the gradient "
                                     "allreduce: each layer normalizes with the previous step's "
                                     "global batch statistics, whose sums ride in the last "
                                     "gradient bucket; no collective of its own", _bn_carry),
    "none": NormSpec("none", "no normalization (identity); conv/linear layers get biases", _none),
}


def available_schemes() -> list[str]:
    """PartitionSpec names in registry order (the order ``--norm all`` trains them)."""
    return list(SCHEMES)


def get_scheme(name: str, *, comm: Any = None, gn_groups: int = 8, **opts: Any) -> NormScheme:
    """Build the scheme ``name``.

    ``comm`` is the schemes' OWN communicator, a ``Dup()`` of the training communicator made
    once per run by the caller, so that the blocking collectives of syncbn/bn-recal never
    interleave with the gradient allreducer's outstanding requests. With ``comm=None`` a
    communicating scheme duplicates COMM_WORLD itself and frees it in ``close()``.

    Options by scheme: ``brn``: ``brn_warmup_steps``, ``r_max``, ``d_max``; ``syncbn``:
    ``grad_convention`` ('local_mean' or 'global', see sync_batch_norm.py). Unknown options
    raise, so a typo never goes unnoticed.
    """
    key = name.strip().lower()
    if key not in SCHEMES:
        raise ValueError(f"unknown normalization scheme '{name}'; available: "
                         f"{', '.join(available_schemes())}")
    spec = SCHEMES[key]
    if not spec.communicates:
        return spec.factory(comm=None, gn_groups=gn_groups, **opts)
    owns = comm is None
    if owns:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD.Dup()
    try:
        scheme = spec.factory(comm=comm, gn_groups=gn_groups, **opts)
    except Exception:
        if owns:
            comm.Free()
        raise
    scheme._owns_comm = owns
    return scheme


def resolve_schemes(items: str | list[str]) -> list[str]:
    """``--norm`` as every tool takes it: 'all', names, comma lists (one string or several)
    -> registry names in the order given, duplicates dropped; ValueError names the bad one."""
    known = available_schemes()
    names: list[str] = []
    for item in ([items] if isinstance(items, str) else items):
        for name in (n.strip().lower() for n in item.split(",")):
            if not name:
                continue
            if name == "all":
                names += [k for k in known if k not in names]
            elif name not in known:
                raise ValueError(f"--norm: unknown scheme {name!r}; known: "
                                 f"{', '.join(known)}, all")
            elif name not in names:
                names.append(name)
    if not names:
        raise ValueError("--norm: no scheme given")
    return names


def is_norm_layer(module: nn.Module) -> bool:
    """True for any normalization layer (the modules whose state fedbn keeps local)."""
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                               nn.LocalResponseNorm))


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every normalization layer of ``model``."""
    return [(name, m) for name, m in model.named_modules() if is_norm_layer(m)]


def norm_state_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters and buffers that belong to normalization layers."""
    return {id(t) for _, m in norm_layers(model)
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
