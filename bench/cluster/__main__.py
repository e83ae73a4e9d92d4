"""``python -m bench.cluster up|exec|status|down|slurm``: see bench/cluster/__init__.py."""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.cluster import launch, netns, slurm
from bench.cluster.netns import ClusterError, ClusterState

DEFAULT_NAME = "disdl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description="An emulated multi-node cluster on one machine: "
        "network namespaces, shaped links, MPI over TCP.",
    )
    sub = p.add_subparsers(dest="verb", required=True)
    for verb in ("up", "exec", "status", "down", "slurm", "link"):
        s = sub.add_parser(verb)
        s.add_argument("--name", default=DEFAULT_NAME, help="cluster name (namespace prefix)")
        if verb == "up":
            s.add_argument("--nodes", type=int, required=True)
            s.add_argument(
                "--link", default="1gbit", help="each node's egress rate: 1gbit, 2500mbit, ..., none"
            )
            s.add_argument("--slurm", action="store_true", help="also start a SLURM (slurmctld in node 0)")
        if verb == "slurm":
            s.add_argument(
                "cmd",
                nargs=argparse.REMAINDER,
                help="-- a SLURM client command (sbatch, srun, sinfo, ...), run in "
                "node 0 with SLURM_CONF set",
            )
        if verb == "link":
            s.add_argument("--node", type=int, required=True, help="the node's index (0, 1, ...)")
            s.add_argument(
                "what", help="down, up, or a rate (4mbit, 1gbit, none): a fault on that node's link"
            )
        if verb == "exec":
            s.add_argument("-n", type=int, required=True, dest="ranks", help="MPI ranks")
            s.add_argument(
                "--ppn", type=int, default=None, help="ranks per node (default: spread evenly over the nodes)"
            )
            s.add_argument(
                "--mpi-default-algorithms",
                action="store_true",
                help="leave MPICH's own allreduce algorithm choice (no ring for "
                "large messages on non-power-of-two node counts)",
            )
            s.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    return p


def status_text(state: ClusterState) -> str:
    lines = [
        f"cluster {state.name}: {len(state.nodes)} node(s), link {state.link} per node "
        f"egress (tbf), bridge in namespace {state.switch}",
        f"{state.allreduce_selection}",
    ]
    if state.cores_shared:
        lines.append(
            f"note: {len(state.nodes)} nodes share fewer cores: each node is pinned to "
            f"one core round-robin, so nodes time-slice cores"
        )
    if slurm.running(state) is not None:
        lines.append(
            f"SLURM: slurmctld in {state.nodes[0].name}, slurmd in every node; "
            f"python -m bench.cluster slurm --name {state.name} -- sbatch ..."
        )
    for n in state.nodes:
        running = []
        for pid in netns.pids(n.name):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    running.append(fh.read().replace(b"\0", b" ").decode()[:60].strip())
            except OSError:
                pass
        lines.append(
            f"  {n.name}  {n.address}  cpus {','.join(map(str, n.cpus))}  "
            f"{len(running)} process(es)" + (f": {running[0]}" if running else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "up":
            state = netns.up(args.name, args.nodes, args.link)
            if args.slurm:
                try:
                    slurm.SlurmOnCluster(state).start()
                except BaseException:
                    netns.down(args.name)
                    raise
            print(status_text(state))
            return 0
        if args.verb == "down":
            netns.require_root()
            removed = netns.down(args.name)
            print(
                f"cluster {args.name}: "
                + ("removed " + ", ".join(removed) if removed else "nothing to remove")
            )
            return 0
        state = ClusterState.load(args.name)
        if state is None:
            raise ClusterError(
                f"no cluster named {args.name!r} is up; start one with: python -m "
                f"bench.cluster up --name {args.name} --nodes N --link 1gbit"
            )
        if args.verb == "status":
            print(status_text(state))
            return 0
        if args.verb == "link":
            print(netns.set_link(state, args.node, args.what))
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise ClusterError(f"{args.verb} needs a command after --")
        if args.verb == "slurm":
            s = slurm.running(state)
            if s is None:
                raise ClusterError(f"cluster {args.name} has no SLURM; start it with up --slurm")
            return subprocess.run(s.client(cmd), env=s.env()).returncode
        return launch.run(
            state, args.ranks, args.ppn, cmd, mpi_default_algorithms=args.mpi_default_algorithms
        )
    except ClusterError as exc:
        print(f"bench.cluster: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
