"""Where torch.distributed's ranks meet: an address of rank 0 that every rank reached."""

from __future__ import annotations

import pytest
from mpi4py import MPI

from disdl_mpi.comm import rendezvous
from tests.mpi_helpers import run_mpi


def test_the_interface_addresses_leave_out_loopback():
    addrs = rendezvous.interface_addresses()
    assert all(a.count(".") == 3 and not a.startswith("127.") for a in addrs), addrs


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
    print("ADDR", comm.Get_rank(), rendezvous.reachable_address(comm, one_node=False), flush=True)
except UserError as exc:
    print("ERROR", comm.Get_rank(), exc, flush=True)
"""


@pytest.mark.mpi
def test_two_ranks_agree_on_an_address_both_reached():
    proc = run_mpi(2, ["-c", PROBE, "open"], timeout=60, check=True)
    found = sorted(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("ADDR"))
    assert [r for r, _ in found] == ["0", "1"] and found[0][1] == found[1][1]


@pytest.mark.mpi
def test_an_address_no_rank_can_reach_is_named_on_every_rank_with_the_override():
    proc = run_mpi(2, ["-c", PROBE, "blocked"], timeout=60, check=True)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, proc.stdout
    assert all("not from rank(s) 1" in e and "set MASTER_ADDR" in e for e in errors)
