"""Where torch.distributed's ranks meet: an address of rank 0 that every rank reached."""

from __future__ import annotations

import pytest
from mpi4py import MPI

from disdl_mpi.comm import rendezvous
from tests.mpi_helpers import run_mpi


def test_the_interface_addresses_leave_out_loopback():
    addrs = rendezvous.interface_addresses()
    assert all(a.count(".") == 3 and not a.startswith("127.") for a in addrs), addrs


def test_the_interface_towards_an_own_address_is_the_one_holding_it():
    assert rendezvous.interface_towards("127.0.0.1") == "lo"
    for addr in rendezvous.interface_addresses():
        assert rendezvous.interface_towards(addr) in {
            name for name, a in rendezvous._interfaces() if a == addr
        }


def test_one_node_meets_on_loopback_and_master_addr_overrides(monkeypatch):
    monkeypatch.delenv(rendezvous.OVERRIDE, raising=False)
    assert rendezvous.reachable_address(MPI.COMM_SELF, one_node=True) == "127.0.0.1"
    monkeypatch.setenv(rendezvous.OVERRIDE, "198.18.0.10")
    assert rendezvous.reachable_address(MPI.COMM_SELF, one_node=False) == "198.18.0.10"


PROBE = """
import sys
from mpi4py import MPI
from disdl_mpi.comm import rendezvous
from disdl_mpi.errors import UserError
comm = MPI.COMM_WORLD
if sys.argv[1] == "blocked" and comm.Get_rank() == 1:
    rendezvous._reaches = lambda *a: False  # rank 1 reaches nothing: a firewalled node
try:
    said = "ADDR " + rendezvous.reachable_address(comm, one_node=False)
except UserError as exc:
    said = f"ERROR {exc}"
every = comm.gather(said)  # one printer: the launcher never interleaves two ranks' lines
if comm.Get_rank() == 0:
    print("\\n".join(f"{r} {line}" for r, line in enumerate(every)), flush=True)
"""


@pytest.mark.mpi
def test_two_ranks_agree_on_an_address_both_reached():
    proc = run_mpi(2, ["-c", PROBE, "open"], timeout=60, check=True)
    found = [line.split() for line in proc.stdout.splitlines() if " ADDR " in line]
    assert [f[0] for f in found] == ["0", "1"] and found[0][2] == found[1][2], proc.stdout


@pytest.mark.mpi
def test_an_address_no_rank_can_reach_is_named_on_every_rank_with_the_override():
    proc = run_mpi(2, ["-c", PROBE, "blocked"], timeout=60, check=True)
    errors = [line for line in proc.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 2, proc.stdout
    assert all("not from rank(s) 1" in e and "set MASTER_ADDR" in e for e in errors)
