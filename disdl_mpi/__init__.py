"""disdl-mpi: data-isolated distributed deep learning over MPI, and its normalization schemes."""

__version__ = "0.1.0"
