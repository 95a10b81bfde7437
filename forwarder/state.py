"""A batch's forwarding state, its transitions, and the store that remembers it.

:class:`BatchState` is the state topic's value and the body of ``GET /v1/batches/{id}``; its
status is a :class:`Status`, and each transition has a named constructor or method.
:class:`StateStore` reads the compacted state topic into memory and follows it: every pod knows each
batch's latest state, which makes "forward each batch once" hold across restarts and pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from forwarder.config import Settings
from forwarder.errors import KAFKA_BACKOFF, BatchNotReady, ForwarderError, KafkaError
from forwarder.kafka import kafka_errors, make_reader, topic_partitions
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
        """A batch that Datagrid has not finished yet, checked ``checks`` times so far."""
        expires_at = (not_ready.problem or {}).get("expires_at")
        return cls(
            batch_id=batch_id,
            status=Status.WAITING,
            source=source,
            event_id=event_id,
            batch_status=not_ready.batch_status,
            attempts=checks,
            started_at=utcnow(),
            error={"code": "batch_not_ready", "detail": str(not_ready), "expires_at": expires_at},
        )

    @property
    def expired_unfinished(self) -> bool:
        """A waiting batch whose ``expires_at`` has passed: Datagrid will never finish it."""
        return self.status is Status.WAITING and is_past((self.error or {}).get("expires_at"))

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
    """The state topic, read from the beginning into memory and followed."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._states: dict[str, BatchState] = {}
        self._consumer: AIOKafkaConsumer | None = None
        # End offsets come from a second client: on the follower's own connection a ListOffsets
        # request queues behind its idle fetch (a long poll of fetch_max_wait_ms, 500 ms), which
        # made every sync(), so every job, wait half a second.
        self._end_reader: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[TopicPartition] = []
        self._progress = asyncio.Condition()
        self._retention = settings.state_retention_hours * 3600.0
        self._pruned_at = time.monotonic()
        self.ready = asyncio.Event()

    def get(self, batch_id: str) -> BatchState | None:
        """The latest known state of ``batch_id``."""
        return self._states.get(batch_id)

    def put(self, state: BatchState) -> None:
        """Remember a state this process just wrote (the topic will echo it later)."""
        self._states[state.batch_id] = state
        self._metrics.state_batches.set(len(self._states))

    def waiting(self) -> list[BatchState]:
        """Batches parked until Datagrid finishes them."""
        return [s for s in self._states.values() if s.status is Status.WAITING]

    def prune(self, now: datetime | None = None) -> int:
        """Forget finished batches older than the retention (waiting and forwarding ones stay);
        returns how many were forgotten."""
        self._pruned_at = time.monotonic()
        cutoff = (now or datetime.now(UTC)).timestamp() - self._retention
        old = []
        for batch_id, state in self._states.items():
            finished = parse_time(state.finished_at)
            done = state.status in (Status.FORWARDED, Status.FAILED)
            if done and finished is not None and finished.timestamp() < cutoff:
                old.append(batch_id)
        for batch_id in old:
            del self._states[batch_id]
        self._metrics.state_batches.set(len(self._states))
        return len(old)

    async def start(self) -> None:
        """Assign every partition of the state topic, read it to the end, then keep following."""
        settings = self._settings
        self._consumer = consumer = make_reader(settings)
        self._end_reader = end_reader = make_reader(settings)  # its end offsets are the LSO too
        with kafka_errors("reading the state topic"):
            await consumer.start()
            await end_reader.start()
            partitions = await topic_partitions(settings, settings.state_topic)
            if not partitions:
                raise KafkaError(f"state topic {settings.state_topic} has no partitions")
            self._partitions = [TopicPartition(settings.state_topic, p) for p in partitions]
            consumer.assign(self._partitions)
            await consumer.seek_to_beginning(*self._partitions)
        self._task = asyncio.create_task(self._follow(), name="state-store")
        await self.sync()
        self.prune()
        self.ready.set()

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
            for records in batches.values():
                for record in records:
                    self._apply(record)
            if time.monotonic() - self._pruned_at > 60:
                self.prune()
            self._metrics.state_batches.set(len(self._states))
            async with self._progress:
                self._progress.notify_all()

    def _apply(self, record: ConsumerRecord[Any, Any]) -> None:
        if record.key is None:
            return
        batch_id = record.key.decode("utf-8", "replace")
        if record.value is None:  # tombstone: forget the batch
            self._states.pop(batch_id, None)
            return
        try:
            self._states[batch_id] = BatchState.decode(record.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("state_record_unreadable", batch_id=batch_id, offset=record.offset)

    async def sync(self, within: float = 30.0) -> None:
        """Wait until everything written to the state topic before this call has been read."""
        consumer, end_reader = self._consumer, self._end_reader
        assert consumer is not None and end_reader is not None
        with kafka_errors("reading state topic offsets"):
            ends = await end_reader.end_offsets(self._partitions)
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

    async def stop(self) -> None:
        """Stop following (safe to call twice)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for client in (self._consumer, self._end_reader):
            if client is not None:
                await client.stop()
        self._consumer = self._end_reader = None
