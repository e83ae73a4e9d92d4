"""What a normalization scheme is to the trainer: one :class:`NormScheme` object with hook methods.

The trainer never asks which scheme it holds; it calls the hooks, and each scheme overrides
the ones it needs (as Flower's ``Partitioner`` declares what a partitioner must do). The facts
the run needs before it builds a scheme (does it communicate, does it keep rank-local state,
does every rank score its own model) are class attributes, so they are read from the registry
entry itself, never restated elsewhere.

Adding a scheme is one file (a subclass with ``name``, ``summary`` and ``make_layer``, plus
the hooks it needs) and one line in :data:`disdl_mpi.norms.registry.SCHEMES`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Optional

from torch import nn

from disdl_mpi.comm.allreducer import Payload


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
    """One normalization scheme as the trainer sees it (docs/CONTRACTS.md, "NormScheme").

    Class attributes (read from the registry entry, before any scheme is built):

    - ``name``, ``summary``: the ``--norm`` name and a one-line description;
    - ``communicates``: it runs collectives of its own, on a communicator it is given (a
      ``Dup()`` of the training one) or duplicates from ``COMM_WORLD`` and frees in ``close``;
    - ``collective_forward``: its forward runs collectives, so a rank with an empty batch must
      still run it;
    - ``local_params``: its norm layers' parameters and buffers stay rank-local (never
      broadcast nor allreduced);
    - ``per_rank_eval``: every rank scores its own model on the whole test set;
    - ``per_rank_layers``: its layers keep per-rank state or normalize with the rank's own
      batch, so a process of K virtual ranks keeps K copies of each (disdl_mpi.virtual_ranks).

    Hooks, each a no-op by default: :meth:`options` and :meth:`config_errors` (what the scheme
    takes from, and refuses in, the run configuration), :meth:`make_layer`,
    :meth:`before_step`, :meth:`after_step`, :meth:`recalibrate` (before every evaluation)
    and :meth:`payload` (floats for the gradient allreduce to sum).

    Example::

        scheme = get_scheme("gn", gn_groups=4)
        model = build_model("cnn", (1, 8, 8), 10, scheme.layer)
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    communicates: ClassVar[bool] = False
    collective_forward: ClassVar[bool] = False
    local_params: ClassVar[bool] = False
    per_rank_eval: ClassVar[bool] = False
    per_rank_layers: ClassVar[bool] = False
    # the layer, where it is built as ``layer_type(num_features)``; others override make_layer
    layer_type: ClassVar[type[nn.Module] | None] = None

    def __init__(self, comm: Any = None) -> None:
        self.timer = CommTimer()
        self.comm: Any = None
        self._owns_comm = False
        if self.communicates:
            if comm is None:
                from mpi4py import MPI

                comm, self._owns_comm = MPI.COMM_WORLD.Dup(), True
            self.comm = comm

    # ---- configuration ------------------------------------------------------------------
    @classmethod
    def options(cls, cfg: Any) -> dict[str, Any]:
        """The keyword options this scheme takes from the run configuration (a RunConfig)."""
        return {}

    @classmethod
    def config_errors(cls, cfg: Any) -> list[str]:
        """Settings of the run configuration this scheme cannot train with (messages)."""
        return []

    # ---- layers -------------------------------------------------------------------------
    def make_layer(self, num_features: int) -> nn.Module:
        """A fresh norm layer for ``num_features`` channels: ``layer_type``'s, or an override's."""
        if self.layer_type is None:
            raise NotImplementedError(f"norm '{self.name}' defines no layer")
        return self.layer_type(num_features)

    def layer(self, num_features: int) -> nn.Module:
        """A fresh norm layer for ``num_features`` channels; works on (N,C,H,W) and (N,C)."""
        if int(num_features) < 1:
            raise ValueError(f"norm '{self.name}': num_features must be >= 1, got {num_features}")
        return self.make_layer(int(num_features))

    __call__ = layer  # so the scheme itself can be passed as ``norm_layer``

    # ---- training hooks -----------------------------------------------------------------
    def before_step(
        self, model: nn.Module, x_train: Any, batch_size: int, step: int, total_steps: int
    ) -> None:
        """Before optimizer step ``step`` (from 0) of ``total_steps``; may be collective."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (from 0) has updated the weights."""

    def recalibrate(self, model: nn.Module, x_train: Any, batch_size: int) -> None:
        """Before every evaluation; collective where the scheme communicates."""

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Changes the scheme makes to a freshly built model beyond its norm layers (gn-ws:
        weight-standardized convolutions); the same model, changed in place."""
        return model

    def payload(self, model: nn.Module) -> Optional[Payload]:
        """Floats that ride in the last gradient bucket (summed unweighted), or None."""
        return None

    # ---- accounting and lifetime --------------------------------------------------------
    def comm_seconds(self) -> float:
        """Cumulative seconds this scheme spent in its own collectives."""
        return self.timer.seconds

    def host_syncs(self) -> int:
        """Host synchronizations its own collectives made so far (0 for most schemes)."""
        return 0

    def close(self) -> None:
        """Free the communicator the scheme duplicated itself (when it was given none)."""
        if self.comm is not None and self._owns_comm:
            try:
                self.comm.Free()
            finally:
                self.comm = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
