"""Logs: the canonical batch line, one JSON pipeline for every logger, request ids."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from forwarder.config import Settings
from forwarder.core import open_core
from forwarder.observability import Metrics, configure_logging
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.service_helpers import Forwarder, event_body, wait_until

MakeSettings = Callable[..., Settings]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes global state: put the root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


async def test_canonical_batch_line(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """One `batch_forwarded` event per batch carries ids, outcome, counts, duration and delay."""
    settings = make_settings()
    completed = datetime.now(UTC) - timedelta(minutes=2)
    fake_datagrid.configure(
        batch_id,
        lines=[
            '{"custom_id":"a","status":"succeeded"}',
            "",
            "not json",
            '{"custom_id":"b","status":"errored"}',
        ],
        timestamps={"completed_at": completed.isoformat().replace("+00:00", "Z")},
    )
    async with open_core(settings, Metrics(process=False)) as core:
        with capture_logs() as logs:
            await core.pipeline.forward(batch_id, source="webhook", event_id="evt_9")
    canonical = [e for e in logs if e["event"].startswith("batch_")]
    assert len(canonical) == 1
    line = canonical[0]
    assert line["event"] == "batch_forwarded" and line["log_level"] == "info"
    assert line["batch_id"] == batch_id and line["event_id"] == "evt_9"
    assert line["source"] == "webhook" and line["attempt"] == 1
    assert line["lines"] == {"succeeded": 1, "errored": 1}
    assert line["dead_letters"] == {"invalid_json": 1} and line["blank_lines"] == 1
    # The delay runs from the batch's completion (2 minutes ago) to its last line acknowledged.
    assert 0 < line["duration_s"] < 60
    assert 120 <= line["forward_delay_s"] < 120 + 60
    assert line["error"] is None and line["delivery"] == "at-least-once"


def test_every_logger_renders_one_json_object_per_line(restore_logging: None) -> None:
    """structlog and stdlib loggers (uvicorn, aiokafka) share the JSON renderer; noise is
    clamped."""
    out = io.StringIO()
    configure_logging("json", "INFO", stream=out)
    import structlog

    structlog.get_logger("forwarder.test").info("hello", batch_id="b1")
    logging.getLogger("uvicorn.error").info("server up")
    logging.getLogger("aiokafka.conn").info("chatty")  # clamped to WARNING: not written
    logging.getLogger("aiokafka.conn").warning("broker gone")
    records = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(r["event"], r["logger"], r["level"]) for r in records] == [
        ("hello", "forwarder.test", "info"),
        ("server up", "uvicorn.error", "info"),
        ("broker gone", "aiokafka.conn", "warning"),
    ]
    assert records[0]["batch_id"] == "b1"
    assert all(r["timestamp"].endswith("Z") for r in records)


def test_request_id_is_bound_and_echoed(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, tmp_path: Path, batch_id: str
) -> None:
    """A request's log lines carry its X-Request-Id, which the response echoes."""
    settings = make_settings()
    fake_datagrid.configure(batch_id, lines=['{"custom_id":"a"}'])
    fwd = Forwarder(settings, tmp_path).start()
    try:
        fwd.wait_ready()
        response = fwd.http.post(
            "/webhooks/datagrid",
            content=(body := event_body(batch_id, "evt_rid")),
            headers={"X-Request-Id": "req-123", "Datagrid-Signature": _signature(body)},
        )
        assert response.status_code == 202
        assert response.headers["x-request-id"] == "req-123"
        accepted = wait_until(lambda: fwd.events("webhook_accepted"), 10, "webhook log line")
        assert accepted[0]["request_id"] == "req-123" and accepted[0]["event_id"] == "evt_rid"
        assert fwd.http.get("/healthz").headers["x-request-id"]  # generated when not given
    finally:
        fwd.stop()


def _signature(body: bytes) -> str:
    import time

    from forwarder.webhooks import sign
    from tests.support.service_helpers import WEBHOOK_SECRET

    t = int(time.time())
    return f"t={t},v1={sign(WEBHOOK_SECRET.encode(), t, body)}"
