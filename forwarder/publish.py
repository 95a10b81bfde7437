"""Where a result line becomes a Kafka message: numbering, classification, record batches, acks.

:class:`Publisher` handles one stream attempt of one batch.  Each valid line is appended to its
partition's open aiokafka record batch (partition from Kafka's murmur2, as Java's default
partitioner); a full batch is handed to the producer whole, and one future per batch instead of one
per line is what makes this path fast.  Dead letters are rare and go through ``send()``.
Acknowledgements are awaited oldest first, when more than ``max_in_flight`` bytes are
outstanding (reading waits for Kafka) and eagerly when done.  :class:`Progress` is what survives
from one attempt to the next; :class:`PublishConfig` is everything else, built once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import AIOKafkaProducer

from forwarder.config import Settings
from forwarder.errors import ForwarderError, KafkaConfigProblem, StreamDiverged, TooManyLines
from forwarder.kafka import RECORD_OVERHEAD_BYTES, TopicLimits, partition_for, translate_send
from forwarder.ndjson import WHITESPACE as _WS
from forwarder.ndjson import LineHead, Oversized, classify
from forwarder.observability import Metrics, line_status_label
from forwarder.state import utcnow

CONTENT_TYPE = ("content-type", b"application/json")
#: CloudEvents (Kafka protocol binding, binary mode) on every results and dead-letter record: the
#: value is the event's data, ``content-type`` its datacontenttype. The type carries the record
#: format's major version (docs/consumers.md, "Versions"); results and dead letters differ.
CE_SPECVERSION = ("ce_specversion", b"1.0")
RESULT_TYPE = b"com.datagrid.batch_prediction.result.v1"
DEAD_LETTER_TYPE = b"com.datagrid.batch_prediction.dead_letter.v1"
#: Bytes Kafka adds per header besides its key and value (two varint lengths), counted generously.
_HEADER_OVERHEAD = 10
_DETAIL_LIMIT = 1024


def headers_size(headers: Sequence[tuple[str, bytes]]) -> int:
    """Bytes the headers take in a record (keys, values and framing)."""
    return sum(len(key) + len(value) + _HEADER_OVERHEAD for key, value in headers)


@dataclass(frozen=True, slots=True)
class PublishConfig:
    """What publishing needs that does not change between batches: built once per process."""

    results_topic: str
    dead_letter_topic: str
    #: Largest record (key, value and headers) each topic accepts, framing reserve deducted.
    results_limit: int
    dead_letter_limit: int
    max_in_flight: int
    linger: float
    metrics: Metrics
    #: CloudEvents ``ce_source`` of a batch's records is this plus the batch id (the resource
    #: its results came from).
    source_base: str = "https://api.datagrid.com/v1/batch-predictions/"
    #: ``datagrid-status`` header value and metric label per line status (a bounded cache).
    statuses: dict[str, tuple[bytes, str]] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, limits: TopicLimits, metrics: Metrics) -> PublishConfig:
        """The configuration for ``settings`` and the topics' size limits."""
        return cls(
            results_topic=settings.results_topic,
            dead_letter_topic=settings.dead_letter_topic,
            results_limit=limits.results - RECORD_OVERHEAD_BYTES,
            dead_letter_limit=limits.dead_letters - RECORD_OVERHEAD_BYTES,
            max_in_flight=settings.max_in_flight_bytes,
            linger=settings.kafka_linger_ms / 1000,
            metrics=metrics,
            source_base=f"{settings.datagrid_base_url}/batch-predictions/",
        )

    @property
    def max_line(self) -> int:
        """The largest line worth holding: anything longer is too large for both topics."""
        return max(self.results_limit, self.dead_letter_limit) + RECORD_OVERHEAD_BYTES

    def status_of(self, status: object) -> tuple[bytes, str]:
        """``datagrid-status`` header value and metric label of a line's ``status`` (cached)."""
        known = self.statuses.get(status) if isinstance(status, str) else None
        if known is None:
            known = (status.encode() if isinstance(status, str) else b"", line_status_label(status))
            if isinstance(status, str) and len(self.statuses) < 64 and len(status) < 64:
                self.statuses[status] = known
        return known


@dataclass
class Progress:
    """What survives from one stream attempt to the next within one batch."""

    acked_through: int = 0  # every line up to this number is in Kafka (or blank)
    boundary: bytes = b""  # the bytes of line ``acked_through``, to check a re-stream against
    high_water: int = 0  # highest line number processed by any attempt
    #: Distinct lines in Kafka, by status (results) and by reason (dead letters).
    lines: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    blank_lines: int = 0

    @property
    def result_lines(self) -> int:
        """Result lines seen so far (blank lines excluded)."""
        return self.high_water - self.blank_lines


@dataclass(slots=True)
class _Unit:
    """Records acknowledged together: one record batch of one partition, or one dead letter."""

    first_line: int  # the smallest line number in the unit
    before_first: bytes  # bytes of line first_line - 1: the re-stream boundary if this unit fails
    builder: Any = None  # aiokafka BatchBuilder while the unit is open
    future: asyncio.Future[Any] | None = None
    size: int = 0
    dead: bool = False
    numbers: array[int] = field(default_factory=lambda: array("I"))
    labels: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Batch:
    """The batch an attempt publishes: its id, its webhook event and its line bound."""

    batch_id: str
    event_id: str | None
    #: Most result lines the stream may hold (``request_counts.total``), when Datagrid said.
    expected_lines: int | None = None
    #: Most lines of any kind (blank ones too) read before the stream counts as runaway.
    max_lines: int = 1_000_000_000
    #: ``ce_time`` of its records: when the batch became terminal (the same on every forward),
    #: or when this attempt started if Datagrid did not say.
    time: str = ""


class Publisher:
    """One stream attempt of one batch on one producer."""

    def __init__(
        self,
        config: PublishConfig,
        producer: AIOKafkaProducer,
        batch: Batch,
        progress: Progress,
        partitions: int,
    ) -> None:
        self.config = config
        self.producer = producer
        self.batch = batch
        self.key_batch = batch.batch_id.encode()
        self.progress = progress
        self.partitions = partitions
        self.line_no = 0
        # The last line fully handled (in a unit, dead-lettered, blank or skipped) and its bytes.
        self.processed_through = 0
        self.last_line = progress.boundary
        self.open: list[_Unit | None] = [None] * partitions
        self.in_flight: deque[_Unit] = deque()
        self.in_flight_bytes = 0
        self.acked: list[_Unit] = []  # acknowledged, not counted yet (see _count)
        self.handing: list[_Unit] = []  # being handed to the producer: neither open nor in flight
        self.failed_from: int | None = None  # first line of the earliest unit Kafka refused
        self.failed_boundary = b""
        self.failure: ForwarderError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Future[None] | None = None
        # CloudEvents: ce_id is "<batch id>:<line>", unique within ce_source (the batch) and the
        # same whenever the line is forwarded again, so consumers dedupe on (source, id).
        self.ce_id = self.key_batch + b":"
        self.ce = [
            CE_SPECVERSION,
            ("ce_source", (config.source_base + batch.batch_id).encode()),
            ("ce_time", (batch.time or utcnow()).encode()),
        ]
        prefix = [("datagrid-batch-id", self.key_batch), CONTENT_TYPE]
        if batch.event_id:
            prefix.append(("datagrid-event-id", batch.event_id.encode()))
        self.result_headers = [*prefix, *self.ce, ("ce_type", RESULT_TYPE)]
        self.heads: dict[bytes, tuple[tuple[str, bytes], ...]] = {}
        # Every result record's fixed headers, plus the per-line ones: datagrid-status (its
        # value counted per line), datagrid-line and ce_id (names, 10 digits each, framing).
        self.fixed_size = (
            headers_size(self.result_headers) + 3 * _HEADER_OVERHEAD + 64 + len(self.ce_id)
        )

    async def publish(self, lines: Sequence[bytes | Oversized]) -> None:  # noqa: C901 - the per-line hot path, flat on purpose (see below)
        """Number, classify and batch lines; wait while too much is unacknowledged.

        The per-line path of the service: written out flat, with what it reads bound to locals
        once per chunk (every attribute look-up and call here runs a million times a batch).
        """
        progress, batch, config = self.progress, self.batch, self.config
        skip_through, first_new = progress.acked_through, progress.high_water
        expected, max_lines, batch_id = batch.expected_lines, batch.max_lines, batch.batch_id
        statuses, status_of, heads = config.statuses, config.status_of, self.heads
        ce_id = self.ce_id
        limit, fixed_size, partitions = config.results_limit, self.fixed_size, self.partitions
        open_units = self.open
        n, last, blank = self.line_no, self.last_line, progress.blank_lines
        processed = self.processed_through
        try:
            for line in lines:
                n += 1
                if n > max_lines:
                    raise TooManyLines(f"stream of {batch_id} exceeds {n - 1} lines")
                if n <= skip_through:  # already in Kafka: check the re-stream matches, skip it
                    last = _raw(line)
                    if n == skip_through and last != progress.boundary:
                        progress.acked_through = 0
                        raise StreamDiverged(
                            f"re-stream of {batch_id} differs at line {n}; re-publishing all lines"
                        )
                    processed = n
                    continue
                new = n > first_new
                past_total = new and expected is not None and n - 1 - blank >= expected
                if isinstance(line, Oversized):
                    if past_total:  # refused before it reaches Kafka
                        raise self._too_many_lines()
                    detail = f"line of {line.size} bytes exceeds the limit"
                    await self._dead_letter(n, line.prefix, "too_large", detail, last)
                    last = line.prefix
                elif not line or (line[0] in _WS and not line.strip(_WS)):
                    blank += new
                    last = line
                else:
                    if past_total:  # refused before it reaches Kafka
                        raise self._too_many_lines()
                    head = classify(line, batch_id)
                    if isinstance(head, tuple):
                        await self._dead_letter(n, line, *head, last)
                        last, processed = line, n
                        continue
                    key = cast(str, head.custom_id).encode()
                    status = head.status
                    known = statuses.get(status) if type(status) is str else None
                    status_bytes, label = known or status_of(status)
                    size = len(line) + len(key) + len(status_bytes) + fixed_size
                    if size > limit:
                        await self._dead_letter(
                            n, line, "too_large", self._too_large(line, size, head), last
                        )
                        last, processed = line, n
                        continue
                    fixed = heads.get(status_bytes) or self._heads_for(status_bytes)
                    # A list: aiokafka's C encoder takes no tuple.
                    headers = [
                        *fixed,
                        ("datagrid-line", b"%d" % n),
                        ("ce_id", b"%s%d" % (ce_id, n)),
                    ]
                    partition = partition_for(key, partitions)
                    unit = open_units[partition] or self._open(partition, n, last)
                    if (
                        unit.builder.append(key=key, value=line, timestamp=None, headers=headers)
                        is None
                    ):
                        # Full: hand it over and start the next one with this line (an empty
                        # batch takes any record that passed the size check).
                        await self._submit(partition)
                        unit = self._open(partition, n, last)
                        unit.builder.append(key=key, value=line, timestamp=None, headers=headers)
                    unit.numbers.append(n)
                    unit.labels.append(label)
                    last = line
                processed = n
        finally:
            # What was fully handled, for the next chunk, drain() and the next attempt.
            self.line_no, self.processed_through, self.last_line = n, processed, last
            progress.blank_lines = blank
            progress.high_water = max(progress.high_water, processed)
        await self._settle_acks()

    def _too_many_lines(self) -> TooManyLines:
        expected = self.batch.expected_lines
        return TooManyLines(
            f"stream of {self.batch.batch_id} has more than the batch's {expected} lines"
        )

    def _heads_for(self, status_bytes: bytes) -> tuple[tuple[str, bytes], ...]:
        """The fixed headers of a result record with this ``datagrid-status`` (cached)."""
        fixed = (*self.result_headers, ("datagrid-status", status_bytes))
        if len(self.heads) < 64:
            self.heads[status_bytes] = fixed
        return fixed

    def _too_large(self, line: bytes, size: int, head: LineHead) -> str:
        status = head.status if isinstance(head.status, str) else ""
        limit = self.config.results_limit + RECORD_OVERHEAD_BYTES
        return (
            f"record of {size} bytes (line {len(line)}, status header {len(status.encode())}) "
            f"exceeds the results topic's max.message.bytes ({limit})"
        )

    async def _settle_acks(self) -> None:
        # Release what Kafka already acknowledged (memory stays flat), then respect the bound.
        in_flight = self.in_flight
        while in_flight and in_flight[0].future is not None and in_flight[0].future.done():
            await self._ack_oldest()
        while self.in_flight_bytes > self.config.max_in_flight:
            await self._ack_oldest()
        if self.failure is not None:
            raise self.failure

    def linger(self) -> None:
        """After a chunk: if lines wait in record batches that are not full, hand them over once
        the upstream has been quiet for the linger (the producer's linger, for batches we build):
        a timer re-armed per chunk, so a paused stream still gets its lines into Kafka."""
        self._stop_timer()
        if any(unit is not None for unit in self.open):
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.config.linger, self._linger_expired)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _linger_expired(self) -> None:
        self._timer = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._submit_open())

    async def _submit_open(self) -> None:
        # May run beside the stream read: _submit() takes a unit out of self.open before it
        # awaits, so the two never hand over the same record batch.
        for partition, unit in enumerate(self.open):
            if unit is not None:
                with contextlib.suppress(ForwarderError):  # recorded by _failed; publish raises it
                    await self._submit(partition)

    def _open(self, partition: int, n: int, before: bytes) -> _Unit:
        unit = self.open[partition] = _Unit(n, before, self.producer.create_batch())
        return unit

    async def _submit(self, partition: int) -> None:
        unit = self.open[partition]
        assert unit is not None
        self.open[partition], unit.size = None, unit.builder.size()
        topic = self.config.results_topic
        send = self.producer.send_batch(unit.builder, topic, partition=partition)
        await self._hand_over(unit, send)
        unit.builder = None

    async def _dead_letter(
        self, n: int, line: bytes, reason: str, detail: str, before: bytes
    ) -> None:
        topic = self.config.dead_letter_topic
        headers = dead_letter_headers(self, n, reason)
        value, detail_bytes = fit_dead_letter(
            line, detail, self.config.dead_letter_limit - len(self.key_batch), headers, topic
        )
        headers.append(("forwarder-error-detail", detail_bytes))
        unit = _Unit(n, before, size=len(value), dead=True)
        unit.numbers.append(n)
        unit.labels.append(reason)
        send = self.producer.send(topic, value, self.key_batch, headers=headers)
        await self._hand_over(unit, send)

    async def _hand_over(self, unit: _Unit, send: Awaitable[asyncio.Future[Any]]) -> None:
        """Give ``unit`` to the producer and track its acknowledgement.  Whatever the producer
        raises (aiokafka asserts on a partition that vanished), the unit's lines are not in Kafka:
        record it, so the attempt fails and the stream resumes before them."""
        self.handing.append(unit)
        try:
            future = unit.future = await send
        except Exception as exc:
            raise self._failed(unit, exc) from exc
        finally:
            self.handing.remove(unit)
        self.in_flight.append(unit)
        self.in_flight_bytes += unit.size
        sent, observe = time.perf_counter(), self.config.metrics.produce_latency.observe
        future.add_done_callback(lambda _f: observe(time.perf_counter() - sent))

    def _failed(self, unit: _Unit, exc: BaseException) -> ForwarderError:
        """Kafka refused (or never got) ``unit``: lines from its first on are not acknowledged."""
        if self.failed_from is None or unit.first_line < self.failed_from:
            self.failed_from = unit.first_line
            self.failed_boundary = unit.before_first
        topic = self.config.dead_letter_topic if unit.dead else self.config.results_topic
        what = f"lines from {unit.first_line} not acknowledged"
        error = translate_send(exc, what, self.producer, topic)
        if self.failure is None:
            self.failure = error
        return error

    async def _ack_oldest(self) -> None:
        unit = self.in_flight.popleft()
        self.in_flight_bytes -= unit.size
        assert unit.future is not None
        try:
            await unit.future
        except Exception as exc:
            self._failed(unit, exc)
            return
        self.acked.append(unit)
        if len(self.acked) >= 64:
            self._count(self._unsettled_from(), final=False)

    def abandon(self) -> None:
        """The attempt was cancelled (a rebalance or shutdown gave its job away): hand nothing
        more to Kafka, so the job's next owner does not find extra copies of unsent lines."""
        self._stop_timer()
        self.open = [None] * self.partitions

    async def drain(self) -> None:
        """Hand over the open batches, wait for every acknowledgement, settle the counts and the
        prefix that the next attempt may skip."""
        self._stop_timer()
        if self._flushing is not None:
            await asyncio.wait({self._flushing})
        await self._submit_open()
        while self.in_flight:
            await self._ack_oldest()
        self._count(self.failed_from or self.line_no + 1, final=True)
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

    def _unsettled_from(self) -> int:
        """The first line a failure may still send again (the first of any unit not acked)."""
        pending = [unit.first_line for unit in (*self.open, *self.handing, *self.in_flight) if unit]
        if self.failed_from is not None:
            pending.append(self.failed_from)
        return min(pending, default=self.processed_through + 1)

    def _count(self, limit: int, *, final: bool) -> None:
        """Count each acknowledged line before ``limit`` once: lines at or past the earliest
        refused one are published again by the next attempt, which counts them then.  Before the
        end (``final`` false), units holding lines past ``limit`` wait, so memory stays flat."""
        progress = self.progress
        waiting = []
        for unit in self.acked:
            counter = progress.dead_letters if unit.dead else progress.lines
            if unit.numbers[-1] < limit:
                counter.update(unit.labels)
            elif not final:
                waiting.append(unit)
            else:
                counter.update(
                    label
                    for number, label in zip(unit.numbers, unit.labels, strict=True)
                    if number < limit
                )
        self.acked = waiting


def dead_letter_headers(publisher: Publisher, n: int, reason: str) -> list[tuple[str, bytes]]:
    """A dead letter's headers, its detail aside: the line's place, the reason, CloudEvents."""
    return [
        ("datagrid-batch-id", publisher.key_batch),
        ("datagrid-line", str(n).encode()),
        ("forwarder-error", reason.encode()),
        # The value is the offending line's raw bytes, whatever they are.
        ("content-type", b"application/octet-stream"),
        *publisher.ce,
        ("ce_type", DEAD_LETTER_TYPE),
        ("ce_id", b"%s%d" % (publisher.ce_id, n)),
    ]


def fit_dead_letter(
    line: bytes, detail: str, room: int, headers: Sequence[tuple[str, bytes]], topic: str
) -> tuple[bytes, bytes]:
    """The dead letter's value and ``forwarder-error-detail`` within ``room`` bytes (the topic's
    limit less the key): the headers first, then the detail (up to 1024 bytes), then as much of
    the line as fits; a cut value says so in its detail. A topic too small for the headers alone
    can never take a dead letter: a configuration problem, not a line to lose."""
    room -= headers_size([*headers, ("forwarder-error-detail", b"")])
    if room < 0:
        raise KafkaConfigProblem(
            f"the dead-letter topic {topic}'s max.message.bytes is too small for a dead "
            f"letter's headers ({-room} bytes short): raise it to at least 4096",
            topic=topic,
        )
    budget = min(_DETAIL_LIMIT, room)
    text = detail.encode("utf-8", "replace")
    value = line
    if len(value) > room - min(len(text), budget):
        value = line[: max(room - budget, 0)]
        note = f"; value truncated to the first {len(value)} bytes".encode()
        text = text[: max(budget - len(note), 0)] + note
    # Cut on a character boundary: header values stay valid UTF-8.
    return value, text[:budget].decode("utf-8", "ignore").encode()


def _raw(line: bytes | Oversized) -> bytes:
    return line.prefix if isinstance(line, Oversized) else line
