"""MPI jobs across the emulated nodes: ``python -m bench.cluster exec -n R [--ppn K] -- CMD``.

``mpiexec`` (Hydra, from the MPICH wheel) runs in the switch's namespace with the nodes'
addresses as its hosts and the cluster's ``nodeexec`` as its launcher, so each proxy starts in
its node. MPICH would still use shared memory between the namespaces (it sees one machine), so
the job runs with the ofi/tcp netmod and shared memory off: every byte between ranks crosses
the emulated links (and the shaping) over TCP.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from bench.cluster import selection
from bench.cluster.netns import ClusterError, ClusterState

# MPICH: traffic over TCP through the veths, no shared-memory shortcut between "nodes".
MPICH_TCP_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "MPIR_CVAR_NOLOCAL": "1"}


def mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        raise ClusterError("no mpiexec found (install the 'mpich' extra)")
    return found


def command(state: ClusterState, ranks: int, ppn: Optional[int], cmd: list[str]) -> list[str]:
    """The full command line of a job of ``ranks`` ranks, ``ppn`` per node."""
    if ranks < 1:
        raise ClusterError(f"-n must be at least 1, got {ranks}")
    ppn = ppn or math.ceil(ranks / len(state.nodes))
    if ppn * len(state.nodes) < ranks:
        raise ClusterError(
            f"-n {ranks} with --ppn {ppn} needs {math.ceil(ranks / ppn)} nodes; "
            f"cluster {state.name} has {len(state.nodes)}"
        )
    hosts = ",".join(n.address for n in state.nodes[: math.ceil(ranks / ppn)])
    # -iface br0: the proxies call back to mpiexec at the switch's address.
    return [
        "nsenter",
        f"--net=/run/netns/{state.switch}",
        mpiexec(),
        "-iface",
        "br0",
        "-hosts",
        hosts,
        "-launcher",
        "ssh",
        "-launcher-exec",
        str(state.node_exec),
        "-n",
        str(ranks),
        "-ppn",
        str(ppn),
        *cmd,
    ]


def job_env(state: ClusterState, *, mpi_default_algorithms: bool = False) -> dict[str, str]:
    """The environment of a job on the cluster: MPICH over TCP, the allreduce selection."""
    env = dict(os.environ)
    env.update(MPICH_TCP_ENV)
    env["DISDL_CLUSTER"] = state.name
    # Hydra started by a job inside a node (mpirun under SLURM): its proxies call back to the
    # node's eth0 address (node names do not resolve between the namespaces).
    env.setdefault("HYDRA_IFACE", "eth0")
    if state.selection_file.exists() and selection.ENV not in env and not mpi_default_algorithms:
        # Allreduce algorithm by message size (ring for large messages on 3, 5, ... nodes).
        env[selection.ENV] = str(state.selection_file)
        env["DISDL_ALLREDUCE_SELECTION"] = state.allreduce_selection
    return env


def run(
    state: ClusterState,
    ranks: int,
    ppn: Optional[int],
    cmd: list[str],
    *,
    mpi_default_algorithms: bool = False,
) -> int:
    """Run the job; forward SIGINT/SIGTERM to it; return its exit code."""
    env = job_env(state, mpi_default_algorithms=mpi_default_algorithms)
    proc = subprocess.Popen(command(state, ranks, ppn, cmd), env=env)

    def forward(signum, frame):  # noqa: ARG001 - Hydra passes it on to every rank
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
