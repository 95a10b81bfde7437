"""Benchmark harness for datagrid-forwarder (``python -m bench``; see ``bench/README.md``).

Not part of the service and not imported by it: ``forwarder/`` never depends on ``bench/``.
"""
