"""Two ranks and a watchdog with short thresholds: ``python -m tests.mpi_programs.watchdog_check
SECONDS``. Rank 1 spends SECONDS in one local phase (a long evaluation) while rank 0 waits in a
Barrier. Its heartbeat keeps coming, so the watchdog must not call it lost: it reports at 1 s
and ends the job only past the stuck limit (6 s), with exit code 5."""

from __future__ import annotations

import sys
import time

from mpi4py import MPI

from disdl_mpi.comm.world import install_abort_handler
from disdl_mpi.reliability.watchdog import StallPolicy, StallWatchdog

comm = MPI.COMM_WORLD
install_abort_handler(comm)
busy = float(sys.argv[1])
dog = StallWatchdog(comm, StallPolicy(report_after=1.0, lost_after=2.0, stuck_after=6.0))
if comm.Get_rank() == 1:
    dog.enter(0, "eval")
    end = time.monotonic() + busy
    while time.monotonic() < end:  # pure Python: it holds the GIL but for the switch interval
        sum(range(1000))
else:
    dog.enter(0, "allreduce")
comm.Barrier()
dog.enter(1, "done")
comm.Barrier()
dog.close()
if comm.Get_rank() == 0:
    print("finished", flush=True)
