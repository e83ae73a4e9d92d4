"""An emulated multi-node cluster on one machine: ``python -m bench.cluster up|exec|status|down``.

Each node is a network namespace with its own hostname, joined to the others by a bridge in a
switch namespace; each node's egress is shaped to a chosen rate (tbf). MPI jobs run across the
nodes over real TCP (MPICH: the ofi/tcp netmod with shared memory switched off), one Hydra proxy
per node, each node pinned to its own share of the cores. Everything lives in namespaces the
tool creates, so no traffic leaves them; it needs root (CAP_NET_ADMIN) for that.
"""
