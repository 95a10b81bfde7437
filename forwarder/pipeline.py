"""One batch, end to end: where a result line becomes a Kafka message.

``Pipeline.forward`` fetches the batch, streams its NDJSON results, and publishes one record per
line
to the results topic (or the dead-letter topic with a reason), then records the batch's state.

Memory is bounded: lines are handed to the producer as they are read, and reading waits for Kafka's
acknowledgements once ``max_in_flight_bytes`` are outstanding.  Retries follow the error tree's
``retriable`` flag.  After a stream breaks midway, at-least-once mode re-streams and skips the lines
Kafka already acknowledged (checking that the upstream replays the same lines in the same order).
"""

from __future__ import annotations

import asyncio
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
from forwarder.errors import BatchNotReady, ForwarderError, KafkaError, UpstreamUnavailable
from forwarder.kafka import RECORD_OVERHEAD_BYTES, TopicLimits, translate
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
class _Entry:
    future: asyncio.Future[Any]
    line_no: int
    line: bytes
    size: int
    label: str  # line status for results records, reason for dead letters
    dead_letter: bool


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


class Fenced(KafkaError):
    """Another process took over this transactional id: stop, commit nothing, let it do the work."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


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
        self._status_bytes: dict[object, bytes] = {}

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
        run = _Run(self, producer, batch_id, event_id, progress)
        try:
            async with self._datagrid.stream_results(batch_id) as chunks:
                splitter = LineSplitter(self._max_line)
                async for chunk in chunks:
                    lines = splitter.feed(chunk)
                    if lines:
                        await run.publish(lines)
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

    def status_header(self, status: object) -> bytes:
        """``datagrid-status`` header value for a line's ``status`` (cached per distinct value)."""
        value = self._status_bytes.get(status)
        if value is None:
            value = str(status).encode() if isinstance(status, str) else b""
            if len(self._status_bytes) < 64:
                self._status_bytes[status] = value
        return value


class _Run:
    """One stream of one batch: numbering, classification, produce calls and acknowledgements."""

    def __init__(
        self,
        pipeline: Pipeline,
        producer: AIOKafkaProducer,
        batch_id: str,
        event_id: str | None,
        progress: _Progress,
    ) -> None:
        self.p = pipeline
        self.producer = producer
        self.batch_id = batch_id
        self.key_batch = batch_id.encode()
        self.progress = progress
        self.line_no = 0
        # The last line fully handled (handed to Kafka, dead-lettered or blank) and its bytes.
        self.processed_through = 0
        self.last_line = b""
        self.in_flight: deque[_Entry] = deque()
        self.in_flight_bytes = 0
        self.failed: BaseException | None = None
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
        """Number, classify and hand lines to the producer; wait while too much is in flight."""
        progress = self.progress
        skip_through = progress.acked_through
        send = self.producer.send
        for line in lines:
            self.line_no += 1
            n = self.line_no
            if n <= skip_through:
                if n == skip_through and _raw(line) != progress.boundary:
                    progress.acked_through = 0
                    raise _StreamDiverged(
                        f"re-stream of {self.batch_id} differs at line {n}; re-publishing all lines"
                    )
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
                    reason, detail = head
                    await self._dead_letter(n, line, reason, detail)
                else:
                    key = cast(str, head.custom_id).encode()
                    if len(line) + len(key) > self.limit:
                        await self._dead_letter(
                            n,
                            line,
                            "too_large",
                            f"line of {len(line)} bytes exceeds the results topic's "
                            f"max.message.bytes ({self.p._limits.results})",
                        )
                    else:
                        headers = [
                            *self.result_headers,
                            ("datagrid-status", self.p.status_header(head.status)),
                            ("datagrid-line", str(n).encode()),
                        ]
                        try:
                            future = await send(self.results_topic, line, key, headers=headers)
                        except AIOKafkaError as exc:
                            raise translate(exc, f"producing line {n}") from exc
                        self._track(future, n, line, line_status_label(head.status), False)
            self.processed_through = n
            self.last_line = _raw(line)
            if n > progress.high_water:
                progress.high_water = n
            while self.in_flight_bytes > self.max_in_flight:
                await self._ack_oldest()
        if self.failed is not None:
            raise self.failed

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
        try:
            future = await self.producer.send(
                self.dlq_topic, value, self.key_batch, headers=headers
            )
        except AIOKafkaError as exc:
            raise translate(exc, f"dead-lettering line {n}") from exc
        self._track(future, n, line, reason, True)

    def _track(self, future: Any, n: int, line: bytes, label: str, dead: bool) -> None:
        size = len(line)
        self.in_flight.append(_Entry(future, n, line, size, label, dead))
        self.in_flight_bytes += size
        if n & 0x3FF == 0:
            # Sample produce latency on one line in 1024: enough for a histogram, cheap.
            sent = time.perf_counter()
            future.add_done_callback(
                lambda _f: self.p._metrics.produce_latency.observe(time.perf_counter() - sent)
            )

    async def _ack_oldest(self) -> None:
        entry = self.in_flight.popleft()
        self.in_flight_bytes -= entry.size
        try:
            await entry.future
        except AIOKafkaError as exc:
            if self.failed is None:
                self.failed = translate(exc, f"line {entry.line_no} not acknowledged")
            return
        if self.failed is not None:
            return  # acknowledged, but after a gap: it will be sent again (at-least-once)
        progress = self.progress
        progress.acked_through = entry.line_no
        progress.boundary = entry.line
        if entry.dead_letter:
            progress.dead_letters[entry.label] += 1
        else:
            progress.lines[entry.label] += 1

    async def drain(self) -> None:
        """Wait for every record handed to Kafka; the acknowledged prefix then covers them."""
        while self.in_flight:
            await self._ack_oldest()
        if self.failed is None and self.processed_through > self.progress.acked_through:
            # Everything handled in this stream is in Kafka (blank lines included).
            self.progress.acked_through = self.processed_through
            self.progress.boundary = self.last_line
        if self.failed is not None:
            raise self.failed


def _raw(line: bytes | Oversized) -> bytes:
    return line.prefix if isinstance(line, Oversized) else line
