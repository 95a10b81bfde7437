"""datagrid-forwarder: Datagrid batch-prediction results into Kafka, once per batch."""

import os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("datagrid-forwarder")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

#: The source revision, stamped by the image build (``forwarder_build_info``).
__revision__ = os.environ.get("DATAGRID_FORWARDER_REVISION", "unknown")

__all__ = ["__revision__", "__version__"]
