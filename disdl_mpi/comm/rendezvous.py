"""Where the ranks of a torch.distributed group (gloo, NCCL) meet: an address of rank 0 that every
rank can reach, found over MPI.

torch.distributed's TCP rendezvous needs one address for all ranks. Rank 0's hostname is the
usual choice and fails where names do not resolve on the other nodes (the emulated cluster's
namespaces, many container setups): the ranks then wait out the whole timeout. Here rank 0
listens on every interface, broadcasts its IPv4 addresses over MPI, every rank tries each one
with a short TCP connect, and the first address all ranks reached is used. ``MASTER_ADDR``
overrides the choice; when no address works the error names the addresses tried and that
variable.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from mpi4py import MPI

from disdl_mpi.errors import UserError

OVERRIDE = "MASTER_ADDR"
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def _interfaces() -> list[tuple[str, str]]:
    """(interface name, IPv4 address) of every interface that has one, loopback included."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on this interface
                continue
            found.append((name, socket.inet_ntoa(raw[20:24])))
    return found


def interface_addresses() -> list[str]:
    """This host's IPv4 addresses on interfaces other than loopback (in interface order)."""
    found: list[str] = []
    for _, addr in _interfaces():
        if not addr.startswith("127.") and addr not in found:
            found.append(addr)
    return found


def interface_towards(addr: str) -> str | None:
    """The name of this host's interface that traffic to ``addr`` leaves by (None if unknown).

    gloo and NCCL advertise their own address for the ranks' direct connections by resolving
    the hostname, which inside the emulated nodes gives loopback: the group's ranks then dial
    127.0.0.1. ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` set to this interface avoid that.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))  # a UDP connect sends nothing: it only picks the route
            local = s.getsockname()[0]
    except OSError:
        return None
    return next((name for name, a in _interfaces() if a == local), None)


def _reaches(addr: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def reachable_address(comm: MPI.Comm, *, one_node: bool, probe_timeout_s: float = 2.0) -> str:
    """Collective: an address of rank 0 that every rank of ``comm`` can open a TCP connection to.

    ``MASTER_ADDR`` when set (the user's word, not probed); 127.0.0.1 when all ranks share
    rank 0's node; else the first of rank 0's interface addresses, then its hostname, that
    every rank reached. Raises ``UserError`` on every rank when none did.
    """
    override = os.environ.get(OVERRIDE)
    if override or one_node:
        return override or "127.0.0.1"
    listener = None
    offer = None
    if comm.Get_rank() == 0:
        listener = socket.create_server(("", 0), backlog=max(128, comm.Get_size()))
        offer = ([*interface_addresses(), socket.gethostname()], listener.getsockname()[1])
    candidates, port = comm.bcast(offer, root=0)
    try:
        # A connect completes in the listener's backlog, so rank 0 need not accept.
        mine = [comm.Get_rank() == 0 or _reaches(a, port, probe_timeout_s) for a in candidates]
        reached = comm.allgather(mine)
    finally:
        if listener is not None:
            listener.close()
    for i, addr in enumerate(candidates):
        if all(r[i] for r in reached):
            return addr
    missing = {a: [r for r, ok in enumerate(reached) if not ok[i]] for i, a in enumerate(candidates)}
    raise UserError(
        "torch.distributed rendezvous: no address of rank 0 is reachable from every rank ("
        + "; ".join(f"{a}: not from rank(s) {','.join(map(str, rs))}" for a, rs in missing.items())
        + f"); set {OVERRIDE} to an address of rank 0's node that every rank can reach",
        collective=True,
    )
