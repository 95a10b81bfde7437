"""The jobs consumer's rebalance listener: what the worker does when the group moves its
partitions.

Revoked partitions: their jobs in flight finish within the drain timeout or are abandoned
(uncommitted: the new owner redoes them), the finished jobs' offsets are committed (not left to
the commit linger), and everything this pod kept for them goes (offsets, exactly-once producers,
lag series, parked batches).  Assigned partitions: their state starts
restoring, their offsets are tracked, their exactly-once producers start, and their waiting
batches are adopted once restored.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from forwarder.errors import KafkaError
from forwarder.lag import LagReporter
from forwarder.offsets import JobsLedger, PartitionOffsets
from forwarder.parking import Parking
from forwarder.producers import TransactionalProducers
from forwarder.store import StateStore

# The worker's events: a filter on the logger name keeps finding them.
log = structlog.get_logger("forwarder.worker")


async def finish_or_abandon(tasks: list[asyncio.Task[None]], grace: float, event: str) -> None:
    """Let ``tasks`` finish for ``grace`` s, then cancel the late ones and log ``event``."""
    _, late = await asyncio.wait(tasks, timeout=grace)
    for task in late:
        task.cancel()
    if late:
        # Uncommitted: the partition's next owner redoes them (at-least-once: duplicates).
        log.warning(event, batches=len(late), timeout_s=grace)
        await asyncio.wait(late)


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """The worker's rebalance listener; ``jobs`` is the worker's bookkeeping, which it updates."""

    def __init__(
        self,
        *,
        store: StateStore,
        parking: Parking,
        lag: LagReporter,
        txn: TransactionalProducers | None,
        jobs: JobsLedger,
        grace: float,
    ) -> None:
        self._store = store
        self._parking = parking
        self._lag = lag
        self._txn = txn
        self._jobs = jobs
        self._grace = grace
        self.assigned = asyncio.Event()  # joined the group (possibly with no partitions)

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish (within the drain timeout) or abandon the jobs of partitions leaving us."""
        revoked_set = set(revoked)
        if mine := self._jobs.running(revoked_set):
            await finish_or_abandon(mine, self._grace, "rebalance_abandoned")
        if self._jobs.commits is not None:
            # The finished jobs' offsets commit while the partitions are still ours.
            await self._jobs.commits.flush()
        for tp in revoked_set:
            self._jobs.forget(tp)
            self._lag.forget(tp)
            if self._txn is not None:
                await self._txn.discard(tp)
        self._parking.release(revoked_set)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """Start restoring the state of the partitions now ours (each job waits for its own
        partition's), track them, and adopt their waiting batches once restored."""
        await self._store.own([tp.partition for tp in assigned])
        for tp in assigned:
            self._jobs.offsets.setdefault(tp, PartitionOffsets())
            if self._txn is not None:
                with contextlib.suppress(KafkaError):  # logged; run_job tries again
                    await self._txn.get(tp)
        self._parking.adopt(assigned)
        self.assigned.set()
