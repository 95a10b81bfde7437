"""datagrid-forwarder: Datagrid batch-prediction results into Kafka, once per batch."""

import os
import sys

#: The project's version: pyproject.toml's (a test keeps them equal). A constant, not
#: importlib.metadata, which costs every command a tenth of a second of start-up.
__version__ = "0.4.0"

#: The source revision, stamped by the image build (``forwarder_build_info``).
__revision__ = os.environ.get("DATAGRID_FORWARDER_REVISION", "unknown")

# httpx imports its command-line client (click and rich, installed with litestar: about a tenth
# of a second) whenever they are importable; the forwarder never runs it, so it is never loaded.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
# structlog likewise imports rich (about 40 ms) to pretty-print tracebacks in console logs. The
# forwarder's logs are JSON with plain tracebacks (FORWARDER_LOG_FORMAT=console falls back to
# plain ones too), so rich is not loaded either, unless something imported it before us.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

__all__ = ["__revision__", "__version__"]
