"""The registry of normalization schemes: name -> NormScheme subclass, in ``--norm all`` order.

Each scheme is one class in its own module (disdl_mpi/norms/scheme.py says what a scheme is);
this file only lists them and gives the verbs to look one up and build it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from disdl_mpi.norms.batch_renorm import BRN
from disdl_mpi.norms.carried import BNCarry
from disdl_mpi.norms.evonorm import EvoNormS0, EvoNormScheme
from disdl_mpi.norms.fixed import BNFix
from disdl_mpi.norms.local_schemes import (
    FedBN,
    GroupNormScheme,
    InstanceNormScheme,
    LayerNormScheme,
    LocalBN,
    NoNorm,
)
from disdl_mpi.norms.recalibration import BNRecal
from disdl_mpi.norms.scheme import NormScheme
from disdl_mpi.norms.sync_batch_norm import SyncBN
from disdl_mpi.norms.weight_standardization import GroupNormWS
from disdl_mpi.virtual_ranks import VirtualNorm

# The registry; its order is the order of ``--norm all``. Adding a scheme is one line here.
SCHEMES: dict[str, type[NormScheme]] = {
    cls.name: cls
    for cls in (
        LocalBN,
        SyncBN,
        GroupNormScheme,
        GroupNormWS,
        EvoNormScheme,
        LayerNormScheme,
        InstanceNormScheme,
        BRN,
        FedBN,
        BNRecal,
        BNFix,
        BNCarry,
        NoNorm,
    )
}


def available_schemes() -> list[str]:
    """Scheme names in registry order (the order ``--norm all`` trains them)."""
    return list(SCHEMES)


def scheme_class(name: str) -> type[NormScheme]:
    """The registry entry for ``name`` (case and spaces ignored); ValueError names the bad one."""
    key = name.strip().lower()
    if key not in SCHEMES:
        raise ValueError(
            f"unknown normalization scheme '{name}'; available: {', '.join(available_schemes())}"
        )
    return SCHEMES[key]


def _option_names(cls: type[NormScheme]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def get_scheme(name: str, *, comm: Any = None, **opts: Any) -> NormScheme:
    """Build the scheme ``name`` with its keyword options.

    ``comm`` is the schemes' OWN communicator, a ``Dup()`` of the training communicator made
    once per run by the caller, so that the blocking collectives of syncbn/bn-recal never
    interleave with the gradient allreducer's outstanding requests. With ``comm=None`` a
    communicating scheme duplicates COMM_WORLD itself and frees it in ``close()``.

    Options by scheme: ``gn``: ``gn_groups``; ``brn``: ``brn_warmup_steps``, ``r_max``,
    ``d_max``; ``syncbn``: ``grad_convention`` ('local_mean' or 'global', see
    sync_batch_norm.py); ``bn-fix``: ``fix_at``. Unknown options raise, so a typo never goes
    unnoticed. Example: ``get_scheme("brn", brn_warmup_steps=10)``.
    """
    cls = scheme_class(name)
    known = _option_names(cls)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(
            f"norm '{cls.name}' takes no options named {unknown}"
            + (f"; its options: {', '.join(known)}" if known else "")
        )
    return cls(comm, **opts)


def build_for_run(name: str, cfg: Any, comm: Any) -> NormScheme:
    """The scheme ``name`` with the options it takes from the run configuration ``cfg``."""
    cls = scheme_class(name)
    return get_scheme(cls.name, comm=comm, **cls.options(cfg))


def resolve_schemes(items: str | list[str]) -> list[str]:
    """``--norm`` as every tool takes it: 'all', names, comma lists (one string or several)
    -> registry names in the order given, duplicates dropped; ValueError names the bad one."""
    known = available_schemes()
    names: list[str] = []
    for item in [items] if isinstance(items, str) else items:
        for name in (n.strip().lower() for n in item.split(",")):
            if not name:
                continue
            if name == "all":
                names += [k for k in known if k not in names]
            elif name not in known:
                raise ValueError(f"--norm: unknown scheme {name!r}; known: {', '.join(known)}, all")
            elif name not in names:
                names.append(name)
    if not names:
        raise ValueError("--norm: no scheme given")
    return names


def scheme_config_errors(names: list[str], cfg: Any) -> list[str]:
    """What the schemes ``names`` refuse in ``cfg`` (each scheme's own constraints)."""
    return [err for name in names for err in SCHEMES[name].config_errors(cfg)]


def is_norm_layer(module: nn.Module) -> bool:
    """True for any normalization layer (the modules whose state fedbn keeps local), and for
    the K copies of one that virtual ranks keep (a VirtualNorm)."""
    return isinstance(
        module,
        (
            nn.modules.batchnorm._NormBase,
            nn.GroupNorm,
            nn.LayerNorm,
            nn.LocalResponseNorm,
            EvoNormS0,
            VirtualNorm,
        ),
    )


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every normalization layer of ``model``."""
    return [(name, m) for name, m in model.named_modules() if is_norm_layer(m)]


def norm_state_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters and buffers that belong to normalization layers."""
    return {
        id(t)
        for _, m in norm_layers(model)
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
    }
