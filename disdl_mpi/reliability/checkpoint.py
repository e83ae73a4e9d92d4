"""Collective checkpoints that a run resumes from bit for bit.

Layout of ``OUT/checkpoints/ckpt-NNNNNN/`` (NNNNNN grows by one per checkpoint):

- ``shared.pt`` (rank 0): model and optimizer state (identical on every rank for everything
  that is averaged), the scheme being trained and its position, the results of the schemes
  already finished, the job's metadata;
- ``rank_RRRRR.pt`` (every rank): what differs between ranks: the state of the normalization
  layers (running statistics of local BN, FedBN's own affine parameters and their momentum),
  the torch/numpy/python RNG states, the partial epoch loss;
- ``meta.json`` (rank 0, written last): config fields that matter, world size, partition
  manifest hash, and the sha256 and size of every file above.

Commit protocol: rank 0 makes ``.tmp-ckpt-NNNNNN/``, every rank writes and fsyncs its part and
sends its sha256 to rank 0, which writes shared.pt and meta.json and then renames the folder
to ``ckpt-NNNNNN`` (one atomic rename). A folder without that name or whose files do not match
meta.json's hashes is never used. The last ``KEEP`` committed checkpoints are kept.

Corruption policy: ``--resume PATH`` with a corrupt checkpoint is an error (exit code 2, no
training). ``--resume auto`` tries the newest committed checkpoint and, if it is corrupt, falls
back to the previous one and says so; with none usable it starts from scratch and says so. A
checkpoint from another configuration, world size or partition is always refused with a
message naming the difference (an older one would be just as incompatible).

Multi-node: ``OUT`` must be on a file system every rank sees (rank 0 commits the others' files).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from mpi4py import MPI

from disdl_mpi.comm.world import where
from disdl_mpi.errors import UserError
from disdl_mpi.files import write_bytes, write_json
from disdl_mpi.norms import norm_layers

FORMAT = 1
KEEP = 2
DIR_RE = re.compile(r"^ckpt-(\d{6,})$")
# Config fields that change what is computed: a checkpoint made with other values is refused.
# (bucket_mb/overlap/threads/out/progress/timeline do not change the mathematics; data_dir,
# dataset and partition are covered by the partition manifest's hash.)
MATTERS = (
    "norm",
    "model",
    "gn_groups",
    "epochs",
    "steps",
    "global_batch_size",
    "batching",
    "lr",
    "lr_schedule",
    "warmup_epochs",
    "fix_at",
    "momentum",
    "weight_decay",
    "seed",
    "compress",
    "eval_every",
)


class CheckpointError(UserError):
    """An unusable checkpoint; raised on every rank together."""

    def __init__(self, message: str):
        super().__init__(message, collective=True, exit_code=2)


def parse_every(text: Optional[str]) -> Optional[tuple[str, int]]:
    """``"50"`` -> ("steps", 50), ``"2e"`` -> ("epochs", 2), None -> None; ValueError if bad."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([eE]?)\s*", str(text))
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"--checkpoint-every must be N (steps) or Ne (epochs) with N > 0, got {text!r}")
    return ("epochs" if m.group(2) else "steps"), int(m.group(1))


# ------------------------------------------------------------------ state capture
def rng_state() -> dict:
    """Every RNG the run may draw from, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, t, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((v, t.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _norm_keys_and_params(model: torch.nn.Module) -> tuple[set[str], set[int]]:
    """state_dict keys and parameter positions that belong to normalization layers."""
    keys: set[str] = set()
    ids: set[int] = set()
    for name, m in norm_layers(model):
        prefix = f"{name}." if name else ""
        keys.update(prefix + k for k in m.state_dict(keep_vars=True))
        ids.update(id(p) for p in m.parameters(recurse=False))
    positions = {i for i, p in enumerate(model.parameters()) if id(p) in ids}
    return keys, positions


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def model_parts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(shared, local): the full states, and this rank's normalization-layer slice of them."""
    keys, positions = _norm_keys_and_params(model)
    sd = _cpu(model.state_dict())
    opt = _cpu(optimizer.state_dict())
    local = {
        "norm_state": {k: sd[k] for k in keys},
        "norm_opt": {i: opt["state"][i] for i in positions if i in opt["state"]},
    }
    return {"model": sd, "optimizer": opt}, local


def restore_model(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, shared: dict, local: dict
) -> None:
    """Load rank 0's states, then overwrite this rank's own normalization slice."""
    sd = dict(shared["model"])
    sd.update(local["norm_state"])
    model.load_state_dict(sd)
    opt = shared["optimizer"]
    state = dict(opt["state"])
    state.update({int(i): v for i, v in local["norm_opt"].items()})
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})


# ------------------------------------------------------------------ files
def _serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rank_part(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


@dataclass
class Loaded:
    """A validated checkpoint as seen by one rank."""

    path: Path
    meta: dict
    shared: dict
    local: dict


class Checkpointer:
    """Writes and finds the checkpoints of one run (all methods are collective)."""

    def __init__(
        self,
        root: Path,
        comm: MPI.Comm,
        *,
        config: dict,
        world_size: int,
        manifest_sha256: str,
        norms: list[str],
    ) -> None:
        self.root = Path(root)
        self.comm = comm
        self.rank = comm.Get_rank()
        self.identity = {
            "format": FORMAT,
            "world_size": int(world_size),
            "manifest_sha256": manifest_sha256,
            "config": {k: config.get(k) for k in MATTERS},
            "norms": list(norms),
        }

    # ---------------------------------------------------------------- finding
    def committed(self) -> list[Path]:
        """Committed checkpoint folders, newest first (seen by this rank)."""
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := DIR_RE.match(p.name)) and p.is_dir()
        ]
        return [p for _, p in sorted(found, reverse=True)]

    # ---------------------------------------------------------------- writing
    def save(self, shared: dict, local: dict, *, label: str) -> Path:
        """Collective: commit one checkpoint; returns its folder on every rank."""
        comm, rank = self.comm, self.rank
        error, tmp = None, None
        if rank == 0:
            try:
                newest = self.committed()
                seq = int(DIR_RE.match(newest[0].name).group(1)) + 1 if newest else 1
                tmp = self.root / f".tmp-ckpt-{seq:06d}"
                shutil.rmtree(tmp, ignore_errors=True)  # debris of a job killed mid-write
                tmp.mkdir(parents=True)
            except OSError as exc:
                error = f"cannot create checkpoint folder under {self.root}: {exc}"
        error, tmp = comm.bcast((error, tmp), root=0)
        if error:
            raise CheckpointError(error)
        entry, error = None, None
        try:
            data = _serialize(local)
            write_bytes(tmp / rank_part(rank), data, fsync=True)
            entry = {"sha256": _digest(data), "bytes": len(data)}
        except OSError as exc:
            error = f"{where(rank)}: cannot write {tmp / rank_part(rank)}: {exc}"
        gathered = comm.gather((entry, error), root=0)
        final, error = None, None
        if rank == 0:
            errors = [e for _, e in gathered if e]
            if errors:
                error = "checkpoint not written: " + "; ".join(errors)
            else:
                try:
                    data = _serialize(shared)
                    write_bytes(tmp / "shared.pt", data, fsync=True)
                    files = {"shared.pt": {"sha256": _digest(data), "bytes": len(data)}}
                    files.update({rank_part(r): e for r, (e, _) in enumerate(gathered)})
                    write_json(
                        tmp / "meta.json",
                        {**self.identity, "label": label, "position": shared.get("position"), "files": files},
                    )
                    final = self.root / tmp.name[len(".tmp-") :]
                    os.replace(tmp, final)  # the commit
                    self._prune()
                except OSError as exc:
                    error = f"checkpoint not written: {exc}"
            if error:
                # A full disk (or any write error) leaves no half-written checkpoint behind.
                shutil.rmtree(tmp, ignore_errors=True)
                error = (
                    f"{error} (checkpoint folder {self.root}; the partial "
                    f"{tmp.name} was removed; the last committed checkpoint, if any, is "
                    f"intact)"
                )
        error, final = comm.bcast((error, final), root=0)
        if error:
            raise CheckpointError(error)
        return final

    def _prune(self) -> None:
        for old in self.committed()[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------- reading
    def _check_one(self, path: Path) -> tuple[Optional[str], Optional[str], Optional[Loaded]]:
        """(corruption, incompatibility, loaded) for this rank; at most one problem is set."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            files = meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{path / 'meta.json'}: unreadable or incomplete ({exc})", None, None
        diff = self.differences(meta)
        if diff:
            return None, f"checkpoint {path} does not match this job: " + "; ".join(diff), None
        parts = {}
        for name in ("shared.pt", rank_part(self.rank)):
            f = path / name
            try:
                data = f.read_bytes()
            except OSError as exc:
                return f"{f}: {where(self.rank)}: cannot be read ({exc})", None, None
            want = files.get(name, {}).get("sha256")
            if _digest(data) != want:
                return (
                    f"{f}: {where(self.rank)}: sha256 differs from meta.json (truncated or modified)",
                    None,
                    None,
                )
            try:
                parts[name] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is corruption
                return f"{f}: {where(self.rank)}: cannot be loaded ({exc})", None, None
        return None, None, Loaded(path, meta, parts["shared.pt"], parts[rank_part(self.rank)])

    def differences(self, meta: dict) -> list[str]:
        """Human-readable differences between a checkpoint's identity and this job's."""
        out = []
        mine = self.identity
        if meta.get("format") != mine["format"]:
            out.append(f"format {meta.get('format')} (this version reads {mine['format']})")
        if meta.get("world_size") != mine["world_size"]:
            out.append(f"world size: checkpoint {meta.get('world_size')}, job {mine['world_size']}")
        if meta.get("manifest_sha256") != mine["manifest_sha256"]:
            out.append(
                f"partition: manifest sha256 {str(meta.get('manifest_sha256'))[:12]}... "
                f"in the checkpoint, {mine['manifest_sha256'][:12]}... here "
                f"(another --data-dir or a rebuilt partition)"
            )
        if meta.get("norms") != mine["norms"]:
            out.append(f"schemes: checkpoint {meta.get('norms')}, job {mine['norms']}")
        theirs = meta.get("config") or {}
        for k in MATTERS:
            if theirs.get(k) != mine["config"].get(k):
                out.append(
                    f"--{k.replace('_', '-')}: checkpoint {theirs.get(k)!r}, job {mine['config'].get(k)!r}"
                )
        return out

    def load(self, spec: str, log: Callable[[str], None]) -> Optional[Loaded]:
        """Collective: the checkpoint to resume from (``spec`` = 'auto' or a folder).

        Every rank validates its own part; all ranks take the same decision. Returns None
        for 'auto' when there is nothing usable (the run starts from scratch).
        """
        comm = self.comm
        if spec == "auto":
            candidates = comm.bcast(self.committed() if self.rank == 0 else None, root=0)
            if not candidates:
                log(f"resume auto: no checkpoint in {self.root}, starting from scratch")
                return None
        else:
            path = Path(spec)
            if not comm.bcast(path.exists() if self.rank == 0 else None, root=0):
                raise CheckpointError(f"--resume {spec}: {path} does not exist (no checkpoint there)")
            if path.is_dir() and not (path / "meta.json").exists() and path.name != "":
                inner = comm.bcast(
                    Checkpointer(
                        path, comm, config={}, world_size=0, manifest_sha256="", norms=[]
                    ).committed()
                    if self.rank == 0
                    else None,
                    root=0,
                )
                path = inner[0] if inner else path  # a checkpoints/ folder: its newest
            candidates = [path]
        skipped: list[str] = []
        for path in candidates:
            corrupt, mismatch, loaded = self._check_one(path)
            reports = comm.allgather((corrupt, mismatch))
            mismatches = sorted({m for _, m in reports if m})
            if mismatches:
                raise CheckpointError(
                    "\n".join(mismatches) + "\n(start a fresh --out, or "
                    "drop --resume, to train with the new settings)"
                )
            corrupts = [c for c, _ in reports if c]
            if not corrupts:
                for note in skipped:
                    log(note)
                return loaded
            why = "; ".join(corrupts)
            if spec != "auto":
                raise CheckpointError(f"checkpoint {path} is corrupt: {why}")
            skipped.append(
                f"resume auto: checkpoint {path} is corrupt ({why}); falling back to the previous one"
            )
        for note in skipped:
            log(note)
        raise CheckpointError(
            f"resume auto: every checkpoint in {self.root} is corrupt; "
            f"remove them (or drop --resume) to start from scratch"
        )
