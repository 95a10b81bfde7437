"""A batch's forwarding state, its transitions, and the store that remembers it.

:class:`BatchState` is the state topic's value and the body of ``GET /v1/batches/{id}``; its
status is a :class:`Status`, and each transition has a named constructor or method.
:class:`StateStore` holds the latest state of the batches whose jobs partitions this pod owns
(the state topic is co-partitioned with the jobs topic), which makes "forward each batch once"
hold across restarts, rebalances and pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Collection
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from forwarder.config import Settings
from forwarder.errors import KAFKA_BACKOFF, BatchNotReady, ConfigError, ForwarderError, KafkaError
from forwarder.kafka import kafka_errors, make_reader, partition_for, topic_partitions
from forwarder.observability import Metrics

log = structlog.get_logger("forwarder.state")


def utcnow() -> str:
    """Current time as an ISO-8601 UTC string with milliseconds."""
    return iso(datetime.now(UTC))


def iso(when: datetime) -> str:
    """``when`` as an ISO-8601 UTC string with milliseconds and a ``Z``."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object) -> datetime | None:
    """An ISO-8601 timestamp (``Z`` or an offset) as an aware datetime; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def is_past(value: object) -> bool:
    """True when ``value`` is a timestamp before now (False when it is not a timestamp)."""
    when = parse_time(value)
    return when is not None and when < datetime.now(UTC)


class Status(StrEnum):
    """Where a batch stands."""

    FORWARDING = "forwarding"
    WAITING = "waiting"  # Datagrid has not finished it: parked, re-checked on a timer
    FORWARDED = "forwarded"  # every result line is on the results or the dead-letter topic
    FAILED = "failed"


class BatchState(msgspec.Struct, kw_only=True):
    """A batch's forwarding state: the state topic's value and ``GET /v1/batches/{id}``."""

    batch_id: str
    status: Status
    lines: dict[str, int] = msgspec.field(default_factory=dict)
    dead_letters: dict[str, int] = msgspec.field(default_factory=dict)
    blank_lines: int = 0
    expected_lines: int | None = None
    attempts: int = 0
    stream_restarts: int = 0
    batch_status: str | None = None
    source: str | None = None
    event_id: str | None = None
    delivery: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    terminal_at: str | None = None
    error: dict[str, Any] | None = None

    @classmethod
    def forwarding(
        cls, batch_id: str, *, source: str, event_id: str | None, delivery: str
    ) -> BatchState:
        """A batch whose forwarding starts now."""
        return cls(
            batch_id=batch_id,
            status=Status.FORWARDING,
            source=source,
            event_id=event_id,
            delivery=delivery,
            started_at=utcnow(),
        )

    @classmethod
    def waiting(
        cls,
        batch_id: str,
        *,
        source: str,
        event_id: str | None,
        not_ready: BatchNotReady,
        checks: int,
    ) -> BatchState:
        """A batch that Datagrid has not finished yet, checked ``checks`` times so far; or, once
        its ``expires_at`` has passed (Datagrid will never finish it), a failed one."""
        expires_at = (not_ready.problem or {}).get("expires_at")
        state = cls(
            batch_id=batch_id,
            status=Status.WAITING,
            source=source,
            event_id=event_id,
            batch_status=not_ready.batch_status,
            attempts=checks,
            started_at=utcnow(),
            error={"code": "batch_not_ready", "detail": str(not_ready), "expires_at": expires_at},
        )
        if is_past(expires_at):
            state.fail(not_ready)
            state.error = {
                "code": "batch_expired_unfinished",
                "detail": f"batch still {not_ready.batch_status!r} after expires_at {expires_at}",
            }
        return state

    def fail(self, exc: BaseException) -> None:
        """Mark the batch ``failed`` because of ``exc`` (its code, detail and upstream problem)."""
        self.status = Status.FAILED
        self.finished_at = utcnow()
        if isinstance(exc, ForwarderError):
            problem = dict(getattr(exc, "problem", None) or {})
            self.error = {
                "code": exc.code,
                "detail": str(exc),
                "upstream_status": getattr(exc, "status", None),
                "problem": problem or None,
            }
        else:
            self.error = {"code": "internal_error", "detail": f"{type(exc).__name__}: {exc}"}

    @property
    def done(self) -> bool:
        """Forwarded: a new job for this batch is a duplicate (unless it is a replay)."""
        return self.status is Status.FORWARDED

    def encode(self) -> bytes:
        """The JSON record written to the state topic."""
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> BatchState:
        """Read a state-topic record."""
        return msgspec.json.decode(data, type=cls)


class StateStore:
    """The state of the batches this pod owns, restored from the state topic and followed.

    The state topic is co-partitioned with the jobs topic (same partition count, keyed by batch
    id, Kafka's murmur2 partitioner), so state partition ``p`` holds the batches whose jobs go to
    jobs partition ``p``.  :meth:`own` restores the partitions a rebalance gives this pod before
    their jobs run and drops the ones it took away: memory grows with what a pod owns, not with
    the group's history.  :meth:`find` reads any other batch's partition from the broker.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._topic = settings.state_topic
        # By state partition: batch id -> (record timestamp in ms, the record's JSON). Kept
        # encoded (about half the memory of decoded states) and decoded when read.
        self._states: dict[int, dict[str, tuple[int, bytes]]] = {}
        self._partition_count = 0
        self._consumer: AIOKafkaConsumer | None = None
        # End offsets come from a second client: on the follower's own connection a ListOffsets
        # request queues behind its idle fetch (a long poll of fetch_max_wait_ms, 500 ms), which
        # made every sync(), so every job, wait half a second.
        self._end_reader: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Condition()
        self._retention = settings.state_retention_hours * 3600.0
        self._pruned_at = time.monotonic()
        self.ready = asyncio.Event()  # the state of the first assignment is restored

    def partition_of(self, batch_id: str) -> int:
        """The state (and jobs) partition of ``batch_id``."""
        return partition_for(batch_id.encode(), self._partition_count)

    @property
    def owned(self) -> list[int]:
        """The partitions whose state this pod holds."""
        return sorted(self._states)

    def owns(self, batch_id: str) -> bool:
        """True when ``batch_id``'s partition is this pod's."""
        return bool(self._partition_count) and self.partition_of(batch_id) in self._states

    def get(self, batch_id: str) -> BatchState | None:
        """The latest state of ``batch_id`` if this pod owns it (None: unknown or not ours)."""
        held = self._states.get(self.partition_of(batch_id)) if self._partition_count else None
        entry = held.get(batch_id) if held is not None else None
        return _decode(entry[1], batch_id) if entry is not None else None

    def put(self, state: BatchState) -> None:
        """Remember a state this process just wrote (the topic will echo it later)."""
        if self.owns(state.batch_id):
            entry = (int(time.time() * 1000), state.encode())
            self._states[self.partition_of(state.batch_id)][state.batch_id] = entry
            self._count()

    def waiting(self) -> list[BatchState]:
        """Owned batches parked until Datagrid finishes them."""
        found = []
        for held in self._states.values():
            for batch_id, (_, value) in held.items():
                if _WAITING in value:  # a cheap filter; the decoded status decides
                    state = _decode(value, batch_id)
                    if state is not None and state.status is Status.WAITING:
                        found.append(state)
        return found

    def __len__(self) -> int:
        return sum(len(held) for held in self._states.values())

    def _count(self) -> None:
        self._metrics.state_batches.set(len(self))

    def prune(self, now: datetime | None = None) -> int:
        """Forget finished batches whose state was written longer than the retention ago (as the
        broker's ``retention.ms`` counts); waiting and forwarding ones stay.  Returns how many
        were forgotten."""
        self._pruned_at = time.monotonic()
        cutoff = ((now or datetime.now(UTC)).timestamp() - self._retention) * 1000
        forgotten = 0
        for held in self._states.values():
            old = [
                batch_id
                for batch_id, (written, value) in held.items()
                if written < cutoff and _UNFINISHED not in value and _WAITING not in value
            ]
            for batch_id in old:
                del held[batch_id]
            forgotten += len(old)
        self._count()
        return forgotten

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
        self._partition_count = len(state)

    async def own(self, partitions: Collection[int]) -> None:
        """Hold exactly ``partitions`` (this pod's jobs partitions after a rebalance): restore the
        new ones from the beginning of the state topic, drop the others, then keep following.

        Returns only once restored, however long that takes (retrying while Kafka fails): the
        rebalance waits for it, so no job of these partitions runs without its batch's state.
        """
        for failures in itertools.count(1):
            try:
                await self._restore(set(partitions))
                break
            except KafkaError as exc:
                log.warning("state_restore_failed", error=str(exc))
                await asyncio.sleep(KAFKA_BACKOFF.delay(failures))
        self.ready.set()

    async def _restore(self, wanted: set[int]) -> None:
        consumer = self._consumer
        assert consumer is not None
        added, dropped = wanted - set(self._states), set(self._states) - wanted
        if not added and not dropped:
            return
        started = time.monotonic()
        await self._stop_following()
        tps = {p: TopicPartition(self._topic, p) for p in wanted}
        for p in dropped:
            del self._states[p]
        try:
            with kafka_errors("assigning state partitions"):
                # assign() forgets positions: the partitions kept resume where they were.
                kept = {p: await consumer.position(tps[p]) for p in wanted - added}
                consumer.assign(list(tps.values()))
                for p, position in kept.items():
                    consumer.seek(tps[p], position)
                if added:
                    await consumer.seek_to_beginning(*(tps[p] for p in added))
            for p in added:
                self._states[p] = {}
            if wanted:
                self._task = asyncio.create_task(self._follow(), name="state-store")
                await self.sync(within=None)
        except BaseException:
            for p in added:  # half restored: the next try starts them over
                self._states.pop(p, None)
            raise
        self.prune()
        log.info(
            "state_restored",
            partitions=sorted(wanted),
            added=sorted(added),
            dropped=sorted(dropped),
            batches=len(self),
            duration_s=round(time.monotonic() - started, 3),
        )

    async def find(self, batch_id: str) -> BatchState | None:
        """The latest state of any batch: from memory if this pod owns it, else read from its
        state partition on the broker (a scan of that one partition)."""
        partition = self.partition_of(batch_id)
        if partition in self._states:
            await self.sync()
            return self.get(batch_id)
        key, found = batch_id.encode(), None
        tp = TopicPartition(self._topic, partition)
        reader = make_reader(self._settings)
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
        return _decode(found, batch_id) if found is not None else None

    async def _follow(self) -> None:
        assert self._consumer is not None
        failures = 0
        while True:
            try:
                with kafka_errors("following the state topic"):
                    batches = await self._consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                failures += 1
                log.warning("state_store_read_failed", error=str(exc))
                await asyncio.sleep(KAFKA_BACKOFF.delay(failures))
                continue
            failures = 0
            for tp, records in batches.items():
                held = self._states.get(tp.partition)
                if held is not None:
                    for record in records:
                        _apply(held, record)
            if time.monotonic() - self._pruned_at > 60:
                self.prune()
            self._count()
            async with self._progress:
                self._progress.notify_all()

    async def sync(self, within: float | None = 30.0) -> None:
        """Wait until everything written to the owned state partitions before this call has been
        read (for at most ``within`` s; None: as long as it takes)."""
        consumer, end_reader = self._consumer, self._end_reader
        assert consumer is not None and end_reader is not None
        owned = [TopicPartition(self._topic, p) for p in self._states]
        if not owned:
            return
        with kafka_errors("reading state topic offsets"):
            ends = await end_reader.end_offsets(owned)
        deadline = time.monotonic() + within if within is not None else float("inf")
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


def _apply(held: dict[str, tuple[int, bytes]], record: ConsumerRecord[Any, Any]) -> None:
    if record.key is None:
        return
    batch_id = record.key.decode("utf-8", "replace")
    if record.value is None:  # tombstone: forget the batch
        held.pop(batch_id, None)
    else:
        held[batch_id] = (record.timestamp, record.value)


#: How the status of a waiting or a forwarding batch reads in its record (msgspec writes no spaces).
_WAITING = b'"status":"waiting"'
_UNFINISHED = b'"status":"forwarding"'


def _decode(value: bytes, batch_id: str) -> BatchState | None:
    try:
        return BatchState.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("state_record_unreadable", batch_id=batch_id)
        return None
