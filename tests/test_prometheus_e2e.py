"""A real Prometheus scrapes a running `forwarder serve`; every dashboard query returns data."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

from forwarder.config import Settings
from tests.conftest import REPO
from tests.prometheus_rig import PrometheusRig
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import Forwarder, event_body, wait_until
from tests.test_dashboard import dashboard_queries

MakeSettings = Callable[..., Settings]
RULES = REPO / "deploy" / "prometheus" / "forwarder-rules.yaml"


def test_dashboard_queries_and_rules_against_live_service(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, tmp_path: Path, batch_id: str
) -> None:
    """While batches flow, every panel query returns data and the metrics match Kafka's content."""
    settings = make_settings()
    good = [f"{batch_id}_{i}" for i in range(3)]
    for i, name in enumerate(good):
        lines = [
            f'{{"custom_id":"c{j}","status":"{s}"}}'
            for j, s in enumerate(["succeeded", "errored", "canceled", "expired", "succeeded"])
        ]
        lines += ["oops"] * i  # dead letters in two of the batches
        faults = [{"kind": "status", "code": 503}] if i == 1 else []  # one retry
        fake_datagrid.configure(name, lines=lines, drip_delay=0.05, chunk_size=64, faults=faults)
    missing = f"{batch_id}_gone"  # 404: a failed batch
    fwd = Forwarder(settings, tmp_path).start().wait_ready()
    prometheus = PrometheusRig(f"127.0.0.1:{fwd.port}", rule_files=[RULES]).start()
    try:
        prometheus.wait_for_scrape(scrapes=1)
        for name in good:
            assert fwd.webhook(event_body(name, f"evt_{name}")).status_code == 202
        assert fwd.webhook(event_body(good[0], f"evt_{good[0]}")).status_code == 200  # duplicate
        assert fwd.webhook(b"{}", header="t=1,v1=00").status_code == 401
        assert fwd.queue(missing).status_code == 202
        wait_until(
            lambda: all((fwd.state(b) or {}).get("status") == "forwarded" for b in good),
            60,
            "batches forwarded",
        )
        wait_until(lambda: (fwd.state(missing) or {}).get("status") == "failed", 60, "failed")
        # Two scrapes after the work: rate() over the new counters has two points.
        prometheus.wait_for(
            "sum(forwarder_batches_total)", until=lambda r: bool(r) and float(r[0]["value"][1]) == 4
        )
        prometheus.wait_for_fresh_scrape()
        prometheus.wait_for_fresh_scrape()

        empty = {}
        for title, expr in dashboard_queries().items():
            result = prometheus.query(expr)
            if not result:
                empty[title] = expr
        assert not empty, f"panels without data: {empty}"

        results = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
        dead = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.dead_letter_topic))
        assert prometheus.value("sum(forwarder_lines_forwarded_total)") == len(results) == 15
        assert prometheus.value("sum(forwarder_dead_letters_total)") == len(dead) == 3
        assert prometheus.value('forwarder_batches_total{outcome="failed"}') == 1
        assert prometheus.value('forwarder_webhooks_total{outcome="duplicate"}') == 1
        assert prometheus.value('forwarder_upstream_requests_total{code="404"}') == 1
        assert prometheus.value("sum(forwarder_retries_total)") == 1
        delay = prometheus.value(
            "histogram_quantile(0.5, sum by (le) (forwarder_forward_delay_seconds_bucket))"
        )
        assert not math.isnan(delay) and delay > 0
        broken = [
            {k: r.get(k) for k in ("name", "health", "lastError")}
            for r in prometheus.rules()
            if r.get("health") == "err" or r.get("lastError")
        ]  # ("unknown" = a slower group not evaluated yet)
        assert not broken, broken
    finally:
        prometheus.stop()
        fwd.stop()
