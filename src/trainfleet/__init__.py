"""trainfleet: train models across a fleet of machines that nobody fully controls.

Layers, one package each:

- ``manifest``   TOML manifest -> typed, validated specs; job identity; reload plans
- ``capability`` what a worker has (detected) intersected with what its host may do (declared)
- ``queue``      the durable job queue behind one interface (SQLite here)
- ``artifacts``  content-addressed artifact storage (local dir or any fsspec URL) + packing
- ``coordinator`` the HTTP control plane (Starlette app served by uvicorn)
- ``worker``     the worker daemon: claim -> run -> heartbeat -> upload -> complete
- ``train``      the built-in trainer (a small byte-level GPT)
- ``data``       corpora the built-in trainer reads
- ``cli``        the ``trainfleet`` command
"""

__version__ = "0.1.0"
