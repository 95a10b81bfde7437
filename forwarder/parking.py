"""Parking: batches that Datagrid has not finished yet wait on a timer, not in a slot.

A parked batch is a ``waiting`` state record (durable, written by the worker) plus, in the pod
owning its jobs partition, one timer task that runs its job again when it fires.  :class:`Parking`
holds those timers (at most one per batch), keeps ``forwarder_batches_waiting`` equal to their
number, drops the ones of partitions a rebalance takes away, and adopts the waiting batches of
partitions it gives (their timers were in the previous owner).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection

import structlog
from aiokafka import TopicPartition

from forwarder.errors import Backoff
from forwarder.jobs import Job
from forwarder.observability import Metrics
from forwarder.store import StateStore

# The worker's events: a filter on the logger name keeps finding them.
log = structlog.get_logger("forwarder.worker")


class Parking:
    """The timers of this pod's parked batches.

    ``rerun`` runs a job again when its timer fires (the worker's retrying runner);
    ``jobs_partition`` names a batch's jobs partition, for :meth:`release`.
    """

    def __init__(
        self,
        store: StateStore,
        metrics: Metrics,
        *,
        rerun: Callable[[Job], Awaitable[object]],
        jobs_partition: Callable[[str], TopicPartition | None],
        poll_cap: float,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._rerun = rerun
        self._jobs_partition = jobs_partition
        self._waiters: dict[str, asyncio.Task[None]] = {}
        # Adoptions still running: a rebalance soon after another starts one more, and every one
        # must be cancelled at a drain (a task left pending when the loop closes is an error).
        self._adopting: set[asyncio.Task[None]] = set()
        # Polls of a batch that is not terminal: 2, 4, 8 ... s, up to the poll setting.
        self._not_ready = Backoff(base=1.0, cap=poll_cap, jitter=0.2)

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._waiters

    def __len__(self) -> int:
        return len(self._waiters)

    def schedule(self, job: Job, checks: int, batch_status: str | None) -> None:
        """Park ``job``, checked ``checks`` times so far, for the next step of the backoff."""
        delay = self._not_ready.delay(checks + 1)
        log.info(
            "batch_waiting",
            batch_id=job.batch_id,
            batch_status=batch_status,
            next_check_s=round(delay, 2),
            checks=checks,
        )
        self.park(job, delay)

    def park(self, job: Job, delay: float) -> None:
        """Run ``job`` again in ``delay`` s, replacing the batch's earlier timer if any."""

        async def wake() -> None:
            await asyncio.sleep(delay)
            self._waiters.pop(job.batch_id, None)
            self._gauge()
            await self._rerun(job)

        old = self._waiters.pop(job.batch_id, None)
        if old is not None:
            old.cancel()
        self._waiters[job.batch_id] = asyncio.create_task(wake(), name=f"wait-{job.batch_id}")
        self._gauge()

    def release(self, revoked: Collection[TopicPartition]) -> None:
        """Drop the timers of batches whose jobs partition left this pod (its new owner adopts
        them)."""
        for batch_id, waiter in list(self._waiters.items()):
            if self._jobs_partition(batch_id) in revoked:
                waiter.cancel()
                del self._waiters[batch_id]
        self._gauge()

    def adopt(self, assigned: list[TopicPartition]) -> None:
        """Once the state of ``assigned`` is restored, park its waiting batches (in the
        background: a rebalance is not held up by a restore)."""
        # (an earlier adoption still running only parks batches this pod holds, once each)
        task = asyncio.create_task(self._adopt(assigned), name="adopt")
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _adopt(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            await self._store.restored_partition(tp.partition)
        for state in self._store.waiting():  # the store holds only this pod's batches
            if state.batch_id not in self._waiters:
                source = state.source or "producer"
                self.park(Job(state.batch_id, source=source, event_id=state.event_id), 0.0)

    def cancel(self) -> None:
        """Cancel every timer and any adoption (drain: the waiting records stay, and the
        partitions' next owner, or this pod restarted, adopts them)."""
        for waiter in [*self._waiters.values(), *self._adopting]:
            waiter.cancel()
        self._waiters.clear()

    def _gauge(self) -> None:
        self._metrics.batches_waiting.set(len(self._waiters))
