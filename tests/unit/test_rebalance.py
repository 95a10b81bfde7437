"""The rebalance listener (``forwarder.rebalance``): what the worker does when partitions move."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from forwarder.jobs import Job
from forwarder.lag import LagReporter
from forwarder.observability import Metrics
from forwarder.offsets import GroupCommit, JobsLedger, PartitionOffsets
from forwarder.parking import Parking
from forwarder.rebalance import Rebalance

TP0, TP1 = TopicPartition("jobs", 0), TopicPartition("jobs", 1)


class _Store:
    """The state store as the listener and parking use it: own() and restores, in memory."""

    def __init__(self) -> None:
        self.owned: list[list[int]] = []

    async def own(self, partitions: list[int]) -> None:
        self.owned.append(list(partitions))

    async def restored_partition(self, partition: int) -> None:
        return None

    def waiting(self) -> list[object]:
        return []


async def _nothing(job: Job) -> None:
    return None


def _listener(
    grace: float, commits: GroupCommit | None = None
) -> tuple[Rebalance, JobsLedger, Parking, _Store, Metrics]:
    metrics, store, jobs = Metrics(process=False), _Store(), JobsLedger(commits=commits)
    parking = Parking(
        store,  # type: ignore[arg-type]
        metrics,
        rerun=_nothing,
        jobs_partition=lambda batch_id: TopicPartition("jobs", int(batch_id[-1])),
        poll_cap=30.0,
    )
    lag = LagReporter(metrics)
    listener = Rebalance(
        store=store,  # type: ignore[arg-type]
        parking=parking,
        lag=lag,
        txn=None,
        jobs=jobs,
        grace=grace,
    )
    return listener, jobs, parking, store, metrics


async def test_assignment_restores_tracks_and_marks_the_worker_assigned() -> None:
    """Assigned partitions are handed to the store, get offsets tracked, and the worker counts as
    joined (even with no partitions)."""
    listener, jobs, _, store, _ = _listener(grace=1.0)
    await listener.on_partitions_assigned([])
    assert listener.assigned.is_set() and store.owned == [[]]
    await listener.on_partitions_assigned([TP0, TP1])
    assert store.owned[-1] == [0, 1] and set(jobs.offsets) == {TP0, TP1}


async def test_revocation_abandons_late_jobs_and_forgets_only_the_revoked_partition() -> None:
    """A revoked partition's job that outlives the grace is cancelled, its offsets, lag series and
    parked batches go; the other partition's job, offsets and parked batches stay."""
    listener, jobs, parking, _, metrics = _listener(grace=0.05)
    await listener.on_partitions_assigned([TP0, TP1])
    never = asyncio.Event()
    late, kept = asyncio.create_task(never.wait()), asyncio.create_task(never.wait())
    jobs.tasks.update({late: (TP0, 3, 0.0), kept: (TP1, 3, 0.0)})  # type: ignore[dict-item]
    jobs.offsets[TP0].add(3)
    jobs.committed_in_transaction(TP0, 2)
    for partition in ("0", "1"):
        metrics.jobs_lag.labels(partition=partition).set(5)
    parking.park(Job("p0"), 60)
    parking.park(Job("p1"), 60)
    await listener.on_partitions_revoked([TP0])
    await asyncio.sleep(0)
    assert late.cancelled() and not kept.done()
    assert list(jobs.offsets) == [TP1] and not jobs.in_transaction(TP0, 2)
    assert isinstance(jobs.offsets[TP1], PartitionOffsets)
    assert "p0" not in parking and "p1" in parking
    registry = metrics.registry
    assert registry.get_sample_value("forwarder_batches_waiting") == 1
    assert registry.get_sample_value("forwarder_jobs_lag", {"partition": "0"}) is None
    assert registry.get_sample_value("forwarder_jobs_lag", {"partition": "1"}) == 5
    kept.cancel()
    parking.cancel()
    await asyncio.gather(kept, return_exceptions=True)


async def test_revocation_commits_the_finished_jobs_while_the_partition_is_ours() -> None:
    """Offsets of finished jobs waiting out the commit linger are committed before the revoked
    partition is forgotten (its new owner then starts past them), not an hour later."""
    sent: list[tuple[dict[TopicPartition, int], set[TopicPartition]]] = []

    async def commit(offsets: dict[TopicPartition, int]) -> None:
        sent.append((offsets, set(jobs.offsets)))

    commits = GroupCommit(commit, linger=3600)
    listener, jobs, parking, _, _ = _listener(grace=1.0, commits=commits)
    await listener.on_partitions_assigned([TP0, TP1])
    commits.add(TP0, 4)
    await listener.on_partitions_revoked([TP0])
    assert sent == [({TP0: 4}, {TP0, TP1})]  # committed while TP0 was still tracked
    assert list(jobs.offsets) == [TP1]
    parking.cancel()
