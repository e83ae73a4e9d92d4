"""Benchmarks. Programs that run inside one MPI job sit here (``python -m bench.allreduce``,
``bench.peer``, ``bench.norm_overhead``) on one timing harness (:mod:`bench.harness`); studies
that launch many jobs live in :mod:`bench.studies`."""
