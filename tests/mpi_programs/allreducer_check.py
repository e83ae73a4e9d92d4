"""Driver run under ``mpiexec -n N``: the allreducer gives the single-process gradient.

Every rank builds the same data from one seed, takes its own unequal slice (the last rank of
three gets an EMPTY batch), and compares the reduced gradients with the gradient one process
computes on the union of the slices. Any failed assertion aborts the whole job (rc != 0).
Usage: mpiexec -n N python -m tests.mpi_programs.allreducer_check [scenario ...]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.comm.world import install_abort_handler


class Net(nn.Module):
    """Conv + linear layers, a frozen tensor, a parameter used only on some ranks/steps, and a
    never-used one registered in the middle (it blocks its bucket until finish_step)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.never_used = nn.Parameter(torch.randn(5))
        self.norm = nn.GroupNorm(2, 4)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.frozen = nn.Parameter(torch.randn(16), requires_grad=False)
        self.extra = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = F.relu(self.norm(self.conv(x))).flatten(1)
        h = F.relu(self.fc1(h)) + self.frozen
        if use_extra:
            h = h + self.extra(h)
        return self.fc2(h)


def slices(n_ranks: int) -> list[tuple[int, int]]:
    """Unequal per-rank batches; with 3+ ranks the last one is empty."""
    sizes = [3 + 2 * r for r in range(n_ranks)]
    if n_ranks >= 3:
        sizes[-1] = 0
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def make(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def use_extra(rank: int, step: int) -> bool:
    return (rank + step) % 2 == 0  # differs between ranks and between steps


def reference_grads(model: Net, x, y, parts, step: int):
    """Single process: sum over ranks of (n_r/N) * grad(mean loss on rank r's batch).

    Also returns the largest |summand| per tensor: the scale rounding errors on the wire
    (fp16) are relative to, since the summands may cancel in the sum.
    """
    total = sum(b - a for a, b in parts)
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    mags = {n: 0.0 for n in grads}
    for r, (a, b) in enumerate(parts):
        if b == a:
            continue
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[a:b], use_extra(r, step)), y[a:b]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] += p.grad * ((b - a) / total)
                mags[n] = max(mags[n], float(p.grad.abs().max()) * (b - a) / total)
    return grads, mags


def compare_grads(model: nn.Module, ref: dict, mags: dict, tol: float, where: str, skip_norm: bool) -> None:
    """Every averaged gradient equals the reference within ``tol`` of its scale."""
    for n, p in model.named_parameters():
        if n == "frozen":
            assert p.grad is None, "frozen parameter got a gradient"
            continue
        if skip_norm and n.startswith("norm."):
            continue  # local parameter: not averaged, checked by the caller
        assert p.grad is not None, f"{n}: no gradient written back"
        err = float((p.grad - ref[n]).abs().max())
        scale = max(float(ref[n].abs().max()), mags[n]) or 1.0
        assert err <= tol * scale + 1e-7, f"{where} {n}: max err {err:.3g} (scale {scale:.3g})"


def check(scenario: str, comm: MPI.Comm) -> None:
    rank, size = comm.Get_rank(), comm.Get_size()
    opts = {
        "overlap": dict(overlap=True, bucket_mb=0.001),
        "no-overlap": dict(overlap=False, bucket_mb=0.001),
        "per-tensor": dict(overlap=True, bucket_mb=0),
        "one-bucket": dict(overlap=True, bucket_mb=64),
        "fp16": dict(overlap=True, bucket_mb=0.001, compress="fp16"),
        "skip": dict(overlap=True, bucket_mb=0.001, skip=lambda n, p: n.startswith("norm.")),
    }[scenario]
    tol = 3e-3 if scenario == "fp16" else 1e-5
    parts = slices(size)
    n_total = parts[-1][1]
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(n_total, 2, 6, 6, generator=gen)
    y = torch.randint(0, 3, (n_total,), generator=gen)
    model, ref_model = make(7), make(7)
    reducer = GradientAllreducer(model, comm, **opts)
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [names[id(p)] for b in reducer.buckets for p in b.params]
    assert "frozen" not in flat, flat
    if scenario == "skip":
        assert not any(n.startswith("norm.") for n in flat), flat
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    a, b = parts[rank]
    for step in range(3):
        # Alternate zero_grad styles: set_to_none replaces the bucket views, which
        # begin_step must re-attach.
        opt.zero_grad(set_to_none=(step == 1))
        reducer.begin_step((b - a) / n_total)
        if b > a:  # the empty rank runs no forward/backward at all
            F.cross_entropy(model(x[a:b], use_extra(rank, step)), y[a:b]).backward()
        stats = reducer.finish_step()
        assert stats["total_s"] >= 0 and 0 <= stats["exposed_s"], stats
        assert len(reducer.events) == len(reducer.buckets), reducer.events
        ref, mags = reference_grads(ref_model, x, y, parts, step)
        compare_grads(model, ref, mags, tol, f"[{scenario}] rank {rank} step {step}", scenario == "skip")
        assert float(model.never_used.grad.abs().max()) == 0.0
        if scenario == "skip":
            # Make the reference's norm grads those of this rank's local mean loss.
            ref_model.zero_grad(set_to_none=True)
            if b > a:
                F.cross_entropy(ref_model(x[a:b], use_extra(rank, step)), y[a:b]).backward()
            for n, p in model.named_parameters():
                if n.startswith("norm."):
                    want = dict(ref_model.named_parameters())[n].grad
                    got = p.grad
                    if want is None:
                        assert got is None or float(got.abs().max()) == 0.0
                    else:
                        assert torch.allclose(got, want, atol=1e-6), f"local grad {n} changed"
            break  # after one step the ranks' local norm params differ: no shared reference
        else:
            for n, rp in ref_model.named_parameters():
                rp.grad = ref[n] if rp.requires_grad else None
        opt.step()
        ref_opt.step()
        if scenario == "fp16":
            # fp16 rounding moves the trajectories apart; compare each step from one point.
            ref_model.load_state_dict(model.state_dict())
    for (n, p), rp in zip(model.named_parameters(), ref_model.parameters()):
        if scenario == "skip":
            break
        err = float((p.detach() - rp.detach()).abs().max())
        assert err <= 1e-4, f"[{scenario}] parameter {n} diverged by {err:.3g}"
    reducer.close()
    comm.Barrier()
    if rank == 0:
        print(f"OK {scenario} ranks={size} buckets={len(reducer.buckets)}", flush=True)


def main(argv: list[str]) -> None:
    comm = MPI.COMM_WORLD
    install_abort_handler(comm)
    torch.set_num_threads(1)
    for scenario in argv or ["overlap", "no-overlap", "per-tensor", "one-bucket", "fp16", "skip"]:
        check(scenario, comm)


if __name__ == "__main__":
    main(sys.argv[1:])
