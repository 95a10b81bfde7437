"""Parking (``forwarder.parking``): the timers of batches Datagrid has not finished yet."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from forwarder.jobs import Job
from forwarder.observability import Metrics
from forwarder.parking import Parking
from forwarder.state import BatchState, Status


class _Store:
    """The two things parking reads from the state store, in memory."""

    def __init__(self, waiting: list[BatchState]) -> None:
        self._waiting = waiting
        self.restored: list[int] = []

    async def restored_partition(self, partition: int) -> None:
        self.restored.append(partition)

    def waiting(self) -> list[BatchState]:
        return self._waiting


def _parking(
    waiting: list[BatchState] | None = None,
) -> tuple[Parking, list[Job], CollectorRegistry, _Store]:
    reruns: list[Job] = []

    async def rerun(job: Job) -> None:
        reruns.append(job)

    metrics, store = Metrics(process=False), _Store(waiting or [])
    parking = Parking(
        store,  # type: ignore[arg-type]
        metrics,
        rerun=rerun,
        jobs_partition=lambda batch_id: TopicPartition("jobs", int(batch_id[-1])),
        poll_cap=30.0,
    )
    return parking, reruns, metrics.registry, store


def _waiting(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("forwarder_batches_waiting")


async def test_parking_replaces_an_older_waiter_and_updates_the_gauge() -> None:
    """A batch parked twice has one timer (the first is cancelled); the gauge counts batches."""
    parking, reruns, registry, _ = _parking()
    parking.park(Job("b0"), 60)
    first = asyncio.all_tasks() - {asyncio.current_task()}
    parking.park(Job("b0"), 60)
    parking.park(Job("b1"), 60)
    await asyncio.sleep(0)
    assert len(parking) == 2 and "b0" in parking and _waiting(registry) == 2
    assert all(task.cancelled() for task in first)
    parking.cancel()
    assert len(parking) == 0 and reruns == []


async def test_a_timer_that_fires_reruns_the_job_and_leaves_the_gauge() -> None:
    """When its delay has passed, the job runs again and the batch is no longer parked."""
    parking, reruns, registry, _ = _parking()
    parking.schedule(Job("b0"), checks=1, batch_status="in_progress")
    assert _waiting(registry) == 1
    parking.park(Job("b0"), 0.0)  # the next step, now
    for _ in range(5):
        await asyncio.sleep(0)
    assert reruns == [Job("b0")] and len(parking) == 0 and _waiting(registry) == 0


async def test_release_drops_only_the_revoked_partitions_timers() -> None:
    """A rebalance taking partition 1 away cancels the timers of its batches, not partition 2's."""
    parking, _, registry, _ = _parking()
    parking.park(Job("a1"), 60)
    parking.park(Job("b2"), 60)
    parking.release({TopicPartition("jobs", 1)})
    assert "a1" not in parking and "b2" in parking and _waiting(registry) == 1
    parking.cancel()


async def test_adoption_parks_the_restored_waiting_batches_once() -> None:
    """Assigned partitions are awaited restored, then each waiting batch not parked yet is parked
    now (delay 0), keeping its source and event id."""
    waiting = [
        BatchState(batch_id="w1", status=Status.WAITING, source="webhook", event_id="e1"),
        BatchState(batch_id="w2", status=Status.WAITING),
    ]
    parking, reruns, _, store = _parking(waiting)
    parking.park(Job("w2", source="webhook"), 60)  # already parked here: kept as it is
    parking.adopt([TopicPartition("jobs", 1), TopicPartition("jobs", 2)])
    for _ in range(5):
        await asyncio.sleep(0)
    assert store.restored == [1, 2]
    assert reruns == [Job("w1", source="webhook", event_id="e1")]
    assert "w2" in parking
    parking.cancel()


async def test_a_drain_cancels_every_adoption_still_running() -> None:
    """Two rebalances in a row start two adoptions, both waiting for a restore: cancel() stops
    both (one left pending would be destroyed with the loop, an error at shutdown)."""
    never = asyncio.Event()

    class _Slow(_Store):
        async def restored_partition(self, partition: int) -> None:
            await never.wait()

    parking = Parking(
        _Slow([]),  # type: ignore[arg-type]
        Metrics(process=False),
        rerun=lambda job: asyncio.sleep(0),
        jobs_partition=lambda batch_id: None,
        poll_cap=60,
    )
    parking.adopt([TopicPartition("jobs", 1)])
    parking.adopt([TopicPartition("jobs", 2)])
    await asyncio.sleep(0)
    adoptions = [t for t in asyncio.all_tasks() if t.get_name() == "adopt"]
    assert len(adoptions) == 2
    parking.cancel()
    await asyncio.wait(adoptions, timeout=5)
    assert all(task.cancelled() for task in adoptions)
