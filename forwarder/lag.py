"""Lag reporting: how far behind the jobs topic this pod is, in jobs and in seconds.

``forwarder_jobs_lag`` per partition is the broker's end offset less the oldest unfinished job (or
the consumer's position when none is in flight), so it is right from the first poll after a
restart, not only once a fetch has returned records; ``forwarder_jobs_lag_seconds`` is the age of
the oldest job in flight.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

from forwarder.errors import KafkaError
from forwarder.kafka import kafka_errors
from forwarder.observability import Metrics
from forwarder.offsets import PartitionOffsets

#: How long end offsets read from the broker are used before they are read again.
END_OFFSETS_TTL = 5.0


class LagReporter:
    """Sets the lag gauges after each poll, reading end offsets at most every few seconds."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._ends: dict[TopicPartition, int] = {}  # end offsets read from the broker
        self._ends_at = 0.0

    async def update(
        self,
        consumer: AIOKafkaConsumer,
        offsets: Mapping[TopicPartition, PartitionOffsets],
        queued_at: Iterable[float],
    ) -> None:
        """Report the lag of every assigned partition (``offsets``: the jobs in flight of each)
        and the age of the oldest job in flight (``queued_at``: when each was queued, epoch s).

        ``queued_at`` is read before anything is awaited: it may be a view of the worker's live
        jobs, which change while the broker answers."""
        oldest = min(queued_at, default=None)
        assignment = list(consumer.assignment())
        now = time.monotonic()
        if assignment and now - self._ends_at > END_OFFSETS_TTL:
            self._ends_at = now
            with contextlib.suppress(KafkaError), kafka_errors("reading jobs end offsets"):
                self._ends = await consumer.end_offsets(assignment)
        for tp in assignment:
            tracked = offsets.get(tp)
            end = consumer.highwater(tp) or self._ends.get(tp)
            if tracked is None or end is None:
                continue
            position = next(iter(tracked.pending), None)
            if position is None:
                with contextlib.suppress(KafkaError), kafka_errors("reading a position"):
                    position = await consumer.position(tp)
            if position is not None:
                lag = max(end - position, 0)
                self._metrics.jobs_lag.labels(partition=str(tp.partition)).set(lag)
        self._metrics.jobs_lag_seconds.set(0 if oldest is None else max(time.time() - oldest, 0))

    def forget(self, tp: TopicPartition) -> None:
        """Stop reporting a partition that left this pod: its new owner reports its lag now."""
        with contextlib.suppress(KeyError):
            self._metrics.jobs_lag.remove(str(tp.partition))
