"""Lag reporting (``forwarder.lag``): the lag gauges, from an in-memory consumer."""

from __future__ import annotations

import time

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from forwarder.lag import LagReporter
from forwarder.observability import Metrics
from forwarder.offsets import PartitionOffsets

TP0, TP1 = TopicPartition("jobs", 0), TopicPartition("jobs", 1)


class _Consumer:
    """What the reporter asks the jobs consumer: assignment, high-water marks, end offsets and
    positions (counting the end-offset reads)."""

    def __init__(
        self, highwater: dict[TopicPartition, int | None], ends: dict[TopicPartition, int]
    ) -> None:
        self._highwater, self._ends = highwater, ends
        self.positions: dict[TopicPartition, int] = {}
        self.end_reads = 0

    def assignment(self) -> set[TopicPartition]:
        return set(self._highwater)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._highwater[tp]

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.end_reads += 1
        return {tp: self._ends[tp] for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


def _lag(registry: CollectorRegistry, partition: int) -> float | None:
    return registry.get_sample_value("forwarder_jobs_lag", {"partition": str(partition)})


async def test_lag_counts_from_the_oldest_unfinished_offset() -> None:
    """With jobs in flight, a partition's lag is its end less the oldest unfinished job, and the
    lag in seconds is the age of the oldest job queued."""
    metrics = Metrics(process=False)
    offsets = PartitionOffsets()
    for offset in (4, 6):
        offsets.add(offset)
    offsets.finish(6)  # finished, but 4 still runs
    consumer = _Consumer({TP0: 10}, {TP0: 10})
    await LagReporter(metrics).update(consumer, {TP0: offsets}, [time.time() - 30, time.time()])  # type: ignore[arg-type]
    assert _lag(metrics.registry, 0) == 6
    age = metrics.registry.get_sample_value("forwarder_jobs_lag_seconds")
    assert age is not None and 29 <= age < 40


async def test_lag_without_jobs_uses_the_position_and_cached_end_offsets() -> None:
    """With nothing in flight the position counts; without a high-water mark the end offset read
    from the broker does, read again only after a few seconds; unassigned partitions (no offsets
    tracked) are not reported."""
    metrics = Metrics(process=False)
    consumer = _Consumer({TP0: None, TP1: 3}, {TP0: 12, TP1: 3})
    consumer.positions[TP0] = 9
    reporter = LagReporter(metrics)
    for _ in range(3):
        await reporter.update(consumer, {TP0: PartitionOffsets()}, [])  # type: ignore[arg-type]
    assert _lag(metrics.registry, 0) == 3 and _lag(metrics.registry, 1) is None
    assert consumer.end_reads == 1
    assert metrics.registry.get_sample_value("forwarder_jobs_lag_seconds") == 0
    reporter.forget(TP0)
    reporter.forget(TP1)  # never reported: nothing to remove, no error
    assert _lag(metrics.registry, 0) is None


async def test_jobs_finishing_while_the_lag_is_read_break_nothing() -> None:
    """The queued times are taken before the reporter awaits the broker: a job that finishes
    meanwhile (its entry popped from the worker's dict) cannot break the worker's poll loop
    (it did: "dictionary changed size during iteration" ended the loop in a rolling restart)."""
    running = {"job-1": time.time() - 5, "job-2": time.time() - 1}

    class _Finishing(_Consumer):
        async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            running.pop("job-1")  # a job's done callback runs during this await
            return await super().end_offsets(tps)

    metrics = Metrics(process=False)
    consumer = _Finishing({TP0: 10}, {TP0: 10})
    consumer.positions[TP0] = 8
    queued = (at for at in running.values())  # a view of the live dict, as the worker passes
    await LagReporter(metrics).update(consumer, {TP0: PartitionOffsets()}, queued)  # type: ignore[arg-type]
    age = metrics.registry.get_sample_value("forwarder_jobs_lag_seconds")
    assert age is not None and 4 <= age < 15  # the oldest when the poll ended
    assert _lag(metrics.registry, 0) == 2
