"""bench.allreduce with rank 1's reduced buffer off by one in element 0, as a broken reduction
would leave it: its correctness check must catch that (tests/test_bench.py). The fault is
injected here, in the test's program, so the benchmark itself carries no test hook."""

import sys

import numpy as np

from bench import allreduce

_clean_result = allreduce.Op.result


def _corrupted_result(self: allreduce.Op) -> np.ndarray:
    got = np.array(_clean_result(self), dtype=np.float64)
    if self.comm.Get_rank() == 1 and len(got):
        got[0] += 1
    return got


allreduce.Op.result = _corrupted_result
sys.exit(allreduce.main(sys.argv[1:]))
