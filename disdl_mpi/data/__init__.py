"""Partitions on disk as the run sees them: the format (``layout``), loading one rank's
partition with collective validation (``partition_io``) and input standardization from
allreduced sums (``standardize``). Building and naming partitions is data_prep's job."""
