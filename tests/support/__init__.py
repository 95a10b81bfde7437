"""Test support: the fakes and helpers that the tests, ``bench/`` and ``deploy/demo.py`` share.

Importable without importing a test module: the fake Datagrid (``python -m
tests.support.fake_datagrid``), a hostile upstream, Kafka and service helpers, the record tally
and the state preloader of the scale runs.
"""
