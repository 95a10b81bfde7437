"""The failure policy against ``forwarder serve`` (issue: one failure policy): a topic that refuses
records, jobs that are no jobs, jobs of another deployment, and a crowded public port. Real
processes, the real broker, the fake Datagrid over HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from forwarder.config import Settings
from forwarder.jobs import Job, deployment_of
from forwarder.kafka import partition_for
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import Forwarder, start, wait_until

MakeSettings = Callable[..., Settings]


def result_keys(settings: Settings) -> list[bytes | None]:
    records = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    return [r.key for r in records]


def metric(fwd: Forwarder, sample: str) -> float:
    """A sample's value from the management port's /metrics (0 if absent)."""
    for line in httpx.get(f"{fwd.management_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def committed_offsets(settings: Settings, partitions: list[int]) -> dict[int, int | None]:
    """The consumer group's committed offset of each jobs partition, read from Kafka."""

    async def read() -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers, group_id=settings.consumer_group
        )
        await consumer.start()
        try:
            return {
                p: await consumer.committed(TopicPartition(settings.jobs_topic, p))
                for p in partitions
            }
        finally:
            await consumer.stop()

    return asyncio.run(read())


def set_topic_config(settings: Settings, topic: str, name: str, value: str) -> None:
    async def alter() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
        await admin.start()
        try:
            resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={name: value})
            await admin.alter_configs([resource])
        finally:
            await admin.close()

    asyncio.run(alter())


def test_a_state_topic_that_refuses_records_costs_no_copies(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """While the state topic refuses every record (max.message.bytes below a state record), the
    batch's lines are in Kafka once, the pod is not ready and names the state topic, and only the
    state write is retried; once mended the batch is forwarded, still with one copy per line."""
    settings = make_settings()
    fake_datagrid.configure(batch_id, generate={"count": 10, "distinct_ids": 10})
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    set_topic_config(settings, settings.state_topic, "max.message.bytes", "64")
    assert fwd.queue(batch_id).status_code == 202

    def not_ready_for_the_state_topic() -> bool:
        answer = httpx.get(f"{fwd.management_url}/readyz", timeout=5)
        body = answer.json()
        return answer.status_code == 503 and body["checks"]["state_topic"] is False

    wait_until(not_ready_for_the_state_topic, 60, "readyz names the state topic")
    reason = httpx.get(f"{fwd.management_url}/readyz", timeout=5).json()["reason"]
    assert "state_topic" in reason and "MessageSizeTooLarge" in reason
    assert metric(fwd, 'forwarder_config_problem{component="state_topic"}') == 1
    # Several state writes fail meanwhile (each logged at error), none re-sends a line.
    wait_until(lambda: len(fwd.events("state_write_failed")) >= 3, 30, "state write retries")
    failures = fwd.events("state_write_failed")
    assert all(f["level"] == "error" and f["kind"] == "config" for f in failures)
    keys = result_keys(settings)
    assert len(keys) == 10 and set(Counter(keys).values()) == {1}

    set_topic_config(settings, settings.state_topic, "max.message.bytes", "1048588")
    wait_until(lambda: (fwd.state(batch_id) or {}).get("status") == "forwarded", 60, "forwarded")
    ready = f"{fwd.management_url}/readyz"
    wait_until(lambda: httpx.get(ready, timeout=5).status_code == 200, 30, "ready again")
    assert metric(fwd, 'forwarder_config_problem{component="state_topic"}') == 0
    assert metric(fwd, 'forwarder_batches_total{outcome="forwarded"}') == 1
    assert result_keys(settings) == keys  # no further copies once mended either
    assert fwd.events("job_retry_kafka") == []  # the job itself never ran again


def _jobs_partition(settings: Settings, key: bytes) -> int:
    return partition_for(key, settings.kafka_topic_partitions)


def test_records_that_are_no_jobs_are_committed_past(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """Undecodable, deeply nested, oversized and foreign jobs ahead of a valid one on the same
    partition: each is logged and counted, the valid one is forwarded, and the committed offset
    passes them all."""
    settings = make_settings()
    fake_datagrid.configure(batch_id, generate={"count": 5, "distinct_ids": 5})
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    bad = [
        b"[" * 3000 + b"]" * 3000,
        b'{"batch_id":' + b"[" * 1500 + b"]" * 1500 + b"}",
        b"\xff\xfe garbage",
        b'{"batch_id": "' + batch_id.encode() + b'", "event_id": "' + b"e" * 300 + b'"}',
        b"",
    ]
    foreign = Job(batch_id=batch_id, source="webhook", deployment="other-group/other-results")
    key = batch_id.encode()
    partition = _jobs_partition(settings, key)

    async def produce() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            for value in [*bad, foreign.encode()]:
                await producer.send_and_wait(settings.jobs_topic, value, key=key)
            valid = Job(batch_id=batch_id, source="producer", deployment=deployment_of(settings))
            sent = await producer.send_and_wait(settings.jobs_topic, valid.encode(), key=key)
            return int(sent.offset)
        finally:
            await producer.stop()

    last = asyncio.run(produce())
    wait_until(lambda: (fwd.state(batch_id) or {}).get("status") == "forwarded", 60, "forwarded")
    invalid = 'forwarder_batches_total{outcome="invalid"}'
    wait_until(lambda: metric(fwd, invalid) == len(bad), 30, "every invalid job counted")
    assert metric(fwd, 'forwarder_batches_total{outcome="foreign"}') == 1
    assert metric(fwd, 'forwarder_batches_total{outcome="forwarded"}') == 1
    assert metric(fwd, 'forwarder_internal_errors_total{where="job"}') == 0
    assert len(fwd.events("job_invalid")) == len(bad)
    assert [e["queued_by"] for e in fwd.events("job_foreign")] == ["other-group/other-results"]
    assert len(result_keys(settings)) == 5

    wait_until(
        lambda: committed_offsets(settings, [partition]) == {partition: last + 1},
        30,
        "committed past every record",
    )


def test_probes_answer_while_the_public_port_is_full(
    make_settings: MakeSettings,
    forwarders: list[Forwarder],
    tmp_path: Path,
) -> None:
    """600 idle connections hold the public port at its cap: the management port's /healthz,
    /readyz and /metrics still answer 200 within 2 s (and the public port's do not)."""
    settings = make_settings(http_max_connections=64)
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    idle = []
    try:
        for _ in range(600):
            conn = socket.create_connection(("127.0.0.1", fwd.port), timeout=5)
            idle.append(conn)
        time.sleep(0.5)
        try:
            public = httpx.get(f"{fwd.url}/healthz", timeout=2).status_code
        except httpx.HTTPError:
            public = None
        assert public != 200, "the public port answered at its cap: the test proves nothing"
        for route in ("/healthz", "/readyz", "/metrics"):
            began = time.monotonic()
            answer = httpx.get(f"{fwd.management_url}{route}", timeout=2)
            assert answer.status_code == 200, (route, answer.text[:200])
            assert time.monotonic() - began < 2
    finally:
        for conn in idle:
            conn.close()


def test_exactly_once_offsets_commit_in_the_transaction(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    tmp_path: Path,
) -> None:
    """Exactly-once: each forwarded batch's job offset commits in its transaction (atomically
    with its lines and state), never again by the consumer; a duplicate job, which runs no
    transaction, is committed by the consumer."""
    settings = make_settings(
        delivery="exactly-once", batch_timeout_seconds=30, kafka_transaction_timeout_ms=60_000
    )
    batches = [f"bpred_eos_{tmp_path.name[-8:]}_{n}" for n in range(3)]
    for batch in batches:
        fake_datagrid.configure(batch, generate={"count": 4, "distinct_ids": 4})
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    for batch in batches:
        assert fwd.queue(batch).status_code == 202
    for batch in batches:
        wait_until(lambda b=batch: (fwd.state(b) or {}).get("status") == "forwarded", 60, batch)
    via_txn = 'forwarder_job_commits_total{via="transaction"}'
    wait_until(lambda: metric(fwd, via_txn) == 3, 30, "three commits in transactions")
    assert metric(fwd, 'forwarder_job_commits_total{via="consumer"}') == 0
    # The group's committed offsets come from the transactions alone: past every job.
    jobs = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.jobs_topic))
    expected = {}
    for record in jobs:
        expected[record.partition] = max(expected.get(record.partition, 0), record.offset + 1)

    assert committed_offsets(settings, list(expected)) == expected
    assert fwd.queue(batches[0]).status_code == 202  # already forwarded: a duplicate
    via_consumer = 'forwarder_job_commits_total{via="consumer"}'
    wait_until(lambda: metric(fwd, via_consumer) == 1, 30, "the duplicate's commit")
    assert metric(fwd, via_txn) == 3
