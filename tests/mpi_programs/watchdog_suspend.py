"""Two ranks in a loop of barriers for SECONDS with a short-threshold watchdog: ``python -m
tests.mpi_programs.watchdog_suspend SECONDS``. A test suspends both ranks (SIGSTOP) for longer
than every threshold and resumes them: the job must finish, not be ended as stalled."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mpi4py import MPI

from disdl_mpi.comm.world import install_abort_handler
from disdl_mpi.reliability.watchdog import StallPolicy, StallWatchdog

comm = MPI.COMM_WORLD
install_abort_handler(comm)
Path(os.environ["FAULT_PIDS"]).mkdir(parents=True, exist_ok=True)
(Path(os.environ["FAULT_PIDS"]) / f"rank{comm.Get_rank()}.pid").write_text(str(os.getpid()))
dog = StallWatchdog(comm, StallPolicy(report_after=1.0, lost_after=2.0, stuck_after=4.0))
end = time.monotonic() + float(sys.argv[1])
step = 0
while comm.allreduce(time.monotonic() < end, op=MPI.LAND):
    dog.enter(step, "allreduce")
    time.sleep(0.05)
    step += 1
dog.close()
if comm.Get_rank() == 0:
    print(f"finished after {step} steps", flush=True)
