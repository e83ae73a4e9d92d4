"""Every rank loads its partition (argv[1]) and reports what it loaded, in rank order."""

import sys

from disdl_mpi.comm.world import install_abort_handler, world
from disdl_mpi.data.partition_io import load_partition
from tests.partition_helpers import content_sha256

comm = world()
install_abort_handler(comm)
d = load_partition(comm, sys.argv[1])
# Test output only: every rank reports what it loaded so the test can check each one. Ranks
# take turns and write each line in one call, so the launcher never interleaves two lines.
line = (
    f"LOADED rank={comm.Get_rank()} sha={content_sha256(d.train.x, d.train.y)} "
    f"sizes={d.sizes} test={len(d.test.y)} shape={d.sample_shape} "
    f"manifest={d.manifest_sha256}\n"
)
for turn in range(comm.Get_size()):
    if turn == comm.Get_rank():
        sys.stdout.write(line)
        sys.stdout.flush()
    comm.Barrier()
