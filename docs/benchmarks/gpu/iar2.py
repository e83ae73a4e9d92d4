import time, numpy as np, torch
from mpi4py import MPI

c = MPI.COMM_WORLD


def bench(buf, mode, iters=60):
    ts = []
    for it in range(iters):
        c.Barrier()
        t = time.perf_counter()
        if mode == "Allreduce":
            c.Allreduce(MPI.IN_PLACE, buf)
        elif mode == "Iallreduce+Wait":
            c.Iallreduce(MPI.IN_PLACE, buf).Wait()
        elif mode == "Iallreduce+Test1+Wait":
            r = c.Iallreduce(MPI.IN_PLACE, buf)
            r.Test()
            r.Wait()
        else:
            r = c.Iallreduce(MPI.IN_PLACE, buf)
            while not r.Test():
                pass
        ts.append(time.perf_counter() - t)
    return float(np.median(ts[10:])) * 1e6


for n in [4096, 16384, 65536, 262144]:
    for kind in ("numpy", "pinned"):
        if kind == "numpy":
            buf = np.ones(n // 4, np.float32)
        else:
            t = (
                torch.ones(n // 4, dtype=torch.float32).pin_memory()
                if torch.cuda.is_available()
                else torch.ones(n // 4)
            )
            buf = t.numpy()
        res = {
            m: round(bench(buf, m), 1)
            for m in ("Allreduce", "Iallreduce+Wait", "Iallreduce+Test1+Wait", "Iallreduce+Testloop")
        }
        if c.rank == 0:
            print(n, kind, res, flush=True)
