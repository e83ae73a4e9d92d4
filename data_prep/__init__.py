"""Offline data preparation: split a dataset into private per-rank HDF5 partitions."""
