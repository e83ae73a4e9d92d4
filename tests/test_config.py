"""The run configuration and the shared options: defaults, help text, and the checks that need
no MPI (config_errors, with each scheme's own constraints)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from disdl_mpi.config import RunConfig, build_parser, config_errors, parse_config
from disdl_mpi.data.layout import DATASETS, partition_dir
from disdl_mpi.options import DefaultsHelpFormatter, add_dataset, positive_int


def test_the_parser_defaults_are_the_dataclass_defaults():
    assert parse_config([], rank=0) == RunConfig()
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests == fields  # every option maps one-to-one to a field


def test_help_names_its_defaults_once_and_every_dataset_and_partition():
    text = build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 128)" in text  # --global-batch-size still shows its default
    assert "feature:KIND" in text
    for name in DATASETS:
        assert name in text


def test_the_default_data_folder_is_the_format_s_naming_rule():
    cfg = RunConfig(dataset="digits", partition="shards:2", seed=3)
    assert cfg.resolved_data_dir(4) == partition_dir("data", "digits", "shards:2", 4, 3)
    assert RunConfig(data_dir="/x").resolved_data_dir(4).as_posix() == "/x"


def test_config_errors_include_each_scheme_s_own_constraint():
    fp16 = RunConfig(norm="bn,bn-carry", compress="fp16")
    assert any("--norm bn-carry" in e and "--compress none" in e for e in config_errors(fp16, 2))
    # The same wire format is fine for schemes that have no such constraint.
    assert config_errors(RunConfig(norm="bn,gn", compress="fp16"), 2) == []
    errors = config_errors(RunConfig(norm="bogus", lr=0, global_batch_size=2), 4)
    assert any("unknown scheme 'bogus'" in e for e in errors)
    assert any("--lr must be positive" in e for e in errors)
    assert any("smaller than the 4 ranks" in e for e in errors)


def test_positive_int_and_the_dataset_option():
    assert positive_int("3") == 3
    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a positive integer"):
            positive_int(bad)
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    add_dataset(p, default="digits")
    assert p.parse_args([]).dataset == "digits"
    with pytest.raises(SystemExit):
        p.parse_args(["--dataset", "nope"])
