"""One batch, end to end: where a result line becomes a Kafka message.

``Pipeline.forward`` fetches the batch, streams its NDJSON results, and publishes one record per
line to the results topic (or the dead-letter topic with a reason), then records the batch's state.
Records are appended to per-partition record batches that we build ourselves (see ``_Run``).

Memory is bounded: lines are handed to the producer as they are read, and reading waits for
Kafka's acknowledgements once ``max_in_flight_bytes`` are outstanding.  Retries follow the error
tree's ``retriable`` flag.  After a stream breaks midway, at-least-once mode re-streams and skips
the lines Kafka already acknowledged (checking that the upstream replays the same lines in the same
order); exactly-once mode aborts the attempt's transaction and starts again from line 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import ProducerFenced

from forwarder.config import Settings
from forwarder.datagrid import TERMINAL_STATUSES, DatagridClient, check_batch_id, terminal_time
from forwarder.errors import (
    BatchNotReady,
    Fenced,
    ForwarderError,
    KafkaError,
    UpstreamUnavailable,
)
from forwarder.kafka import RECORD_OVERHEAD_BYTES, TopicLimits, partition_for, translate
from forwarder.ndjson import LineSplitter, Oversized, classify, is_blank
from forwarder.observability import Metrics, line_status_label

log = structlog.get_logger("forwarder.pipeline")

CONTENT_TYPE = ("content-type", b"application/json")


def utcnow() -> str:
    """Current time as an ISO-8601 UTC string."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BatchState(msgspec.Struct, kw_only=True):
    """A batch's forwarding state: the state topic's value and ``GET /v1/batches/{id}``."""

    batch_id: str
    status: str  # forwarding | waiting | forwarded | failed
    lines: dict[str, int] = msgspec.field(default_factory=dict)
    dead_letters: dict[str, int] = msgspec.field(default_factory=dict)
    blank_lines: int = 0
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

    def encode(self) -> bytes:
        """The JSON record written to the state topic."""
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> BatchState:
        """Read a state-topic record."""
        return msgspec.json.decode(data, type=cls)


class _StreamDiverged(UpstreamUnavailable):
    """A re-stream did not start with the lines already acknowledged: start over from line 1."""


@dataclass(slots=True)
class _Unit:
    """Records acknowledged together: one record batch of one partition, or one dead letter."""

    first_line: int  # the smallest line number in the unit
    before_first: bytes  # bytes of line first_line - 1: the re-stream boundary if this unit fails
    builder: Any = None  # aiokafka BatchBuilder while the unit is open
    future: asyncio.Future[Any] | None = None
    size: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    dead: bool = False


@dataclass
class _Progress:
    """What survives from one stream attempt to the next within one ``forward`` call."""

    acked_through: int = 0  # every line up to this number is in Kafka (or blank)
    boundary: bytes = b""  # the bytes of line ``acked_through``, to check a re-stream against
    high_water: int = 0  # highest line number processed by any attempt
    lines: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    blank_lines: int = 0


@dataclass(frozen=True, slots=True)
class Transaction:
    """Exactly-once context: the transactional producer, and the job offsets to commit with it."""

    producer: AIOKafkaProducer
    offsets: dict[TopicPartition, int] | None = None
    group_id: str | None = None


class Pipeline:
    """Forwards batches with a shared upstream client and producer (or a transaction's producer)."""

    def __init__(
        self,
        settings: Settings,
        datagrid: DatagridClient,
        producer: AIOKafkaProducer,
        limits: TopicLimits,
        metrics: Metrics,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._datagrid = datagrid
        self._producer = producer
        self._limits = limits
        self._metrics = metrics
        self._sleep = sleep
        # The largest line worth holding: anything longer is too_large for both topics anyway.
        self._max_line = max(limits.results, limits.dead_letters)
        self._linger = settings.kafka_linger_ms / 1000
        self._statuses: dict[str, tuple[bytes, str]] = {}

    async def forward(
        self,
        batch_id: str,
        *,
        source: str = "cli",
        event_id: str | None = None,
        txn: Transaction | None = None,
    ) -> BatchState:
        """Forward one batch now and record its state; raise :class:`BatchNotReady` if not terminal.

        With ``txn`` (exactly-once), each attempt is one Kafka transaction holding the lines, the
        state record and the job's offsets; a failed attempt is aborted and redone from line 1.
        Without it (at-least-once), a re-stream skips the lines already acknowledged.

        Returns the final state (``forwarded`` or ``failed``).  Raises :class:`KafkaError` only when
        even the state record cannot be written, so the caller must not count the job as done.
        """
        check_batch_id(batch_id)
        settings = self._settings
        state = BatchState(
            batch_id=batch_id,
            status="forwarding",
            source=source,
            event_id=event_id,
            delivery=settings.delivery.value if txn is None else "exactly-once",
            started_at=utcnow(),
        )
        logger = log.bind(batch_id=batch_id, event_id=event_id, source=source)
        progress = _Progress()
        started = time.perf_counter()
        self._metrics.batches_in_flight.inc()
        try:
            for attempt in range(1, settings.max_attempts + 1):
                state.attempts = attempt
                try:
                    if txn is None:
                        await self._attempt(
                            batch_id, event_id, state, progress, logger, attempt, self._producer
                        )
                    else:
                        progress = await self._transaction(
                            batch_id, event_id, state, logger, attempt, txn, started
                        )
                except (BatchNotReady, Fenced):
                    raise
                except ForwarderError as exc:
                    if not exc.retriable or attempt == settings.max_attempts:
                        self._fail(state, exc)
                        break
                    delay = self._backoff(attempt, getattr(exc, "retry_after", None))
                    reason = (
                        "stream_broken"
                        if state.stream_restarts or progress.high_water
                        else (exc.code)
                    )
                    self._metrics.retries.labels(reason=reason).inc()
                    logger.warning(
                        "batch_attempt_failed",
                        attempt=attempt,
                        error=str(exc),
                        retry_in=round(delay, 3),
                        acked_through=progress.acked_through,
                    )
                    await self._sleep(delay)
                else:
                    state.status = "forwarded"
                    break
        except (BatchNotReady, Fenced):
            raise
        except Exception as exc:  # a bug must fail one batch, not the worker
            logger.exception("batch_internal_error")
            self._fail(state, exc)
        finally:
            self._metrics.batches_in_flight.dec()
        duration = time.perf_counter() - started
        if state.status == "failed" and txn is not None:
            progress = _Progress()  # every attempt was aborted: nothing of it is visible
        self._finalize(state, progress)
        if txn is None or state.status == "failed":
            # (exactly-once success already wrote its state inside the transaction)
            await self.record(state, txn)
        self._count(progress)
        self._metrics.batch_duration.observe(duration)
        self._metrics.batches.labels(outcome=state.status).inc()
        forward_delay: float | None = None
        if state.status == "forwarded" and state.terminal_at:
            terminal = datetime.fromisoformat(state.terminal_at.replace("Z", "+00:00"))
            forward_delay = max((datetime.now(UTC) - terminal).total_seconds(), 0.0)
            self._metrics.forward_delay.observe(forward_delay)
        emit = logger.info if state.status == "forwarded" else logger.warning
        emit(
            "batch_" + state.status,
            attempt=state.attempts,
            lines=dict(state.lines),
            dead_letters=dict(state.dead_letters),
            blank_lines=state.blank_lines,
            stream_restarts=state.stream_restarts,
            duration_s=round(duration, 3),
            forward_delay_s=None if forward_delay is None else round(forward_delay, 3),
            delivery=state.delivery,
            error=state.error,
        )
        return state

    async def _transaction(
        self,
        batch_id: str,
        event_id: str | None,
        state: BatchState,
        logger: Any,
        attempt: int,
        txn: Transaction,
        started: float,
    ) -> _Progress:
        """One exactly-once attempt: lines, state and offsets commit together or not at all."""
        progress = _Progress()  # an aborted attempt leaves nothing behind: start from line 1
        producer = txn.producer
        try:
            async with producer.transaction():
                await self._attempt(batch_id, event_id, state, progress, logger, attempt, producer)
                state.status = "forwarded"
                self._finalize(state, progress)
                await self._send_state(state, producer)
                if txn.offsets:
                    await producer.send_offsets_to_transaction(txn.offsets, txn.group_id)
        except ProducerFenced as exc:
            raise Fenced(f"transactional producer fenced while forwarding {batch_id}") from exc
        except AIOKafkaError as exc:
            raise translate(exc, f"transaction for {batch_id}") from exc
        return progress

    async def record(self, state: BatchState, txn: Transaction | None = None) -> None:
        """Write ``state`` to the state topic (with the job's offsets, in a transaction, if
        given)."""
        if txn is None:
            await self._send_state(state, self._producer)
            return
        try:
            async with txn.producer.transaction():
                await self._send_state(state, txn.producer)
                if txn.offsets:
                    await txn.producer.send_offsets_to_transaction(txn.offsets, txn.group_id)
        except ProducerFenced as exc:
            raise Fenced(f"transactional producer fenced recording {state.batch_id}") from exc
        except AIOKafkaError as exc:
            raise translate(exc, f"recording state of {state.batch_id}") from exc

    async def _send_state(self, state: BatchState, producer: AIOKafkaProducer) -> None:
        try:
            future = await producer.send(
                self._settings.state_topic, state.encode(), key=state.batch_id.encode()
            )
            await future
        except AIOKafkaError as exc:
            raise translate(exc, f"recording state of {state.batch_id}") from exc

    def _finalize(self, state: BatchState, progress: _Progress) -> None:
        state.finished_at = utcnow()
        state.lines = dict(progress.lines)
        state.dead_letters = dict(progress.dead_letters)
        state.blank_lines = progress.blank_lines

    def _count(self, progress: _Progress) -> None:
        """Add what is now visible in Kafka to the metrics (once, at the end of the batch)."""
        metrics = self._metrics
        for status, n in progress.lines.items():
            metrics.lines_forwarded.labels(status=status).inc(n)
        for reason, n in progress.dead_letters.items():
            metrics.dead_letters.labels(reason=reason).inc(n)
        if progress.blank_lines:
            metrics.blank_lines.inc(progress.blank_lines)

    async def _attempt(
        self,
        batch_id: str,
        event_id: str | None,
        state: BatchState,
        progress: _Progress,
        logger: Any,
        attempt: int,
        producer: AIOKafkaProducer,
    ) -> None:
        batch = await self._datagrid.get_batch(batch_id)
        status = batch.get("status")
        state.batch_status = status if isinstance(status, str) else None
        if status not in TERMINAL_STATUSES:
            raise BatchNotReady(
                f"batch {batch_id} is {status!r}, not terminal yet",
                batch_status=state.batch_status,
                problem={"expires_at": batch.get("expires_at")},
            )
        terminal = terminal_time(batch)
        state.terminal_at = (
            terminal.isoformat(timespec="milliseconds").replace("+00:00", "Z") if terminal else None
        )
        if progress.high_water:
            state.stream_restarts += 1
            self._metrics.stream_restarts.inc()
            logger.info("stream_restart", attempt=attempt, skip_lines=progress.acked_through)
        # Read once per attempt: partitions added mid-batch take effect at the next attempt.
        try:
            partitions = len(await producer.partitions_for(self._settings.results_topic))
        except AIOKafkaError as exc:
            raise translate(exc, "reading the results topic's partitions") from exc
        run = _Run(self, producer, batch_id, event_id, progress, partitions)
        try:
            async with self._datagrid.stream_results(batch_id) as chunks:
                splitter = LineSplitter(self._max_line)
                async for chunk in chunks:
                    lines = splitter.feed(chunk)
                    if lines:
                        await run.publish(lines)
                        run.linger(self._linger)
                tail = splitter.close()
                if tail:
                    await run.publish(tail)
        finally:
            # Whatever happened, wait for what was handed to Kafka: it decides what is acknowledged.
            await run.drain()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        settings = self._settings
        if retry_after is not None:
            return min(retry_after, settings.retry_max_seconds)
        ceiling = min(
            settings.retry_max_seconds, settings.retry_base_seconds * 2.0 ** (attempt - 1)
        )
        return float(ceiling * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not cryptography

    def _fail(self, state: BatchState, exc: BaseException) -> None:
        state.status = "failed"
        if isinstance(exc, ForwarderError):
            problem = dict(getattr(exc, "problem", None) or {})
            state.error = {
                "code": exc.code,
                "detail": str(exc),
                "upstream_status": getattr(exc, "status", None),
                "problem": problem or None,
            }
        else:
            state.error = {"code": "internal_error", "detail": f"{type(exc).__name__}: {exc}"}

    def status_of(self, status: object) -> tuple[bytes, str]:
        """``datagrid-status`` header value and metric label of a line's ``status`` (cached)."""
        known = self._statuses.get(status) if isinstance(status, str) else None
        if known is None:
            known = (status.encode() if isinstance(status, str) else b"", line_status_label(status))
            if isinstance(status, str) and len(self._statuses) < 64:
                self._statuses[status] = known
        return known


class _Run:
    """One stream of one batch: numbering, classification and per-partition record batches.

    Each valid line is appended to its partition's open aiokafka record batch (partition from
    Kafka's murmur2, as Java's default partitioner); a full batch is handed to the producer whole.
    One future per batch instead of one per line is what makes this path fast.  Dead letters are
    rare and go through ``send()``.  Acknowledgements are awaited oldest first, when more than
    ``max_in_flight_bytes`` are outstanding (reading waits for Kafka) and eagerly when done.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        producer: AIOKafkaProducer,
        batch_id: str,
        event_id: str | None,
        progress: _Progress,
        partitions: int,
    ) -> None:
        self.p = pipeline
        self.producer = producer
        self.batch_id = batch_id
        self.key_batch = batch_id.encode()
        self.progress = progress
        self.partitions = partitions
        self.line_no = 0
        # The last line fully handled (in a unit, dead-lettered, blank or skipped) and its bytes.
        self.processed_through = 0
        self.last_line = progress.boundary
        self.open: list[_Unit | None] = [None] * partitions
        self.in_flight: deque[_Unit] = deque()
        self.in_flight_bytes = 0
        self.failed_from: int | None = None  # first line of the earliest unit Kafka refused
        self.failed_boundary = b""
        self.failure: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Future[None] | None = None
        prefix = [("datagrid-batch-id", self.key_batch), CONTENT_TYPE]
        if event_id:
            prefix.append(("datagrid-event-id", event_id.encode()))
        self.result_headers = prefix
        self.limit = pipeline._limits.results - RECORD_OVERHEAD_BYTES
        self.dlq_limit = pipeline._limits.dead_letters - RECORD_OVERHEAD_BYTES
        settings = pipeline._settings
        self.results_topic = settings.results_topic
        self.dlq_topic = settings.dead_letter_topic
        self.max_in_flight = settings.max_in_flight_bytes

    async def publish(self, lines: Sequence[bytes | Oversized]) -> None:
        """Number, classify and batch lines; wait while too much is unacknowledged."""
        progress = self.progress
        skip_through = progress.acked_through
        open_units = self.open
        partitions = self.partitions
        limit = self.limit
        prefix = self.result_headers
        status_of = self.p.status_of
        n = self.line_no
        for line in lines:
            n += 1
            self.line_no = n
            if n <= skip_through:
                if n == skip_through and _raw(line) != progress.boundary:
                    progress.acked_through = 0
                    raise _StreamDiverged(
                        f"re-stream of {self.batch_id} differs at line {n}; re-publishing all lines"
                    )
                self.processed_through = n
                self.last_line = _raw(line)
                continue
            if isinstance(line, Oversized):
                await self._dead_letter(
                    n, line.prefix, "too_large", f"line of {line.size} bytes exceeds the limit"
                )
            elif is_blank(line):
                if n > progress.high_water:
                    progress.blank_lines += 1
            else:
                head = classify(line, self.batch_id)
                if isinstance(head, tuple):
                    await self._dead_letter(n, line, *head)
                else:
                    key = cast(str, head.custom_id).encode()
                    if len(line) + len(key) > limit:
                        await self._dead_letter(
                            n,
                            line,
                            "too_large",
                            f"line of {len(line)} bytes exceeds the results topic's "
                            f"max.message.bytes ({self.p._limits.results})",
                        )
                    else:
                        status_bytes, label = status_of(head.status)
                        headers = [
                            *prefix,
                            ("datagrid-status", status_bytes),
                            ("datagrid-line", b"%d" % n),
                        ]
                        partition = partition_for(key, partitions)
                        unit = open_units[partition]
                        if unit is None:
                            unit = self._open(partition, n)
                        if (
                            unit.builder.append(
                                key=key, value=line, timestamp=None, headers=headers
                            )
                            is None
                        ):
                            # Full: hand it over and start the next one with this line.
                            await self._submit(partition)
                            unit = self._open(partition, n)
                            unit.builder.append(
                                key=key, value=line, timestamp=None, headers=headers
                            )  # an empty batch takes any record that passed the size check
                        unit.size += len(line)
                        unit.labels[label] += 1
            self.processed_through = n
            self.last_line = _raw(line)
            if n > progress.high_water:
                progress.high_water = n
        # Release what Kafka already acknowledged (memory stays flat), then respect the bound.
        in_flight = self.in_flight
        while in_flight and in_flight[0].future is not None and in_flight[0].future.done():
            await self._ack_oldest()
        while self.in_flight_bytes > self.max_in_flight:
            await self._ack_oldest()
        if self.failure is not None:
            raise self.failure

    def linger(self, seconds: float) -> None:
        """After a chunk: if lines wait in record batches that are not full, hand them over once
        the upstream has been quiet for ``seconds`` (the producer's linger, for batches we build).

        A timer re-armed per chunk, not a task per chunk: a flowing stream only pays for the
        re-arm, and a paused one still gets its lines into Kafka.
        """
        if self._timer is not None:
            self._timer.cancel()
        if any(unit is not None for unit in self.open):
            self._timer = asyncio.get_running_loop().call_later(seconds, self._linger_expired)

    def _linger_expired(self) -> None:
        self._timer = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        # Runs beside the stream read; publish() may run meanwhile: _submit() takes a unit out of
        # self.open before it awaits, so the two never hand over the same record batch.
        for partition, unit in enumerate(self.open):
            if unit is not None:
                with contextlib.suppress(KafkaError):  # recorded by _failed; publish raises it
                    await self._submit(partition)

    def _open(self, partition: int, n: int) -> _Unit:
        unit = _Unit(n, self.last_line, self.producer.create_batch())
        self.open[partition] = unit
        return unit

    async def _submit(self, partition: int) -> None:
        unit = self.open[partition]
        assert unit is not None
        self.open[partition] = None
        try:
            unit.future = await self.producer.send_batch(
                unit.builder, self.results_topic, partition=partition
            )
        except AIOKafkaError as exc:
            self._failed(unit, exc)
            raise translate(exc, f"producing lines from {unit.first_line}") from exc
        unit.builder = None
        self._track(unit)

    async def _dead_letter(self, n: int, line: bytes, reason: str, detail: str) -> None:
        value = line
        if len(value) > self.dlq_limit:
            detail = f"{detail}; value truncated to the first {self.dlq_limit} bytes"
            value = value[: self.dlq_limit]
        headers = [
            ("datagrid-batch-id", self.key_batch),
            ("datagrid-line", str(n).encode()),
            ("forwarder-error", reason.encode()),
            ("forwarder-error-detail", detail.encode("utf-8", "replace")[:1024]),
        ]
        unit = _Unit(n, self.last_line, size=len(value), dead=True)
        unit.labels[reason] += 1
        try:
            unit.future = await self.producer.send(
                self.dlq_topic, value, self.key_batch, headers=headers
            )
        except AIOKafkaError as exc:
            self._failed(unit, exc)
            raise translate(exc, f"dead-lettering line {n}") from exc
        self._track(unit)

    def _track(self, unit: _Unit) -> None:
        self.in_flight.append(unit)
        self.in_flight_bytes += unit.size
        sent = time.perf_counter()
        metrics = self.p._metrics
        assert unit.future is not None
        unit.future.add_done_callback(
            lambda _f: metrics.produce_latency.observe(time.perf_counter() - sent)
        )

    def _failed(self, unit: _Unit, exc: BaseException) -> None:
        """Kafka refused (or never got) ``unit``: lines from its first on are not acknowledged."""
        if self.failed_from is None or unit.first_line < self.failed_from:
            self.failed_from = unit.first_line
            self.failed_boundary = unit.before_first
        if self.failure is None:
            self.failure = translate(exc, f"lines from {unit.first_line} not acknowledged")

    async def _ack_oldest(self) -> None:
        unit = self.in_flight.popleft()
        self.in_flight_bytes -= unit.size
        assert unit.future is not None
        try:
            await unit.future
        except AIOKafkaError as exc:
            self._failed(unit, exc)
            return
        # Acknowledged records are in Kafka, so they count (even past a gap that a re-stream
        # will fill: then they are in Kafka twice, and the counts say so).
        if unit.dead:
            self.progress.dead_letters.update(unit.labels)
        else:
            self.progress.lines.update(unit.labels)

    async def drain(self) -> None:
        """Hand over the open batches, wait for every acknowledgement, settle the prefix."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None:
            await asyncio.wait({self._flushing})
        for partition, unit in enumerate(self.open):
            if unit is not None:
                with contextlib.suppress(KafkaError):  # recorded by _failed; others still go
                    await self._submit(partition)
        while self.in_flight:
            await self._ack_oldest()
        progress = self.progress
        if self.failed_from is not None:
            # Everything before the earliest refused line is in Kafka (or blank).
            if self.failed_from - 1 > progress.acked_through:
                progress.acked_through = self.failed_from - 1
                progress.boundary = self.failed_boundary
        elif self.processed_through > progress.acked_through:
            progress.acked_through = self.processed_through
            progress.boundary = self.last_line
        if self.failure is not None:
            raise self.failure


def _raw(line: bytes | Oversized) -> bytes:
    return line.prefix if isinstance(line, Oversized) else line
