"""Checkpoint files, validation and fallback, in one process (a 1-rank MPI world)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from mpi4py import MPI

from disdl_mpi.reliability.checkpoint import (
    MATTERS,
    Checkpointer,
    CheckpointError,
    model_parts,
    parse_every,
    restore_model,
    rng_state,
    set_rng_state,
)

CONFIG = {k: None for k in MATTERS} | {"lr": 0.05, "seed": 0, "norm": "bn"}


def _ckpt(root, **over):
    args = dict(config=CONFIG, world_size=1, manifest_sha256="a" * 64, norms=["bn"])
    args.update(over)
    return Checkpointer(root, MPI.COMM_WORLD, **args)


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(8, 4)).sum().backward()
    opt.step()
    return m, opt


def _save(ck, m, opt, step):
    shared, local = model_parts(m, opt)
    shared["position"] = {"scheme_index": 0, "norm": "bn", "epoch": 0, "batch": step, "step": step}
    local["rng"] = rng_state()
    return ck.save(shared, local, label=f"step {step}")


def test_parse_every():
    assert parse_every(None) is None
    assert parse_every("50") == ("steps", 50)
    assert parse_every("2e") == ("epochs", 2)
    for bad in ("0", "-3", "e", "2x", "1.5"):
        with pytest.raises(ValueError, match="checkpoint-every"):
            parse_every(bad)


def test_rng_roundtrip_continues_every_stream():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = rng_state()
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2] == got[2]


def test_save_commit_keep_and_restore(tmp_path):
    ck = _ckpt(tmp_path / "c")
    m, opt = _model()
    paths = [_save(ck, m, opt, s) for s in (1, 2, 3)]
    # only the newest KEEP=2 remain, no temp folders, every file listed in meta.json
    assert [p.name for p in ck.committed()] == ["ckpt-000003", "ckpt-000002"]
    assert not paths[0].exists() and not list((tmp_path / "c").glob(".tmp*"))
    m2, opt2 = _model()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)
    loaded = ck.load("auto", lambda s: None)
    assert loaded.path == paths[-1] and loaded.shared["position"]["step"] == 3
    restore_model(m2, opt2, loaded.shared, loaded.local)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    buf = next(iter(opt.state.values()))["momentum_buffer"]
    assert torch.equal(buf, next(iter(opt2.state.values()))["momentum_buffer"])


def test_corrupt_newest_falls_back_for_auto_and_fails_for_path(tmp_path):
    ck = _ckpt(tmp_path / "c")
    m, opt = _model()
    older, newest = _save(ck, m, opt, 1), _save(ck, m, opt, 2)
    part = newest / "rank_00000.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    notes = []
    loaded = ck.load("auto", notes.append)
    assert loaded.path == older
    assert any("corrupt" in n and "falling back" in n and "rank_00000.pt" in n for n in notes)
    with pytest.raises(CheckpointError, match=r"is corrupt.*rank_00000\.pt: rank 0 on [^:]+: sha256"):
        ck.load(str(newest), lambda s: None)
    # a half-written checkpoint (no commit rename) is never a candidate
    (tmp_path / "c" / ".tmp-ckpt-000009").mkdir()
    assert ck.load("auto", lambda s: None).path == older


def test_everything_corrupt_or_missing(tmp_path):
    ck = _ckpt(tmp_path / "c")
    notes = []
    assert ck.load("auto", notes.append) is None and "starting from scratch" in notes[0]
    m, opt = _model()
    p = _save(ck, m, opt, 1)
    (p / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="every checkpoint .* is corrupt"):
        ck.load("auto", lambda s: None)


def test_mismatch_names_each_difference(tmp_path):
    m, opt = _model()
    _save(_ckpt(tmp_path / "c"), m, opt, 1)
    other = _ckpt(tmp_path / "c", config=CONFIG | {"lr": 0.1}, world_size=1, manifest_sha256="b" * 64)
    with pytest.raises(CheckpointError) as err:
        other.load("auto", lambda s: None)
    text = str(err.value)
    assert "--lr: checkpoint 0.05, job 0.1" in text
    assert "partition: manifest sha256 aaaaaaaaaaaa" in text
    meta = {**_ckpt(tmp_path).identity, "world_size": 4}
    assert _ckpt(tmp_path).differences(meta) == ["world size: checkpoint 4, job 1"]
