"""The state store: the latest state of the batches whose jobs partitions this pod owns.

The state topic is co-partitioned with the jobs topic, so each pod restores only its own
partitions' state (``StateStore.own`` on every rebalance) and follows it; that is what makes
"forward each batch once" hold across restarts, rebalances and pods, with memory that grows with
what a pod owns.  The states themselves are held in a ``statemap.StateMap``; this module follows
the topic into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from forwarder.config import Settings
from forwarder.errors import KAFKA_BACKOFF, ConfigError, KafkaError
from forwarder.health import Health
from forwarder.kafka import kafka_errors, make_reader
from forwarder.observability import Metrics
from forwarder.retry import Policy, retry
from forwarder.state import BatchState
from forwarder.statemap import StateMap, decode_state
from forwarder.topics import topic_partitions

log = structlog.get_logger("forwarder.store")

#: Records taken from the follower at a time.  The consumer buffers what it fetched as raw
#: bytes and makes the records' objects as they are taken: all of them at once (six partitions'
#: fetches, ~14,000 records) spread those small objects over a dozen more CPython arenas, which
#: stayed resident, partly used, after the restore.
_RECORDS = 1000


class StateStore:
    """The state of the batches this pod owns, restored from the state topic and followed.

    The state topic is co-partitioned with the jobs topic (same partition count, keyed by batch
    id, Kafka's murmur2 partitioner), so state partition ``p`` holds the batches whose jobs go to
    jobs partition ``p``.  :meth:`own` restores the partitions a rebalance gives this pod before
    their jobs run and drops the ones it took away: memory grows with what a pod owns, not with
    the group's history.  :meth:`find` reads any other batch's partition from the broker.
    """

    def __init__(self, settings: Settings, metrics: Metrics, health: Health | None = None) -> None:
        self._settings = settings
        self._health = health
        self._topic = settings.state_topic
        self._map = StateMap(metrics, settings.state_retention_hours)
        self._consumer: AIOKafkaConsumer | None = None
        # End offsets come from a second client: on the follower's own connection a ListOffsets
        # request queues behind its idle fetch (a long poll of fetch_max_wait_ms, 500 ms), which
        # made every sync(), so every job, wait half a second.
        self._end_reader: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Condition()
        self._restoring: dict[int, _Restore] = {}  # partitions being read up to their end
        self.assigned = False  # own() was called: the worker joined its group

    # --- the map (statemap.StateMap), as the worker, the reconciler and the API read it -------
    @property
    def owned(self) -> list[int]:
        """The partitions whose state this pod holds."""
        return self._map.partitions

    def owns(self, batch_id: str) -> bool:
        """True when ``batch_id``'s partition is this pod's."""
        return self._map.owns(batch_id)

    def get(self, batch_id: str) -> BatchState | None:
        """The latest state of ``batch_id`` if this pod owns it (None: unknown or not ours)."""
        return self._map.get(batch_id)

    def put(self, state: BatchState) -> None:
        """Remember a state this process just wrote (the topic will echo it later)."""
        self._map.put(state)

    def waiting(self) -> list[BatchState]:
        """Owned batches parked until Datagrid finishes them."""
        return self._map.waiting()

    # --- following the state topic ---------------------------------------------------------
    async def start(self) -> None:
        """Connect, and check that the state topic is co-partitioned with the jobs topic."""
        settings = self._settings
        self._consumer = make_reader(settings)
        self._end_reader = make_reader(settings)  # its end offsets are the LSO too
        with kafka_errors("reading the state topic"):
            await self._consumer.start()
            await self._end_reader.start()
        state = await topic_partitions(settings, self._topic)
        jobs = await topic_partitions(settings, settings.jobs_topic)
        if not state:
            raise KafkaError(f"state topic {self._topic} has no partitions")
        if len(state) != len(jobs):
            raise ConfigError(
                f"state topic {self._topic} has {len(state)} partitions and jobs topic "
                f"{settings.jobs_topic} has {len(jobs)}: they must have the same number, as each "
                "pod keeps the state of its own jobs partitions (create the state topic with "
                f"{len(jobs)} partitions and name it in FORWARDER_STATE_TOPIC)"
            )
        self._map.partition_count = len(state)

    async def own(self, partitions: Collection[int]) -> None:
        """Hold exactly ``partitions`` (this pod's jobs partitions after a rebalance): drop the
        others, and restore the new ones from the beginning of the state topic in the background
        (:meth:`restored` waits for one), so a rebalance is never held up by a restore that the
        next one may make useless.  Retries while Kafka fails."""
        await retry(
            lambda: self._reassign(set(partitions)),
            Policy("state_restore_failed", KAFKA_BACKOFF),
            health=self._health,
            component="state_topic",
        )

    async def _reassign(self, wanted: set[int]) -> None:
        consumer, end_reader = self._consumer, self._end_reader
        assert consumer is not None and end_reader is not None
        held = set(self._map.partitions)
        added, dropped = wanted - held, held - wanted
        self.assigned = True
        if not added and not dropped:
            return
        await self._stop_following()
        tps = {p: TopicPartition(self._topic, p) for p in wanted}
        # Nothing held changes before this succeeds: a retry finds the same partitions to add
        # and to drop, and starts following again.
        with kafka_errors("assigning state partitions"):
            # assign() forgets positions: the partitions kept resume where they were.
            kept = {p: await consumer.position(tps[p]) for p in wanted - added}
            consumer.assign(list(tps.values()))
            for p, position in kept.items():
                consumer.seek(tps[p], position)
            if added:
                await consumer.seek_to_beginning(*(tps[p] for p in added))
                ends = await end_reader.end_offsets([tps[p] for p in added])
        for p in dropped:
            self._map.drop(p)
            self._restoring.pop(p, None)
        for p in added:
            self._map.hold(p)
            self._restoring[p] = _Restore(ends[tps[p]], time.monotonic())
        if wanted:
            self._task = asyncio.create_task(self._follow(), name="state-store")
        if dropped:
            _release_memory()
        log.info("state_partitions", partitions=sorted(wanted), added=sorted(added))

    @property
    def loaded(self) -> bool:
        """True once the state of every partition this pod owns is restored."""
        return self.assigned and not self._restoring

    async def restored(self, batch_id: str) -> None:
        """Wait until the state of ``batch_id``'s partition is restored, if this pod owns it."""
        await self.restored_partition(self._map.partition_of(batch_id))

    async def restored_partition(self, partition: int) -> None:
        """Wait until the state of ``partition`` is restored, if this pod owns it."""
        restore = self._restoring.get(partition)
        if restore is not None:
            await restore.done.wait()

    async def _check_restores(self) -> None:
        assert self._consumer is not None
        restoring = bool(self._restoring)
        for p, restore in list(self._restoring.items()):
            if await self._consumer.position(TopicPartition(self._topic, p)) >= restore.end:
                del self._restoring[p]
                restore.done.set()
                log.info(
                    "state_restored",
                    partition=p,
                    batches=self._map.size(p),
                    duration_s=round(time.monotonic() - restore.started, 3),
                )
        if restoring and not self._restoring:
            # The restore's garbage (fetched batches, the buffers the states outgrew) goes back.
            _release_memory()

    async def find(self, batch_id: str) -> BatchState | None:
        """The latest state of any batch: from memory if this pod owns it, else read from its
        state partition on the broker (a scan of that one partition)."""
        partition = self._map.partition_of(batch_id)
        if self._map.holds(partition):
            await self.restored(batch_id)
            await self.sync()
            return self.get(batch_id)
        return await _read_latest(self._settings, TopicPartition(self._topic, partition), batch_id)

    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None

        async def poll() -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
            with kafka_errors("following the state topic"):
                batches: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]
                batches = await consumer.getmany(timeout_ms=500, max_records=_RECORDS)
                return batches

        while True:  # until cancelled (a rebalance, or stop)
            batches = await retry(
                poll,
                Policy("state_store_read_failed", KAFKA_BACKOFF),
                health=self._health,
                component="state_topic",
            )
            for records in batches.values():
                for record in records:
                    self._map.apply(record)
            with contextlib.suppress(KafkaError), kafka_errors("reading state positions"):
                await self._check_restores()
            if time.monotonic() - self._map.pruned_at > 60:
                self._map.prune()
            self._map.update_gauge()
            async with self._progress:
                self._progress.notify_all()

    async def sync(self, within: float = 30.0) -> None:
        """Wait until everything written to the owned state partitions before this call has been
        read."""
        consumer, end_reader = self._consumer, self._end_reader
        assert consumer is not None and end_reader is not None
        owned = [TopicPartition(self._topic, p) for p in self._map.partitions]
        if not owned:
            return
        with kafka_errors("reading state topic offsets"):
            ends = await end_reader.end_offsets(owned)
        deadline = time.monotonic() + within
        while True:
            with kafka_errors("reading state topic positions"):
                behind = [tp for tp, end in ends.items() if await consumer.position(tp) < end]
            if not behind:
                return
            if time.monotonic() > deadline:
                raise KafkaError("timed out reading the state topic")
            async with self._progress:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), 0.5)

    async def _stop_following(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def stop(self) -> None:
        """Stop following (safe to call twice)."""
        await self._stop_following()
        for client in (self._consumer, self._end_reader):
            if client is not None:
                await client.stop()
        self._consumer = self._end_reader = None


@dataclass
class _Restore:
    """A partition being restored: the end offset to reach, and when it started."""

    end: int
    started: float
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def _read_latest(settings: Settings, tp: TopicPartition, batch_id: str) -> BatchState | None:
    """The latest state of ``batch_id`` in state partition ``tp``, read from its beginning by a
    client of its own (the follower reads only this pod's partitions)."""
    key, found = batch_id.encode(), None
    reader = make_reader(settings)
    try:
        with kafka_errors(f"reading the state of {batch_id}"):
            await reader.start()
            reader.assign([tp])
            await reader.seek_to_beginning(tp)
            end = (await reader.end_offsets([tp]))[tp]
            while await reader.position(tp) < end:
                for records in (await reader.getmany(tp, timeout_ms=1000)).values():
                    for record in records:
                        if record.key == key:
                            found = record.value
    finally:
        await reader.stop()
    return decode_state(found, batch_id) if found is not None else None


def _release_memory() -> None:
    """Hand the memory of dropped partitions back to the system.  Their buffers are large
    allocations: those glibc served by ``mmap`` go back when freed, those it served from its heap
    (glibc raises its mmap threshold after freeing a large block, up to 32 MB) only when trimmed;
    the collection frees whatever a cycle still held of the partitions' restore."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
