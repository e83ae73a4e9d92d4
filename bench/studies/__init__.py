"""Studies that launch MPI jobs and turn their results into tables, plots and reports.

One engine (:mod:`bench.studies.engine`) launches every job, keeps finished points for resume and
shows progress; ``scaling`` and ``accuracy`` are sweeps built on it; ``costmodel`` fits and
projects allreduce times; ``report`` gathers any mix of results into report.md/.html.
"""
