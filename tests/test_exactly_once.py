"""Exactly-once mode: lines, state and job offsets commit in one Kafka transaction."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from forwarder.config import Delivery, Settings
from forwarder.core import open_core
from forwarder.kafka import make_producer
from forwarder.observability import Metrics
from forwarder.pipeline import Transaction
from forwarder.state import BatchState
from forwarder.topics import topic_partitions
from tests.support.fake_datagrid import FakeDatagrid, generate_lines
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import Forwarder, wait_until

MakeSettings = Callable[..., Settings]


async def test_aborted_attempt_is_invisible_to_read_committed(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """A drop after 400 lines aborts the transaction; the retry commits all 1,000 lines once."""
    settings = make_settings(delivery=Delivery.EXACTLY_ONCE)
    spec = {"count": 1000, "distinct_ids": 1000}
    fake_datagrid.configure(
        batch_id,
        generate=spec,
        chunk_size=4096,
        faults=[{"kind": "drop", "after_lines": 400, "mid_line": True}],
    )
    metrics = Metrics(process=False)
    async with open_core(settings, metrics) as core:
        producer = make_producer(settings, core.limits, transactional_id=f"t-{uuid.uuid4().hex}")
        await producer.start()
        try:
            state = await core.pipeline.forward(batch_id, txn=Transaction(producer))
        finally:
            await producer.stop()
    assert state.status == "forwarded" and state.attempts == 2
    assert state.delivery == "exactly-once" and state.lines == {"succeeded": 1000}
    # The commit is answered before its markers are written: read_committed consumers see the
    # batch once they are (the last stable offset moves past it), a moment later on a busy broker.
    for _ in range(100):
        committed = await read_topic(settings.kafka_bootstrap_servers, settings.results_topic)
        if len(committed) >= 1000:
            break
        await asyncio.sleep(0.1)
    assert sorted(r.value for r in committed) == sorted(generate_lines(batch_id, spec))
    # The aborted attempt's records exist in the log, but only read_uncommitted sees them.
    raw = len(
        await read_topic(
            settings.kafka_bootstrap_servers,
            settings.results_topic,
            isolation_level="read_uncommitted",
        )
    )
    assert raw >= 1000 + 300
    assert (
        metrics.registry.get_sample_value(
            "forwarder_lines_forwarded_total", {"status": "succeeded"}
        )
        == 1000
    )
    states = await read_topic(settings.kafka_bootstrap_servers, settings.state_topic)
    assert [BatchState.decode(r.value or b"").status for r in states] == ["forwarded"]


def test_service_commits_offsets_in_the_transaction(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, tmp_path: Path, batch_id: str
) -> None:
    """In exactly-once mode the jobs offset is committed with the batch; a repeat is a duplicate."""
    settings = make_settings(delivery=Delivery.EXACTLY_ONCE)
    fake_datagrid.configure(batch_id, generate={"count": 200, "distinct_ids": 200})
    fwd = Forwarder(settings, tmp_path).start()
    try:
        fwd.wait_ready()
        assert fwd.queue(batch_id).status_code == 202
        wait_until(lambda: (fwd.state(batch_id) or {}).get("status") == "forwarded", 30, "done")
        assert fwd.queue(batch_id).status_code == 202
        wait_until(lambda: fwd.events("batch_duplicate"), 30, "duplicate")
    finally:
        fwd.stop()
    records = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    assert len(records) == 200

    async def committed() -> int:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=settings.consumer_group,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            total = 0
            for p in await topic_partitions(
                {"bootstrap_servers": settings.kafka_bootstrap_servers}, settings.jobs_topic
            ):
                total += await consumer.committed(TopicPartition(settings.jobs_topic, p)) or 0
            return total
        finally:
            await consumer.stop()

    assert asyncio.run(committed()) == 2  # both jobs consumed
