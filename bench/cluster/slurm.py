"""A real multi-node SLURM on the emulated cluster: one slurmctld, one slurmd per node.

``python -m bench.cluster up --nodes 2 --slurm`` starts it; ``down`` stops it with the rest.
slurmctld runs in node 0, each slurmd in its node (network namespace, hostname, cores) -- started
with ``nsenter``, not ``ip netns exec``, which remounts /sys and hides /sys/fs/cgroup from slurmd.
Client commands run inside node 0 with ``SLURM_CONF`` set: ``python -m bench.cluster slurm --
sbatch ...`` (or :meth:`SlurmOnCluster.client`). Jobs see the emulated network like ``exec``
jobs do (MPICH over TCP, the allreduce selection); the file system is shared, as on a cluster.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.cluster.launch import job_env
from bench.cluster.netns import ClusterError, ClusterState

CTLD_PORT, SLURMD_PORT = 6817, 6818  # every node is its own network namespace: no clash


def slurm_conf(
    root: Path,
    *,
    cluster: str,
    ctld: tuple[str, str],
    nodes: list[tuple[str, str, int]],
    ports: tuple[int, int],
    auth: Optional[str] = None,
    node_overrides: bool = False,
) -> str:
    """slurm.conf for a private test cluster with everything under ``root``.

    ``ctld`` is (hostname, address); ``nodes`` are (name, address, cpus). ``auth`` the Auth*
    lines (default auth/none + cred/none, which Slurm 22.05 still ships).
    """
    auth = auth or "AuthType=auth/none\nCredType=cred/none\nAuthInfo=cred_expire=10\n"
    # cred_expire=10: a requeued job may start again after 10 s instead of the default 120 s.
    # Job ids must not repeat across test clusters: MPICH names its shared-memory segments after
    # the PMI job/step id, and a segment an earlier killed job left in /dev/shm with the same id
    # would be attached again ("Message truncated" in MPI_Init).
    first_job_id = random.SystemRandom().randrange(10_000, 60_000_000)
    many = len(nodes) > 1
    spool = root / ("spool-%n" if many else "spool")
    lines = [
        "# Private test cluster written by bench/cluster/slurm.py",
        f"ClusterName={cluster}",
        f"SlurmctldHost={ctld[0]}({ctld[1]})",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        auth.rstrip("\n"),
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={spool}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / ('slurmd-%n.pid' if many else 'slurmd.pid')}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / ('slurmd-%n.log' if many else 'slurmd.log')}",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "MinJobAge=5",
        f"FirstJobId={first_job_id}",
        "KillWait=5",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=1",
    ]
    if node_overrides:
        # each emulated node has a share of the machine's cores: trust the config, not the probe
        lines.append("SlurmdParameters=config_overrides")
    lines += [f"NodeName={n} NodeAddr={a} CPUs={c} State=UNKNOWN" for n, a, c in nodes]
    lines.append(
        f"PartitionName=debug Nodes={','.join(n for n, _, _ in nodes)} Default=YES MaxTime=INFINITE State=UP"
    )
    return "\n".join(lines) + "\n"


@dataclass
class SlurmOnCluster:
    state: ClusterState

    @property
    def root(self) -> Path:
        return self.state.state_dir / "slurm"

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, extra: Optional[dict] = None) -> dict:
        """Client and job environment: SLURM_CONF, MPICH over TCP, no outer SLURM context."""
        env = {
            k: v
            for k, v in job_env(self.state).items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def in_node(self, index: int, cmd: list[str], *, hostname: bool = True) -> list[str]:
        """``cmd`` in node ``index``'s network namespace (and hostname, and cores)."""
        node = self.state.nodes[index]
        inner = ["taskset", "-c", ",".join(map(str, node.cpus)), *cmd]
        if hostname:
            inner = ["unshare", "--uts", "sh", "-c", f'hostname {node.name}; exec "$@"', "sh", *inner]
        return ["nsenter", f"--net=/run/netns/{node.name}", *inner]

    def client(self, cmd: list[str]) -> list[str]:
        """A SLURM client command as run from node 0 (the controller's node)."""
        return self.in_node(0, cmd)

    def run(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.client(cmd), capture_output=True, text=True, env=self.env(), timeout=timeout
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.root / "log").glob("*.log"))
        )

    def start(self, timeout: float = 60) -> "SlurmOnCluster":
        for tool in ("slurmctld", "slurmd", "sbatch", "sinfo"):
            if shutil.which(tool) is None:
                raise ClusterError(
                    f"--slurm needs '{tool}' (Debian: apt-get install slurmctld slurmd slurm-client)"
                )
        for sub in ("state", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        n0 = self.state.nodes[0]
        self.conf.write_text(
            slurm_conf(
                self.root,
                cluster=self.state.name.replace("-", ""),
                ctld=(n0.name, n0.address),
                nodes=[(n.name, n.address, len(n.cpus)) for n in self.state.nodes],
                ports=(CTLD_PORT, SLURMD_PORT),
                node_overrides=True,
            )
        )
        starts = [(0, ["slurmctld", "-f", str(self.conf)])]
        starts += [(n.index, ["slurmd", "-f", str(self.conf), "-N", n.name]) for n in self.state.nodes]
        for index, cmd in starts:
            proc = subprocess.run(
                self.in_node(index, cmd), capture_output=True, text=True, env=self.env(), timeout=30
            )
            if proc.returncode != 0:
                raise ClusterError(
                    f"{' '.join(cmd)} in node {index} failed: {proc.stderr[-1500:]}\n{self.logs()}"
                )
        self.wait_idle(timeout)
        return self

    def wait_idle(self, timeout: float) -> None:
        deadline, last = time.monotonic() + timeout, ""
        want = len(self.state.nodes)
        while time.monotonic() < deadline:
            proc = self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=10)
            states = proc.stdout.split()
            last = proc.stdout.strip() + proc.stderr.strip()
            if proc.returncode == 0 and states.count("idle") == want:
                return
            time.sleep(0.3)
        raise ClusterError(f"SLURM nodes not idle after {timeout:.0f} s (sinfo: {last!r})\n{self.logs()}")


def running(state: ClusterState) -> Optional[SlurmOnCluster]:
    """The cluster's SLURM, if ``up --slurm`` started one."""
    s = SlurmOnCluster(state)
    return s if s.conf.exists() else None
