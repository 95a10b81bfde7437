"""Kafka from the harness's side: fresh topics, high watermarks, and reading records back.

The harness never shares a client with a contender: each helper opens its own and closes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from bench.harness import BenchFailure


async def create_topics(bootstrap: str, topics: dict[str, dict[str, str]], partitions: int) -> None:
    """Create ``topics`` (name -> topic configs) with ``partitions`` partitions, replication 1."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        new = [NewTopic(name, partitions, 1, topic_configs=cfg) for name, cfg in topics.items()]
        response = await admin.create_topics(new, timeout_ms=30_000)
        for topic, code, *rest in response.topic_errors:
            if code != 0:
                raise BenchFailure(f"creating {topic}: error {code} {rest}")
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Delete ``topics`` (disk hygiene between runs)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics, timeout_ms=30_000)
    finally:
        await admin.close()


async def watermarks(bootstrap: str, topic: str, partitions: int) -> list[int]:
    """The high watermark of each partition of ``topic``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return [ends[tp] for tp in tps]
    finally:
        await consumer.stop()


async def wait_for_records(
    bootstrap: str, topic: str, partitions: int, total: int, timeout: float
) -> float:
    """Poll ListOffsets until ``topic`` holds ``total`` records; return when (perf_counter)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        deadline = time.monotonic() + timeout
        while True:
            ends = await consumer.end_offsets(tps)
            have = sum(ends.values())
            if have >= total:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise BenchFailure(f"{topic} holds {have} of {total} records after {timeout:.0f} s")
            await asyncio.sleep(0.02)
    finally:
        await consumer.stop()


async def produce_values(bootstrap: str, topic: str, items: Iterable[tuple[bytes, bytes]]) -> None:
    """Write ``(key, value)`` records and wait until Kafka acknowledged all of them."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in items]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def last_append_per_batch(
    bootstrap: str, topic: str, partitions: int, expected: int | None
) -> dict[str, tuple[float, int]]:
    """batch id -> (the latest broker timestamp in seconds, records) over the whole topic.

    The topic must be created with ``message.timestamp.type=LogAppendTime``: then every record's
    timestamp is the broker's clock when it appended the record, which with ``acks=all`` and one
    replica is when the producer's acknowledgement was sent.  Reads with confluent-kafka (C), as
    reading millions of records with a Python client would take longer than the run itself.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-reader-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        latest: dict[str, tuple[float, int]] = {}
        seen, at_end = 0, set[int]()
        deadline = time.monotonic() + 120
        while len(at_end) < partitions and time.monotonic() < deadline:
            for message in consumer.consume(10_000, timeout=1.0):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(message.partition())
                        continue
                    raise BenchFailure(f"reading {topic}: {error}")
                seen += 1
                kind, stamp = message.timestamp()
                if kind != 2:  # TIMESTAMP_LOG_APPEND_TIME
                    raise BenchFailure(f"{topic}: record timestamp type {kind}, not LogAppendTime")
                batch = bytes(
                    dict(message.headers() or []).get("datagrid-batch-id") or b""
                ).decode()
                old = latest.get(batch, (0.0, 0))
                latest[batch] = (max(old[0], stamp / 1000), old[1] + 1)
        if expected is not None and seen != expected:
            raise BenchFailure(f"read {seen} records from {topic}, expected {expected}")
        return latest
    finally:
        consumer.close()
