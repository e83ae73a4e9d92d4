"""Installing SLURM and munge from Debian's packages, slurm.conf, daemon pid files (slurm_cluster.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from bench.cluster.slurm import slurm_conf

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


TOOLS = ["slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "scancel"]


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a private SLURM (not root, no apt, install or start failed)."""


def _missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def ensure_installed(timeout: float = 240) -> None:
    """Install slurm + munge from apt when a tool is missing; raise SlurmUnavailable if we can't."""
    if not _missing_tools():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"slurm tools missing ({', '.join(_missing_tools())}) and not root, so they cannot be installed"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurm tools missing and no apt-get (not a Debian-like system)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise SlurmUnavailable(f"{' '.join(cmd)} timed out after {timeout} s") from exc
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed rc={proc.returncode}: {proc.stderr[-2000:]}")
    if _missing_tools():
        raise SlurmUnavailable(f"still missing after apt install: {_missing_tools()}")


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free right now (bound to 0, then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_munged(root: Path) -> Path | None:
    """Start a private munged (own socket/pid/log) as user munge; None if that isn't possible.

    Its files live in a fresh /tmp folder, not under ``root``: munged insists that every
    directory on the socket's path is traversable by all, which pytest's 0700 tmp dirs aren't.
    """
    if shutil.which("munged") is None or not Path("/etc/munge/munge.key").exists():
        return None
    try:
        import pwd

        pw = pwd.getpwnam("munge")
    except KeyError:
        return None
    mdir = Path(tempfile.mkdtemp(prefix="disdl-munge-"))
    (root / "munge").symlink_to(mdir)  # so logs and the pid file are found from root
    # munged refuses a socket dir others can't traverse or that it doesn't own.
    os.chmod(mdir, 0o755)
    os.chown(mdir, pw.pw_uid, pw.pw_gid)
    sock = mdir / "munge.sock"
    cmd = [
        "munged",
        f"--socket={sock}",
        f"--pid-file={mdir / 'munged.pid'}",
        f"--log-file={mdir / 'munged.log'}",
        f"--seed-file={mdir / 'munged.seed'}",
    ]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "munge", "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        shutil.rmtree(mdir, ignore_errors=True)
        (root / "munge").unlink()
        return None
    return sock


def _write_conf(root: Path, node: str, cpus: int, ports: list[int], munge_socket: Path | None) -> None:
    auth = None
    if munge_socket is not None:
        auth = f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={munge_socket},cred_expire=10\n"
    conf = slurm_conf(
        root,
        cluster="disdltest",
        ctld=(node, "127.0.0.1"),
        nodes=[(node, "127.0.0.1", cpus)],
        ports=(ports[0], ports[1]),
        auth=auth,
    )
    tmp = root / "slurm.conf.tmp"
    tmp.write_text(conf)
    os.replace(tmp, root / "slurm.conf")
