"""A real, private SLURM for testing the batch scripts in slurm/ (single node here; the
multi-node one runs on the emulated cluster, bench/cluster/slurm.py, driven by the same class).

``start_cluster(root)`` installs Debian's slurm packages when they are missing (root + apt only),
writes a slurm.conf under ``root``, starts munged, slurmctld and slurmd by hand (no systemd) on
free ports with private sockets, pid files and logs, and waits until the node is idle.
``SlurmCluster.stop()`` stops the daemons by their pids (TERM, then KILL).

Everything lives under ``root`` so nothing clashes with a site SLURM or another test session:
the daemons are found by ``SLURM_CONF`` only, which ``SlurmCluster.env()`` sets.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.mpi_helpers import ROOT
from tests.slurm_daemons import (
    SlurmUnavailable,
    _alive,
    _free_ports,
    _read_pid,
    _start_munged,
    _write_conf,
    ensure_installed,
)


@dataclass
class SlurmJob:
    """The result of one ``sbatch --wait`` submission."""

    job_id: int
    returncode: int
    output: str  # the job's stdout/stderr file contents
    submit_stdout: str
    submit_stderr: str
    state: str = ""  # JobState from scontrol, if the job was still known

    def describe(self) -> str:
        return (
            f"job {self.job_id} rc={self.returncode} state={self.state}\n"
            f"sbatch stderr:\n{self.submit_stderr[-2000:]}\n"
            f"job output:\n{self.output[-6000:]}"
        )


@dataclass
class PendingJob:
    """A job submitted with ``sbatch --wait`` whose sbatch process is still waiting."""

    cluster: "SlurmCluster"
    proc: subprocess.Popen
    job_id: int
    out_file: Path

    def output(self) -> str:
        return self.out_file.read_text(errors="replace") if self.out_file.exists() else ""

    def wait(self, timeout: float) -> SlurmJob:
        """Wait for the job to end; on timeout cancel it (a pending job can't outlive the test)."""
        try:
            stdout, stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cluster.run(["scancel", str(self.job_id)])
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(
                f"job {self.job_id} did not finish within {timeout} s; "
                f"output so far:\n{self.output()[-4000:]}\n"
                f"{self.cluster.logs()}"
            ) from None
        return SlurmJob(
            self.job_id,
            self.proc.returncode,
            self.output(),
            f"{self.job_id}\n{stdout}",
            stderr,
            self.cluster.job_state(self.job_id),
        )


@dataclass
class SlurmCluster:
    """A running private cluster; ``root`` holds its conf, state, logs and pid files."""

    root: Path
    node: str
    cpus: int
    partition: str = "debug"
    munge_socket: Path | None = None
    pid_files: list[Path] = field(default_factory=list)
    # prepended to every client command: empty here; nsenter into node 0 on the emulated cluster
    client_prefix: list[str] = field(default_factory=list)
    base_env: dict | None = None  # the environment to start from (default: os.environ)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, extra: dict | None = None) -> dict:
        """The environment for SLURM client commands (and, via --export=ALL, the jobs)."""
        env = dict(self.base_env if self.base_env is not None else os.environ)
        # Drop any outer SLURM job context so our sbatch/srun don't think they are nested.
        for key in list(env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
                del env[key]
        env["SLURM_CONF"] = str(self.conf)
        if extra:
            env.update(extra)
        return env

    def run(self, args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.client_prefix, *args], capture_output=True, text=True, env=self.env(), timeout=timeout
        )

    def logs(self) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                proc = self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=10)
                last = proc.stdout.strip() + proc.stderr.strip()
                if proc.returncode == 0 and last.startswith("idle"):
                    return
            except subprocess.TimeoutExpired:
                last = "sinfo timed out"
            time.sleep(0.3)
        raise SlurmUnavailable(f"node not idle after {timeout} s (sinfo: {last!r})\n{self.logs()}")

    def submit(
        self,
        script: Path | str,
        sbatch_args: list[str] | None = None,
        script_args: list[str] | None = None,
        *,
        env: dict | None = None,
        cwd: Path | str | None = None,
    ) -> "PendingJob":
        """Start ``sbatch --wait --parsable`` and return once SLURM has given the job id.

        The output file is ``<cwd>/slurm-<jobid>.out`` unless sbatch_args set ``-o``.
        """
        cwd = Path(cwd or self.root)
        out_pattern = str(cwd / "slurm-%j.out")
        args = [
            "sbatch",
            "--wait",
            "--parsable",
            "-o",
            out_pattern,
            *(sbatch_args or []),
            str(script),
            *(script_args or []),
        ]
        proc = subprocess.Popen(
            [*self.client_prefix, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(env),
            cwd=str(cwd),
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # sbatch prints the id before it starts waiting
        match = re.match(r"^(\d+)", first.strip())
        if not match:
            rest, err = proc.communicate(timeout=30)
            raise AssertionError(
                f"sbatch {script} gave no job id (rc={proc.returncode}): {first + rest!r} {err[-2000:]!r}"
            )
        return PendingJob(self, proc, int(match.group(1)), Path(out_pattern.replace("%j", match.group(1))))

    def sbatch(self, script: Path | str, *args: Any, timeout: float = 180, **kwargs: Any) -> SlurmJob:
        """:meth:`submit` (same arguments), then wait under a hard timeout; return job + output."""
        return self.submit(script, *args, **kwargs).wait(timeout)

    def run_batch(
        self, script: str, alloc: list[str], *, cwd: Path, timeout: float = 300, **env: str
    ) -> SlurmJob:
        """slurm/SCRIPT submitted with ALLOC and ``script_env(**env)``; waits under TIMEOUT."""
        return self.sbatch(ROOT / "slurm" / script, alloc, env=script_env(**env), cwd=cwd, timeout=timeout)

    def preempt_after_first_checkpoint(
        self, script: Path | str, sbatch_args: list[str], *, env: dict, cwd: Path, timeout: float
    ) -> tuple[SlurmJob, Path]:
        """Submit, wait for the run's first committed checkpoint, send the batch shell USR1
        (as ``--signal=B:USR1`` would near the time limit) and wait for the job to end;
        returns the job and its results folder."""
        import pytest

        pending = self.submit(script, sbatch_args, env=env, cwd=cwd)
        out_dir = Path(cwd) / "results" / str(pending.job_id)
        deadline = time.monotonic() + timeout
        while not list((out_dir / "checkpoints").glob("ckpt-*")):
            if pending.proc.poll() is not None or time.monotonic() > deadline:
                job = pending.wait(10)
                pytest.fail(f"no checkpoint appeared before the job ended\n{job.describe()}")
            time.sleep(0.2)
        sig = self.run(["scancel", "--signal=USR1", "--batch", str(pending.job_id)])
        assert sig.returncode == 0, sig.stderr
        return pending.wait(timeout), out_dir

    def job_state(self, job_id: int) -> str:
        """JobState from scontrol ('' once the job has aged out of slurmctld)."""
        show = self.run(["scontrol", "show", "job", str(job_id)])
        found = re.search(r"JobState=(\S+)", show.stdout)
        return found.group(1) if found else ""

    def _job_pids(self) -> list[int]:
        """Processes of this cluster's jobs: slurmstepd and the job's tasks inherit our
        SLURM_CONF (slurmd passes its environment on), which no other process has."""
        marker = f"SLURM_CONF={self.conf}\0".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self, grace: float = 5) -> None:
        """Cancel jobs, TERM every daemon by pid, then KILL what is alive after ``grace`` s.

        Job steps survive their slurmd, so leftovers (a test that timed out) are found by
        their SLURM_CONF and stopped the same way."""
        try:
            self.run(["scancel", "--full", f"--partition={self.partition}"], timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        pids = [p for p in (_read_pid(f) for f in self.pid_files) if p]
        pids += [p for p in self._job_pids() if p not in pids]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.munge_socket is not None:
            shutil.rmtree(self.munge_socket.parent, ignore_errors=True)


def start_cluster(root: Path | str) -> SlurmCluster:
    """Install if needed, configure and start a one-node cluster under ``root``; wait for idle."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("not root: slurmd must run as root to launch jobs")
    ensure_installed()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(exist_ok=True)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    sock = _start_munged(root)
    cluster = SlurmCluster(root=root, node=node, cpus=cpus, munge_socket=sock)
    if sock is not None:
        cluster.pid_files.append(root / "munge" / "munged.pid")
    _write_conf(root, node, cpus, _free_ports(2), sock)
    cluster.pid_files += [root / "slurmd.pid", root / "slurmctld.pid"]
    try:
        for cmd in (["slurmctld", "-f", str(cluster.conf)], ["slurmd", "-f", str(cluster.conf), "-N", node]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=cluster.env())
            if proc.returncode != 0:
                raise SlurmUnavailable(
                    f"{' '.join(cmd)} failed rc={proc.returncode}: {proc.stderr[-2000:]}\n{cluster.logs()}"
                )
        cluster.wait_idle()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def script_env(**extra: str) -> dict:
    """What every job of slurm/'s scripts needs in the tests: this venv, tiny CPU runs."""
    env = {
        "VENV": sys.prefix,
        "DATASET": "digits",
        "PARTITION": "iid",
        "NORMS": "gn",
        "MODEL": "mlp",
        "STEPS": "3",
        "EPOCHS": "1",
        "CPU_BIND": "",
    }
    env.update(extra)
    return env
