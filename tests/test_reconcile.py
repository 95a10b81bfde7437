"""The reconciler: with no webhook at all, recent terminal batches are still forwarded, once."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from forwarder.config import Settings
from tests.conftest import API_KEY
from tests.support.fake_datagrid import start_fake_datagrid
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import Forwarder, event_body, wait_until


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _lines(batch: str, count: int) -> list[str]:
    return [f'{{"custom_id":"{batch}-{n}","status":"succeeded"}}' for n in range(count)]


def test_reconciler_forwards_recent_terminal_batches_once(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """No webhooks: the list endpoint's recent terminal batches are forwarded exactly once (one
    of them also by a late webhook); older and unfinished ones are left alone."""
    suffix = uuid.uuid4().hex[:6]
    now = datetime.now(UTC)
    recent, also_webhooked = f"bpred_recent_{suffix}", f"bpred_hooked_{suffix}"
    running, old = f"bpred_running_{suffix}", f"bpred_old_{suffix}"
    with start_fake_datagrid(API_KEY) as fake:  # its own list: no other test's batches
        fake.configure(recent, lines=_lines(recent, 4), created_at=_iso(now - timedelta(hours=2)))
        fake.configure(also_webhooked, lines=_lines(also_webhooked, 3), created_at=_iso(now))
        fake.configure(running, status="in_progress", lines=_lines(running, 2))
        fake.configure(
            old,
            lines=_lines(old, 2),
            created_at=_iso(now - timedelta(hours=100)),
            expires_at=_iso(now + timedelta(hours=1)),
        )
        settings = make_settings(
            datagrid_base_url=fake.base_url,
            reconcile_interval_seconds=1.0,
            reconcile_lookback_hours=72.0,
        )
        fwd = Forwarder(settings, tmp_path).start()
        try:
            fwd.wait_ready()

            def forwarded(batch: str) -> bool:
                state = fwd.state(batch)
                return state is not None and state["status"] == "forwarded"

            wait_until(lambda: forwarded(recent) and forwarded(also_webhooked), 90, "reconciled")
            # The webhook arrives late, after the reconciler already queued the batch.
            # This pod holds its forwarded state: a duplicate, answered 200 and never queued.
            late = fwd.webhook(event_body(also_webhooked, f"evt_{suffix}"))
            assert late.status_code == 200 and late.json()["status"] == "duplicate", late.text

            def passes() -> int:
                text = fwd.http.get("/metrics").text
                found = re.search(r'forwarder_reconcile_runs_total\{outcome="ok"\} (\d+)', text)
                return int(found.group(1)) if found else 0

            wait_until(lambda: passes() >= 4, 60, "more reconciler passes")
            assert fwd.state(running) is None and fwd.state(old) is None
            paths = [r["path"] for r in fake.requests()]
        finally:
            fwd.stop()
    assert not [p for p in paths if p.endswith(f"{running}/results") or old in p]
    records = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    keys = sorted(r.key.decode() for r in records if r.key)
    assert keys == sorted(
        [f"{recent}-{n}" for n in range(4)] + [f"{also_webhooked}-{n}" for n in range(3)]
    )  # each exactly once
    queued = [e for e in fwd.events("reconcile_queued")]
    assert sorted({e["batch_id"] for e in queued}) <= sorted({recent, also_webhooked})
