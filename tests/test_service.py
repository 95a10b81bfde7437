"""``forwarder serve`` end to end: real processes, the real broker, the fake Datagrid over HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

from forwarder.config import SecretStr, Settings
from tests.conftest import REPO
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import (
    WEBHOOK_SECRET,
    Forwarder,
    event_body,
    settings_env,
    start,
    wait_until,
)

MakeSettings = Callable[..., Settings]


def count(settings: Settings, topic: str) -> int:
    return len(asyncio.run(read_topic(settings.kafka_bootstrap_servers, topic)))


def results(settings: Settings) -> list[bytes | None]:
    return [
        r.key
        for r in asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    ]


def metric_value(fwd: Forwarder, sample: str) -> float:
    """A sample's value from /metrics (0 if absent), e.g.
    'forwarder_batches_total{outcome="duplicate"}'."""
    for text in fwd.http.get("/metrics").text.splitlines():
        if text.startswith(sample + " "):
            return float(text.split()[-1])
    return 0.0


def test_signature_matrix(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    tmp_path: Path,
) -> None:
    """Good (each rotated secret), bad, stale, future, missing, malformed, altered: right codes."""
    settings = make_settings(
        webhook_secrets=[SecretStr("whsec_old"), SecretStr(WEBHOOK_SECRET)],
        webhook_max_body_bytes=4096,
    )
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    for name in ("bpred_sig_a", "bpred_sig_b"):
        fake_datagrid.configure(name, lines=['{"custom_id":"a"}'])
    now = int(time.time())
    body = event_body("bpred_sig_a", "evt_sig_1")
    cases = [
        ("good, current secret", dict(body=body), 202),
        (
            "good, previous secret",
            dict(body=event_body("bpred_sig_b", "evt_sig_2"), secret="whsec_old"),
            202,
        ),
        ("wrong secret", dict(body=body, secret="whsec_wrong"), 401),
        # Signed "age" seconds before it is sent (negative: in the future). Taken at send time,
        # not from ``now``: a future stamp 301 s ahead of a ``now`` read seconds earlier is
        # within the 300 s tolerance by then. The future one is 60 s beyond it, more than the
        # client's 10 s timeout lets a request take; the exact edge is a unit test.
        ("stale", dict(body=body, age=301), 401),
        ("future", dict(body=body, age=-(300 + 60)), 401),
        ("missing", dict(body=body, header=""), 401),
        ("malformed", dict(body=body, header="garbage"), 401),
        ("malformed t", dict(body=body, header="t=abc,v1=00"), 401),
        ("no v1", dict(body=body, header=f"t={now}"), 401),
        ("altered body", dict(body=body[:-2] + b" }"), 401),
    ]
    for label, kwargs, expected in cases:
        body_ = kwargs.pop("body")
        if "age" in kwargs:
            kwargs["timestamp"] = int(time.time()) - kwargs.pop("age")  # type: ignore[operator]
        if label == "altered body":
            # sign the original, send a body differing by one byte
            from forwarder.webhooks import sign

            header = f"t={now},v1={sign(WEBHOOK_SECRET.encode(), now, body)}"
            response = fwd.webhook(body_, header=header)
        else:
            response = fwd.webhook(body_, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == expected, (label, response.text)
        if expected >= 400:
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["status"] == expected
    # other event types are acknowledged and ignored; signed garbage is 400; big bodies 413
    other = event_body("bpred_sig_a", "evt_k", "knowledge.processing.completed")
    assert fwd.webhook(other).status_code == 200
    assert fwd.webhook(b"{not json").status_code == 400
    assert (
        fwd.webhook(b'{"id":"evt_x","event_type":"batch_prediction.completed"}').status_code == 400
    )
    assert fwd.webhook(event_body("../etc", "evt_y")).status_code == 400
    too_big = fwd.webhook(b"{" + b" " * 5000 + b"}")
    assert too_big.status_code == 413
    assert too_big.headers["content-type"].startswith("application/problem+json")
    assert metric_value(fwd, 'forwarder_webhooks_total{outcome="bad_signature"}') == 8
    assert metric_value(fwd, 'forwarder_webhooks_total{outcome="accepted"}') == 2
    assert metric_value(fwd, 'forwarder_webhooks_total{outcome="ignored"}') == 1
    assert metric_value(fwd, 'forwarder_webhooks_total{outcome="invalid"}') == 3


def test_duplicates_forward_once_and_replay_forwards_again(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """5 identical webhooks, an API job and a bare-id job forward the lines once; replay again."""
    settings = make_settings()
    fake_datagrid.configure(batch_id, generate={"count": 50, "distinct_ids": 50})
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    body = event_body(batch_id, "evt_dup_1")
    codes = [fwd.webhook(body).status_code for _ in range(5)]
    assert codes[0] == 202 and set(codes[1:]) <= {200, 202}
    assert fwd.queue(batch_id).status_code == 202

    async def bare_id() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(settings.jobs_topic, batch_id.encode())
        finally:
            await producer.stop()

    asyncio.run(bare_id())
    wait_until(lambda: (fwd.state(batch_id) or {}).get("status") == "forwarded", 30, "forwarded")
    duplicates = 'forwarder_batches_total{outcome="duplicate"}'
    wait_until(lambda: metric_value(fwd, duplicates) >= 2, 30, "two duplicate jobs")
    assert metric_value(fwd, 'forwarder_webhooks_total{outcome="duplicate"}') == 4
    assert metric_value(fwd, 'forwarder_batches_total{outcome="forwarded"}') == 1
    assert len(results(settings)) == 50
    # A restarted process remembers (the state topic), so a late redelivery is still a duplicate.
    fwd.stop()
    fwd2 = start(forwarders, settings, tmp_path).wait_ready()
    assert fwd2.queue(batch_id).status_code == 202
    wait_until(lambda: metric_value(fwd2, duplicates) == 1, 30, "duplicate after restart")
    assert fwd2.queue(batch_id, replay=True).status_code == 202
    wait_until(lambda: len(results(settings)) == 100, 30, "replayed lines")
    assert Counter(results(settings)) == {k: 2 for k in set(results(settings))}


def test_two_processes_share_twenty_batches(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    tmp_path: Path,
) -> None:
    """Two serve processes in one group forward 20 batches: each exactly once, work shared."""
    settings = make_settings(concurrency=2)
    batches = [f"bpred_share_{i:02d}_{tmp_path.name[-6:]}" for i in range(20)]
    for b in batches:
        fake_datagrid.configure(
            b, generate={"count": 40, "distinct_ids": 40}, drip_delay=0.01, chunk_size=2048
        )
    a = start(forwarders, settings, tmp_path).wait_ready()
    b_ = start(forwarders, settings, tmp_path).wait_ready()
    wait_until(a.ready, 30, "first forwarder ready after the rebalance")
    for batch in batches:
        assert a.queue(batch).status_code == 202

    def done() -> list[set[str]]:
        return [{e["batch_id"] for e in f.events("batch_forwarded")} for f in (a, b_)]

    # Wait for every batch's own "forwarded" log line, not for 800 lines in the topic: the
    # last lines are acknowledged before their batch's line is logged, so on a slow machine
    # the count can be reached while the logs are still one batch short.
    wait_until(lambda: set().union(*done()) >= set(batches), 90, "20 batches forwarded")
    records = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    per_batch = Counter(r.headers["datagrid-batch-id"].decode() for r in records)
    assert per_batch == {b: 40 for b in batches}
    done_a, done_b = done()
    assert done_a and done_b, "both processes must have forwarded batches"
    assert done_a.isdisjoint(done_b) and done_a | done_b == set(batches)


def test_sigterm_mid_batch_then_restart_loses_nothing(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """SIGTERM while a batch streams: readiness drops, the job stays uncommitted, a restart
    forwards every line."""
    # The 503 can only be seen while the process drains: 10 s (not 2) so that a loaded
    # machine's slow poll still lands in it; the stall outlasts the drain by far, so the batch
    # is still held when the drain gives up (it costs nothing: the restart's stream is not held).
    settings = make_settings(drain_timeout_seconds=10.0, datagrid_read_timeout=90.0)
    fake_datagrid.configure(
        batch_id,
        generate={"count": 1000, "distinct_ids": 1000},
        chunk_size=4096,
        faults=[{"kind": "stall", "after_lines": 300, "seconds": 80}],
    )
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    assert fwd.queue(batch_id).status_code == 202
    wait_until(lambda: count(settings, settings.results_topic) >= 250, 30, "lines before stall")
    fwd.signal(signal.SIGTERM)
    readiness = wait_until(
        lambda: (r := _readyz(fwd)) is not None and r.status_code == 503 and r.json(),
        10,
        "/readyz 503 while draining",
    )
    assert readiness["checks"]["not_draining"] is False
    assert fwd.wait_exit(60) == 0
    assert fwd.events("drain_timeout_abandoned")
    assert not fwd.events("batch_forwarded")
    before = results(settings)  # what the stopped process got into Kafka
    assert 250 <= len(before) <= 300 and len(set(before)) == len(before)
    restarted = start(forwarders, settings, tmp_path).wait_ready()
    wait_until(lambda: restarted.events("batch_forwarded"), 60, "restarted forward")
    keys = results(settings)
    assert set(keys) == {f"cid-{i:08d}".encode() for i in range(1000)}  # nothing lost
    # At-least-once: the new process re-sends exactly the lines the old one got in, once more.
    copies = Counter(keys)
    assert sorted(k for k, n in copies.items() if n == 2) == sorted(before)
    assert set(copies.values()) <= {1, 2} and len(keys) == 1000 + len(before)


def test_not_terminal_batch_waits_without_blocking_others(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """A batch queued in_progress is forwarded once completed; a later batch goes first."""
    settings = make_settings(not_ready_poll_seconds=0.5, concurrency=1, kafka_topic_partitions=1)
    # In progress until the later batch is forwarded, then completed: the order is the
    # scenario's, not a race between a few polls and how fast the later batch goes through.
    first = {"generate": {"count": 10, "distinct_ids": 10}}
    fake_datagrid.configure(batch_id, status="in_progress", **first)
    later = batch_id + "_later"
    fake_datagrid.configure(later, generate={"count": 5, "distinct_ids": 5})
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    assert fwd.queue(batch_id).status_code == 202
    wait_until(lambda: (fwd.state(batch_id) or {}).get("status") == "waiting", 20, "waiting")
    assert fwd.queue(later).status_code == 202
    wait_until(lambda: (fwd.state(later) or {}).get("status") == "forwarded", 20, "later done")
    assert (fwd.state(batch_id) or {}).get("status") == "waiting"
    fake_datagrid.configure(batch_id, status="completed", **first)
    wait_until(lambda: (fwd.state(batch_id) or {}).get("status") == "forwarded", 30, "first done")
    order = [e["batch_id"] for e in fwd.events("batch_forwarded")]
    assert order == [later, batch_id]
    assert len(results(settings)) == 15


def test_readyz_false_until_kafka_answers(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    tmp_path: Path,
) -> None:
    """With no broker yet, /healthz is 200 and /readyz 503; once the broker is up, ready."""
    import rig  # deploy/kafka/rig.py, on sys.path via conftest

    broker = rig.Broker.on_free_ports(tmp_path / "kafka")
    settings = make_settings(kafka_bootstrap_servers=broker.bootstrap)
    fwd = start(forwarders, settings, tmp_path)
    wait_until(lambda: _get(fwd, "/healthz") == 200, 30, "liveness")
    response = fwd.http.get("/readyz")
    assert response.status_code == 503 and response.json()["checks"]["kafka"] is False
    try:
        # A ceiling on the broker answering (it returns as soon as it does): a JVM start on a
        # loaded 2-core machine can take longer than the default 60 s.
        broker.start(wait=180)
        fwd.wait_ready(90)
    finally:
        fwd.stop()
        broker.stop()


def _readyz(fwd: Forwarder) -> httpx.Response | None:
    """GET /readyz, or None if the process no longer answers."""
    try:
        return fwd.http.get("/readyz")
    except httpx.TransportError:
        return None


def _get(fwd: Forwarder, path: str) -> int:
    try:
        return fwd.http.get(path).status_code
    except Exception:
        return 0


def test_missing_topic_or_bad_setting_stops_startup(make_settings: MakeSettings) -> None:
    """A missing topic with creation disabled, a bad variable, and no webhook secret stop
    start-up."""
    settings = make_settings(kafka_create_topics=False)

    def serve(**overrides: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in settings_env(settings).items()}
        env.update(overrides)
        env["PATH"] = "/usr/bin:/bin"
        return subprocess.run(
            [sys.executable, "-m", "forwarder.cli", "serve"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = serve(FORWARDER_HTTP_PORT="0")
    assert done.returncode == 2 and "FORWARDER_HTTP_PORT" in done.stderr
    done = serve(FORWARDER_HTTP_PORT="18999", FORWARDER_WEBHOOK_SECRETS="")
    assert done.returncode == 2 and "FORWARDER_WEBHOOK_SECRETS" in done.stderr
    done = serve(FORWARDER_HTTP_PORT="18999")
    assert done.returncode == 1, done.stderr
    assert settings.results_topic in done.stderr and "FORWARDER_KAFKA_CREATE_TOPICS" in done.stderr
    log_lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert any(r.get("event") == "startup_failed" for r in log_lines)
