"""Command-line options that several tools share, spelled and parsed the same way everywhere.

- ``--norm``: normalization schemes ('all', names, comma lists), validated by
  :func:`disdl_mpi.norms.resolve_schemes`;
- ``--partition``: a partition spec (``iid``, ``dirichlet:A``, ``shards:K``, ...);
- ``--dataset``: a data source by name (the names of :data:`disdl_mpi.data.layout.DATASETS`);
- ``--progress``: auto | bar | lines | none (none = quiet);
- ``--json``: always a file path.

Old spellings stay as deprecated aliases that say what to use instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from disdl_mpi.data.layout import DATASETS
from disdl_mpi.observe.progress import MODES as PROGRESS_MODES


def positive_int(text: str) -> int:
    """argparse type for a whole number >= 1 (a count of groups, calls, ...)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


PARTITION_HELP = (
    "partition spec: iid, dirichlet:ALPHA, shards:K, quantity:BETA, "
    "dirichlet:A+quantity:B, feature:KIND (rotate, contrast, noise, mixed)"
)


def program_parser(prog: str, doc: Optional[str]) -> argparse.ArgumentParser:
    """The parser of a program whose module docstring (``doc``, with its examples) is its help."""
    return argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help, unless the help names its own default or the
    option has none worth printing (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action) or text


class DeprecatedAlias(argparse.Action):
    """Stores like the new option and prints a one-line note naming it."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: Optional[str] = None,
    ) -> None:
        print(f"note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_spelling", option_string)


def add_deprecated(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, help=argparse.SUPPRESS, **kwargs)


def add_norm(parser: argparse.ArgumentParser, default: str = "all", **kwargs: Any) -> None:
    parser.add_argument(
        "--norm",
        default=default,
        help="normalization schemes: 'all', a name, "
        "or a comma list (validated by disdl_mpi.norms.resolve_schemes)",
        **kwargs,
    )


def add_partition(
    parser: argparse.ArgumentParser, default: Any, *, old: Optional[str] = None, when: str = "", **kwargs: Any
) -> None:
    """``--partition`` (and ``old`` as a deprecated alias, e.g. ``--scheme`` or ``--skew``);
    ``when`` says when the option applies (e.g. "used when the partition must be built")."""
    parser.add_argument(
        "--partition", default=default, help=f"{when}: {PARTITION_HELP}" if when else PARTITION_HELP, **kwargs
    )
    if old:
        add_deprecated(parser, old, "--partition", "partition", **kwargs)


def add_dataset(parser: argparse.ArgumentParser, *, when: str = "", **kwargs: Any) -> None:
    """``--dataset``, its choices and help derived from :data:`disdl_mpi.data.layout.DATASETS`."""
    names = ", ".join(f"{name} ({what})" if what else name for name, what in DATASETS.items())
    parser.add_argument(
        "--dataset", choices=tuple(DATASETS), help=f"{when}: {names}" if when else names, **kwargs
    )


def add_progress(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default=default,
        help="auto: a bar when a person watches (a terminal), plain lines in logs; none: quiet",
    )


def add_json(parser: argparse.ArgumentParser, help: str = "also write the results to this JSON file") -> None:
    parser.add_argument("--json", dest="json_path", metavar="FILE", default=None, help=help)


def spelling(ns: argparse.Namespace, dest: str, default: str) -> str:
    """The option string the user typed for ``dest`` (an alias, or ``default``)."""
    return getattr(ns, f"{dest}_spelling", None) or default
