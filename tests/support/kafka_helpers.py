"""Reading topics back in tests: everything up to the current end, with headers, read_committed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from forwarder.topics import topic_partitions


@dataclass(frozen=True)
class Record:
    """A consumed record, flattened for assertions."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp: int  # create time, ms


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    timeout: float = 20.0,
    isolation_level: str = "read_committed",
) -> list[Record]:
    """Every committed record of ``topic`` (all partitions), in partition/offset order.

    With ``isolation_level="read_uncommitted"``: every data record in the log, those of open and
    aborted transactions too.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level
    )
    await consumer.start()
    try:
        partitions = await topic_partitions({"bootstrap_servers": bootstrap}, topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Record] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            if loop.time() > deadline:
                raise TimeoutError(f"reading {topic} did not reach its end offsets {ends}")
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                out.extend(
                    Record(
                        tp.topic,
                        tp.partition,
                        r.offset,
                        r.key,
                        r.value,
                        dict(r.headers),
                        r.timestamp,
                    )
                    for r in records
                    if r.offset < ends[tp]
                )
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


def java_partition(key: bytes, partitions: int) -> int:
    """Kafka's Java default partitioner for a keyed record: toPositive(murmur2(key)) % n."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions
