"""Benchmarks (never timed tests). ``python -m bench`` (``make bench``) runs them all.

- ``bench/__main__.py``: the command: flags, the final table, the JSON.
- ``bench/suite.py``: the sections and how each figure is measured.
- ``bench/ledger_bench.py``: in-process ledger figures (also ``python -m bench.ledger_bench``).
- ``bench/loadgen.py``: spawned client processes (closed and open loop).
- ``bench/servers.py``, ``bench/echo_server.py``, ``bench/aio_server.py``: servers under test.
- ``bench/policies.py``: the policies served (a small one, a generated big one).
"""
