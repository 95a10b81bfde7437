"""The producers a process keeps: the shared one, replaced when it fails for good, and
exactly-once's one per jobs partition.  Both are built by ``kafka.make_producer``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition

from forwarder.config import Settings
from forwarder.errors import KafkaError
from forwarder.kafka import TopicLimits, kafka_errors, make_producer

log = structlog.get_logger("forwarder.producers")


class SharedProducer:
    """The process's idempotent producer (results, dead letters, state, jobs).

    aiokafka's sender stops for good at OUT_OF_ORDER_SEQUENCE_NUMBER (a broker restart that lost
    the producer's state) and fails every later send, so a failed producer is replaced, never
    retried: :meth:`replace`, then the caller tries again on :attr:`current`.
    """

    def __init__(self, settings: Settings, limits: TopicLimits) -> None:
        self._settings, self._limits = settings, limits
        self.current = make_producer(settings, limits)
        self._replacing = asyncio.Lock()

    async def start(self) -> None:
        """Start the first producer."""
        with kafka_errors("starting the producer"):
            await self.current.start()

    async def replace(self, failed: AIOKafkaProducer) -> None:
        """Put a new producer in place of ``failed`` (once, however many callers saw it fail)."""
        async with self._replacing:
            if self.current is not failed:
                return
            log.warning("producer_replaced")
            fresh = make_producer(self._settings, self._limits)
            with kafka_errors("starting a new producer"):
                await fresh.start()
            self.current = fresh
        with contextlib.suppress(Exception):  # a failed producer may fail to stop cleanly
            await failed.stop()

    async def stop(self) -> None:
        """Flush and stop the current producer (every record that matters was awaited)."""
        try:
            await self.current.stop()
        except Exception as exc:  # a producer that failed for good fails its final flush too
            log.warning("producer_stop_failed", error=f"{type(exc).__name__}: {exc}")


class TransactionalProducers:
    """Exactly-once: one transactional producer per jobs partition, started on first use.

    Its id is derived from the partition, so starting it (``init_transactions``) fences whichever
    process owned the partition before (a zombie's late commit then fails).  A producer that failed
    is discarded and replaced, never reused: after a fatal error or a fencing its state is final.
    """

    def __init__(self, group: str, make: Callable[[str], AIOKafkaProducer]) -> None:
        self._group = group
        self._make = make
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._locks: dict[TopicPartition, asyncio.Lock] = {}
        self._starting = asyncio.Lock()
        #: Why the last producer could not start (say, a missing transactional-id ACL).
        self.failure: str | None = None

    def lock(self, tp: TopicPartition) -> asyncio.Lock:
        """The partition's lock: one transaction at a time per producer."""
        return self._locks.setdefault(tp, asyncio.Lock())

    async def get(self, tp: TopicPartition) -> AIOKafkaProducer:
        """The partition's producer, started if needed."""
        producer = self._producers.get(tp)
        if producer is not None:
            return producer
        async with self._starting:  # starts are rare: one at a time is fine
            producer = self._producers.get(tp)
            if producer is None:
                producer = self._make(f"{self._group}-{tp.topic}-{tp.partition}")
                try:
                    with kafka_errors(f"starting the producer of {tp}"):
                        await producer.start()
                except KafkaError as exc:
                    await producer.stop()
                    self.failure = f"exactly-once transactions cannot start: {exc}"
                    log.error(
                        "transactional_producer_failed", partition=tp.partition, error=str(exc)
                    )
                    raise
                self.failure = None
                self._producers[tp] = producer
        return producer

    async def discard(self, tp: TopicPartition) -> None:
        """Stop and forget the partition's producer (revoked, failed or fenced)."""
        self._locks.pop(tp, None)
        producer = self._producers.pop(tp, None)
        if producer is not None:
            with contextlib.suppress(Exception):  # a broken producer may fail to stop cleanly
                await producer.stop()

    async def close(self) -> None:
        """Stop every producer."""
        for tp in list(self._producers):
            await self.discard(tp)
