"""Communication: the communicator and rank identity (``world``), gradient sync
(``allreducer`` with ``compression`` and ``cuda_aware``), tensor collectives (``mpi_ops``),
model broadcast (``model_sync``) and the ``--check-collectives`` debug mode."""
