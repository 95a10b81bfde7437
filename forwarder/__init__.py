"""datagrid-forwarder: Datagrid batch-prediction results into Kafka, once per batch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("datagrid-forwarder")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
