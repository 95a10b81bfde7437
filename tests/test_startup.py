"""``forwarder forward`` imports only what forwarding needs (issue 23: start-up).

What a one-shot run imports is most of its start-up time, so the guard is on the modules, not
on a clock: the run below forwards a real 10-line batch through the real broker and lists the
modules its process holds when the command is done. The wall time itself is measured by
``python -m bench --only startup`` (``bench/RESULTS.md``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from forwarder.config import Settings
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.service_helpers import REPO, forwarder_env

#: What serving needs and forwarding one batch does not: the HTTP server and its framework, the
#: jobs consumer, the state store; a validation library for ``Settings``; and rich, which
#: structlog would use for pretty tracebacks (``forwarder/__init__.py``).
NOT_FOR_FORWARD = (
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
    "litestar",
    "uvicorn",
    "forwarder.app",
    "forwarder.server",
    "forwarder.api",
    "forwarder.webhooks",
    "forwarder.worker",
    "forwarder.store",
    "forwarder.reconcile",
    "rich",
)

#: Runs the ``forwarder`` command's ``main`` (what ``forwarder.cli.run`` runs, less its final
#: ``os._exit``), then writes the modules the process holds (blocked ones, ``None`` in
#: ``sys.modules``, are not loaded) to a file.
_RUN_AND_LIST = """
import json, sys
listing, *args = sys.argv[1:]
import forwarder.cli
code = forwarder.cli.main(args)
with open(listing, "w") as out:
    json.dump(sorted(name for name, module in sys.modules.items() if module), out)
sys.exit(code)
"""


def test_forward_imports_no_server_and_no_validation_library(
    make_settings: Callable[..., Settings],
    fake_datagrid: FakeDatagrid,
    batch_id: str,
    tmp_path: Path,
) -> None:
    """A 10-line ``forwarder forward`` succeeds without importing any serve-only module."""
    settings = make_settings()
    fake_datagrid.configure(batch_id, generate={"count": 10, "distinct_ids": 10})
    listing = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST, str(listing), "forward", batch_id],
        env=forwarder_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{batch_id}: forwarded" in done.stdout
    modules = set(json.loads(listing.read_text()))
    assert {"forwarder.pipeline", "forwarder.publish", "aiokafka", "httpx"} <= modules
    loaded = sorted(
        name
        for name in modules
        for banned in NOT_FOR_FORWARD
        if name == banned or name.startswith(banned + ".")
    )
    assert loaded == [], f"forwarder forward imported serve-only modules: {loaded}"
