"""The worker's offsets bookkeeping: which jobs of a partition are in flight, and how far its
offset may be committed (:class:`PartitionOffsets`); the jobs running and the partitions' offsets
together (:class:`JobsLedger`, shared by the worker and its rebalance listener); the consumer's
commits of finished jobs, gathered so that one request carries the jobs that finish close together
(:class:`GroupCommit`, flushed by a revocation and by the worker's stop); and one lock per batch
(:class:`KeyedLock`), so that two jobs of one batch never run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field

from aiokafka import TopicPartition

#: A job in flight: its partition, its offset and when it was queued (epoch s).
InFlight = tuple[TopicPartition, int, float]


class PartitionOffsets:
    """Offsets of one partition's jobs in flight; the committable offset is the oldest
    unfinished one."""

    def __init__(self) -> None:
        self.pending: dict[int, bool] = {}  # offset -> finished (insertion order = offset order)
        self.committed = -1

    def add(self, offset: int) -> None:
        """A job at ``offset`` started."""
        self.pending[offset] = False

    def peek(self, offset: int) -> int | None:
        """The offset :meth:`finish` would commit if ``offset`` finished now (None if it would
        not move): what an exactly-once transaction may commit without skipping an older job
        still running."""
        commit = None
        for pending_offset, finished in self.pending.items():
            if not (finished or pending_offset == offset):
                break
            commit = pending_offset + 1
        return commit if commit is not None and commit > self.committed else None

    def finish(self, offset: int) -> int | None:
        """Mark done; return the new offset to commit, if it moved."""
        if offset in self.pending:
            self.pending[offset] = True
        commit = None
        for pending_offset in list(self.pending):
            if not self.pending[pending_offset]:
                break
            del self.pending[pending_offset]
            commit = pending_offset + 1
        if commit is not None and commit > self.committed:
            self.committed = commit
            return commit
        return None


@dataclass
class JobsLedger:
    """The jobs this worker runs and the offsets of the partitions it owns."""

    tasks: dict[asyncio.Task[None], InFlight] = field(default_factory=dict)
    offsets: dict[TopicPartition, PartitionOffsets] = field(default_factory=dict)
    # Exactly-once: the highest offset of each partition a transaction committed.
    in_transactions: dict[TopicPartition, int] = field(default_factory=dict)
    #: The consumer's commits of finished jobs (the worker's; None: nothing to flush).
    commits: GroupCommit | None = None

    def running(
        self, partitions: Collection[TopicPartition] | None = None
    ) -> list[asyncio.Task[None]]:
        """The jobs not finished yet (of ``partitions`` only, if given)."""
        return [
            task
            for task, (tp, _, _) in self.tasks.items()
            if not task.done() and (partitions is None or tp in partitions)
        ]

    def committed_in_transaction(self, tp: TopicPartition, commit: int) -> None:
        """Exactly-once: a transaction committed ``tp``'s offset ``commit`` with its batch."""
        self.in_transactions[tp] = max(commit, self.in_transactions.get(tp, -1))

    def in_transaction(self, tp: TopicPartition, commit: int) -> bool:
        """True when a transaction already committed ``tp`` as far as ``commit``."""
        return commit <= self.in_transactions.get(tp, -1)

    def forget(self, tp: TopicPartition) -> None:
        """Drop the offsets of a partition that left this pod (its new owner commits them)."""
        self.offsets.pop(tp, None)
        self.in_transactions.pop(tp, None)


#: How long a finished job's offset waits for other jobs' before one commit request carries them
#: all.  Under load one commit (a request and its answer: a few hundred microseconds of CPU) then
#: serves several jobs; a crash in the window only redoes jobs whose state records are written
#: already, which the state store reports as duplicates.  (A drain or a revocation does not wait
#: it out: they flush.)
COMMIT_LINGER = 0.05


class GroupCommit:
    """Commits of finished jobs' offsets, gathered for :data:`COMMIT_LINGER` and sent as one.

    ``commit`` sends one mapping of partition to offset (and handles its own failures); at most
    one is in flight at a time, so a partition's commits reach the broker in offset order.  A
    finished job only queues its offset (:meth:`add`): it does not wait, so that it frees its
    place in the worker at once.  Whoever needs the offsets committed before going on (partitions
    leaving this pod, the worker stopping) calls :meth:`flush`.
    """

    def __init__(
        self,
        commit: Callable[[dict[TopicPartition, int]], Awaitable[None]],
        linger: float = COMMIT_LINGER,
    ) -> None:
        self._commit = commit
        self._linger = linger
        self._pending: dict[TopicPartition, int] = {}
        self._next: asyncio.Task[None] | None = None  # the flush the pending offsets wait for
        self._sending = asyncio.Lock()

    def add(self, tp: TopicPartition, offset: int) -> None:
        """Commit ``tp`` up to ``offset`` within the linger, with what else finishes meanwhile."""
        self._pending[tp] = max(offset, self._pending.get(tp, -1))
        if self._next is None:
            self._next = asyncio.create_task(self._flush_later(), name="jobs-commit")

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._linger)
        async with self._sending:
            offsets, self._pending, self._next = self._pending, {}, None
            await self._commit(offsets)

    async def flush(self) -> None:
        """Send what is pending now, and return once it (and any commit in flight) is answered."""
        if self._next is not None:
            # Still waiting out the linger (or for the commit in flight): what it would send
            # goes now, below.
            self._next.cancel()
            self._next = None
        async with self._sending:
            offsets, self._pending = self._pending, {}
            if offsets:
                await self._commit(offsets)


class KeyedLock:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold ``key``'s lock for the block."""
        entry = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
