"""Building and removing the emulated network: namespaces, veth pairs, a bridge, tbf shaping.

Layout of a cluster NAME with N nodes:

- namespace ``NAME-sw`` (the switch): a bridge ``br0`` (198.18.0.1, where ``mpiexec`` runs, so
  that every node, node 0 included, is remote to it) with one veth port ``p<i>`` per node;
- namespace ``NAME-n<i>`` (node i): ``lo`` and ``eth0`` = 198.18.0.(10+i)/24, its egress shaped
  by ``tbf`` to the link rate (``none``: unshaped);
- ``/run/disdl-cluster/NAME/``: ``state.json`` (what was created) and ``nodeexec`` (the script
  Hydra starts its proxies with: it enters the node's network namespace, gives the process the
  node's hostname in a private UTS namespace and pins it to the node's cores).

198.18.0.0/15 is the range reserved for network benchmarking (RFC 2544); the addresses exist
only inside the cluster's own namespaces.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from bench.cluster import selection

STATE_ROOT = Path(os.environ.get("DISDL_CLUSTER_STATE", "/run/disdl-cluster"))
SUBNET = "198.18.0"
SWITCH_ADDRESS = f"{SUBNET}.1"
# Jumbo frames, as on HPC Ethernet: headers cost ~0.7 % of the link instead of ~4.5 %.
MTU = 9000
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$")
# tbf bucket: small against the messages measured (an allreduce of >= 4 KiB moves whole
# 64 KiB GSO segments), so a message above and below it both see the link rate.
BURST_BYTES = 64 * 1024
LATENCY_MS = 100


class ClusterError(RuntimeError):
    """Something the user can fix: a name in use, no root, a bad rate."""


def rate_bits(rate: str) -> Optional[float]:
    """'1gbit' -> 1e9, '2500mbit' -> 2.5e9; 'none' -> None (unshaped)."""
    text = rate.strip().lower()
    if text == "none":
        return None
    m = RATE_RE.match(text)
    if not m:
        raise ClusterError(f"--link {rate!r}: expected a rate such as 1gbit, 2500mbit, 10gbit, or none")
    return float(m.group(1)) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


@dataclass
class Node:
    index: int
    name: str  # namespace and hostname
    address: str
    cpus: list[int]


@dataclass
class ClusterState:
    name: str
    link: str
    nodes: list[Node]
    cores_shared: bool
    created: float = field(default_factory=time.time)
    allreduce_selection: str = "MPICH default"  # what the jobs' MPI was told to choose

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def node_exec(self) -> Path:
        return self.state_dir / "nodeexec"

    @property
    def selection_file(self) -> Path:
        return self.state_dir / "coll_selection.json"

    def node(self, host: str) -> Node:
        for n in self.nodes:
            if host in (n.address, n.name):
                return n
        raise ClusterError(f"no node {host!r} in cluster {self.name}")

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.state_dir / "state.json")

    @classmethod
    def load(cls, name: str) -> Optional["ClusterState"]:
        try:
            raw = json.loads((STATE_ROOT / name / "state.json").read_text())
        except (OSError, ValueError):
            return None
        raw["nodes"] = [Node(**n) for n in raw["nodes"]]
        return cls(**raw)


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def namespaces(name: str) -> list[str]:
    """This cluster's namespaces that exist now (also after a crash left no state file)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [ns for ns in found if ns == f"{name}-sw" or re.fullmatch(rf"{re.escape(name)}-n\d+", ns)]


def require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError(
            "the emulated cluster needs root: creating network namespaces, veth "
            "pairs, a bridge and tc shaping needs CAP_NET_ADMIN (run as root, "
            "e.g. with sudo)"
        )
    for tool in ("ip", "tc", "nsenter", "unshare", "taskset"):
        if shutil.which(tool) is None:
            raise ClusterError(f"the emulated cluster needs '{tool}' (iproute2 / util-linux)")


def plan_cpus(nodes: int, cores: list[int]) -> tuple[list[list[int]], bool]:
    """Each node's cores: disjoint shares when there are enough, else shared round-robin."""
    if nodes <= len(cores):
        per = len(cores) // nodes
        return [cores[i * per : (i + 1) * per] for i in range(nodes)], False
    return [[cores[i % len(cores)]] for i in range(nodes)], True


NODE_EXEC = """#!/bin/sh
# Hydra's launcher for cluster {name}: nodeexec [options] HOST COMMAND...
# Enters HOST's network namespace, names the process after the node (private UTS namespace)
# and pins it to the node's cores. Written by python -m bench.cluster up.
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case "$host" in
{cases}
  *) echo "nodeexec: no node $host in cluster {name}" >&2; exit 2;;
esac
exec nsenter --net=/run/netns/"$ns" unshare --uts taskset -c "$cpus" sh -c "hostname $node; exec $*"
"""


def up(name: str, nodes: int, link: str) -> ClusterState:
    """Create the cluster; refuse when one of that name exists."""
    require_root()
    if nodes < 1 or nodes > 200:
        raise ClusterError(f"--nodes must be 1..200, got {nodes}")
    rate_bits(link)
    existing = namespaces(name)
    if existing or ClusterState.load(name) is not None:
        raise ClusterError(
            f"a cluster named {name!r} is already up ({len(existing)} "
            f"namespace(s)); remove it first with: python -m bench.cluster down "
            f"--name {name}"
        )
    cpus, shared = plan_cpus(nodes, sorted(os.sched_getaffinity(0)))
    state = ClusterState(
        name, link, [Node(i, f"{name}-n{i}", f"{SUBNET}.{10 + i}", cpus[i]) for i in range(nodes)], shared
    )
    state.save()  # first, so that down finds what a failed up created
    try:
        sw = state.switch
        _run("ip", "netns", "add", sw)
        _run("ip", "-n", sw, "link", "set", "lo", "up")
        _run("ip", "-n", sw, "link", "add", "br0", "mtu", str(MTU), "type", "bridge")
        _run("ip", "-n", sw, "addr", "add", f"{SWITCH_ADDRESS}/24", "dev", "br0")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for n in state.nodes:
            _run("ip", "netns", "add", n.name)
            # the names have no spaces: each command reads as typed
            _run(
                *f"ip link add eth0 netns {n.name} mtu {MTU} "
                f"type veth peer name p{n.index} netns {sw} mtu {MTU}".split()
            )
            _run("ip", "-n", n.name, "addr", "add", f"{n.address}/24", "dev", "eth0")
            _run("ip", "-n", n.name, "link", "set", "lo", "up")
            _run("ip", "-n", n.name, "link", "set", "eth0", "up")
            _run("ip", "-n", sw, "link", "set", f"p{n.index}", "master", "br0")
            _run("ip", "-n", sw, "link", "set", f"p{n.index}", "up")
            bits = rate_bits(link)
            if bits is not None:
                _run(
                    *f"tc -n {n.name} qdisc add dev eth0 root tbf rate {int(bits)}bit burst {BURST_BYTES} "
                    f"latency {LATENCY_MS}ms".split()
                )
        cases = "\n".join(
            f"  {n.address}|{n.name}) ns={n.name}; node={n.name}; cpus={','.join(map(str, n.cpus))};;"
            for n in state.nodes
        )
        state.node_exec.write_text(NODE_EXEC.format(name=name, cases=cases))
        state.node_exec.chmod(0o755)
        if selection.write(state.selection_file, selection.mpich_library()) is not None:
            state.allreduce_selection = selection.describe()
        state.save()
    except BaseException:
        down(name)
        raise
    return state


def set_link(state: ClusterState, index: int, what: str) -> str:
    """A fault on node ``index``'s link: ``down`` (eth0 down, routes gone), ``up`` (back, at
    the rate it had), or a rate (``4mbit``: its tbf re-rated; the cluster keeps its nominal
    rate in state.json). Returns what was done."""
    require_root()
    if not 0 <= index < len(state.nodes):
        raise ClusterError(f"--node {index}: cluster {state.name} has nodes 0..{len(state.nodes) - 1}")
    n = state.nodes[index]
    if what in ("down", "up"):
        _run("ip", "-n", n.name, "link", "set", "eth0", what)
        return f"{n.name}: eth0 {what}"
    bits = rate_bits(what)
    if bits is None:
        _run(*f"tc -n {n.name} qdisc del dev eth0 root".split())
        return f"{n.name}: eth0 unshaped"
    verb = "change" if rate_bits(state.link) is not None else "add"
    _run(
        *f"tc -n {n.name} qdisc {verb} dev eth0 root tbf rate {int(bits)}bit burst {BURST_BYTES} "
        f"latency {LATENCY_MS}ms".split()
    )
    return f"{n.name}: eth0 shaped to {what}"


def pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def down(name: str) -> list[str]:
    """Stop every process in the cluster's namespaces and remove all it created; idempotent.
    Returns what was removed."""
    removed = []
    spaces = namespaces(name)
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        victims = [p for ns in spaces for p in pids(ns)]
        for p in victims:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while victims and time.monotonic() < end:
            victims = [p for ns in spaces for p in pids(ns)]
            time.sleep(0.1)
        if not victims:
            break
    for ns in spaces:  # deleting a namespace removes its veth ends and the bridge with it
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        removed.append(f"namespace {ns}")
    state_dir = STATE_ROOT / name
    if state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)
        removed.append(f"state {state_dir}")
    return removed
