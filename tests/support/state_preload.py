"""Preloading a state topic with forwarded batches, fast (``tests/test_scale.py`` and
``bench/scaling.py``)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from forwarder.kafka import partition_for
from forwarder.state import BatchState, Status, utcnow

#: The partitions of the preloaded state topic (and of the jobs topic beside it).
PARTITIONS = 6


def preloaded_id(tag: str, index: int) -> str:
    """The batch id of the ``index``-th preloaded state record."""
    return f"bpred_pre{tag}{index:07d}"


def preloaded_state(batch_id: str, at: str) -> BatchState:
    """The state a preloaded batch has: forwarded at ``at``, 100 lines."""
    return BatchState(
        batch_id=batch_id,
        status=Status.FORWARDED,
        lines={"succeeded": 100},
        expected_lines=100,
        attempts=1,
        batch_status="completed",
        source="webhook",
        event_id=f"evt_{batch_id}",
        delivery="at-least-once",
        started_at=at,
        finished_at=at,
        terminal_at=at,
    )


async def preload_state(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    partitions: int = PARTITIONS,
    tag: str = "",
    retention_hours: float = 720.0,
) -> list[str]:
    """Create ``topic`` (``partitions``, compact+delete) and write ``count`` forwarded batches'
    states to it, keyed by batch id and partitioned with murmur2 (as the jobs are); return the ids.

    Written with ``create_batch``/``send_batch`` per partition: 300,000 records take seconds.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        config = {
            "cleanup.policy": "compact,delete",
            "retention.ms": str(int(retention_hours * 3_600_000)),
        }
        response = await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1, topic_configs=config)]
        )
        for name, code, *_ in response.topic_errors:
            assert code == 0, f"creating {name}: error {code}"
    finally:
        await admin.close()
    now = utcnow()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_batch_size=512 * 1024, linger_ms=0
    )
    await producer.start()
    ids = [preloaded_id(tag, i) for i in range(count)]
    try:
        pending: list[asyncio.Future[Any]] = []
        batches: dict[int, Any] = {}
        for batch_id in ids:
            key = batch_id.encode()
            value = preloaded_state(batch_id, now).encode()
            partition = partition_for(key, partitions)
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                pending.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
            if len(pending) >= 32:  # bound what is buffered: await the oldest sends
                await asyncio.gather(*pending)
                pending.clear()
        for partition, batch in batches.items():
            if batch.record_count():
                pending.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return ids
