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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from forwarder import hotpath
from forwarder.acks import Acks, Unit
from forwarder.config import Settings
from forwarder.errors import ForwarderError, KafkaConfigProblem, StreamDiverged, TooManyLines
from forwarder.kafka import _MURMUR_SEED, RECORD_OVERHEAD_BYTES, TopicLimits, translate_send
from forwarder.kafka import _hash as _murmur2
from forwarder.ndjson import UNSET, Oversized, classify, decode_head
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
    #: Whether records carry the CloudEvents headers (``FORWARDER_CLOUDEVENTS``).
    cloudevents: bool = True
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
            cloudevents=settings.cloudevents,
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
        self.open: list[Unit | None] = [None] * partitions
        self.acks = Acks(
            progress,
            config.max_in_flight,
            refused=self._refused,
            not_handed_from=self._not_handed_from,
            observe_latency=config.metrics.produce_latency.observe,
        )
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Future[None] | None = None
        # CloudEvents: ce_id is "<batch id>:<line>", unique within ce_source (the batch) and the
        # same whenever the line is forwarded again, so consumers dedupe on (source, id). Off
        # (FORWARDER_CLOUDEVENTS=false): no ce_* header, and an empty ce_id prefix says so.
        self.ce_id = self.key_batch + b":" if config.cloudevents else b""
        ce = [
            CE_SPECVERSION,
            ("ce_source", (config.source_base + batch.batch_id).encode()),
            ("ce_time", (batch.time or utcnow()).encode()),
        ]
        ce = ce if config.cloudevents else []
        prefix = [("datagrid-batch-id", self.key_batch), CONTENT_TYPE]
        if batch.event_id:
            prefix.append(("datagrid-event-id", batch.event_id.encode()))
        result_type = [("ce_type", RESULT_TYPE)] if config.cloudevents else []
        self.result_headers = [*prefix, *ce, *result_type]
        self.dead_letters = DeadLetterTarget(
            config.dead_letter_topic,
            self.key_batch,
            config.dead_letter_limit - len(self.key_batch),
            tuple(ce),
            self.ce_id,
        )
        self.heads: dict[bytes, tuple[tuple[str, bytes], ...]] = {}
        # Every result record's fixed headers, plus the per-line ones: datagrid-status (its
        # value counted per line), datagrid-line and ce_id (names, 10 digits each, framing).
        self.fixed_size = (
            headers_size(self.result_headers) + 3 * _HEADER_OVERHEAD + 64 + len(self.ce_id)
        )
        hooks = hotpath.Hooks(decode_head, config.status_of, self._heads_for, self._open, _murmur2)
        route = self.route = hotpath.Lines(batch.batch_id, hooks, UNSET, _MURMUR_SEED)
        route.skip_through, route.boundary = progress.acked_through, progress.boundary
        route.first_new, route.max_lines = progress.high_water, batch.max_lines
        route.expected = -1 if batch.expected_lines is None else batch.expected_lines
        route.limit, route.fixed_size = config.results_limit, self.fixed_size
        route.ce_id = self.ce_id
        route.open_units, route.statuses, route.heads = self.open, config.statuses, self.heads
        route.last, route.blank = progress.boundary, progress.blank_lines

    @property
    def line_no(self) -> int:
        """The last line read (numbered) by this attempt."""
        return self.route.line_no

    @property
    def processed_through(self) -> int:
        """The last line fully handled (in a unit, dead-lettered, blank or skipped)."""
        return self.route.processed

    @property
    def last_line(self) -> bytes:
        """The bytes of line ``processed_through``."""
        return self.route.last

    async def publish(self, lines: Sequence[bytes | Oversized]) -> None:
        """Number, classify and batch lines; wait while too much is unacknowledged.

        The per-line work is :meth:`forwarder.hotpath.Lines.run`, one call for the whole chunk
        (compiled in wheel builds); it returns here only for a line that needs an await or an
        error, which :meth:`_attend` handles before the run resumes after it.
        """
        route, end = self.route, len(lines)
        try:
            index = route.run(lines, 0)
            while index < end:
                await self._attend(lines[index])
                index = route.run(lines, index + 1)
        finally:
            # What was fully handled, for the next chunk, drain() and the next attempt.
            progress = self.progress
            progress.blank_lines = route.blank
            progress.high_water = max(progress.high_water, route.processed)
        await self.acks.settle()

    async def _attend(self, line: bytes | Oversized) -> None:
        """The line the hot path stopped at (numbered, not handled): raise, or dead-letter it, or
        hand its partition's full record batch over and append its record to a new one."""
        route = self.route
        n, stop, before = route.line_no, route.stop, route.last
        problem = self._refusal(stop, n)
        if problem is not None:
            raise problem
        if isinstance(line, Oversized):
            detail = f"line of {line.size} bytes exceeds the limit"
            await self._dead_letter(n, line.prefix, "too_large", detail, before)
            route.last = line.prefix
        elif stop == hotpath.REFUSED:
            verdict = classify(line, self.batch.batch_id)
            assert isinstance(verdict, tuple), f"line {n}: the hot path and classify() disagree"
            await self._dead_letter(n, line, *verdict, before)
            route.last = line
        elif stop == hotpath.TOO_LARGE:
            detail = self._too_large(line, route.size, route.status)
            await self._dead_letter(n, line, "too_large", detail, before)
            route.last = line
        else:
            assert stop == hotpath.FULL, stop
            # Hand it over and start the next one with this line (an empty batch takes any
            # record that passed the size check).
            partition = route.partition
            await self._submit(partition)
            unit = self._open(partition, n, before)
            unit.builder.append(key=route.key, value=line, timestamp=None, headers=route.headers)
            unit.numbers.append(n)
            unit.labels.append(route.label)
            route.last = line
        route.processed = n

    def _refusal(self, stop: int, n: int) -> ForwarderError | None:
        """The error that ends the attempt at line ``n``, if the hot path stopped for one (a
        diverged re-stream also gives up the prefix the next attempt could have skipped)."""
        batch_id = self.batch.batch_id
        if stop == hotpath.TOO_MANY_LINES:
            return TooManyLines(f"stream of {batch_id} exceeds {n - 1} lines")
        if stop == hotpath.DIVERGED:
            self.progress.acked_through = 0
            return StreamDiverged(
                f"re-stream of {batch_id} differs at line {n}; re-publishing all lines"
            )
        if stop == hotpath.PAST_TOTAL:  # refused before it reaches Kafka
            return self._too_many_lines()
        return None

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

    def _too_large(self, line: bytes, size: int, status: object) -> str:
        status = status if isinstance(status, str) else ""
        limit = self.config.results_limit + RECORD_OVERHEAD_BYTES
        return (
            f"record of {size} bytes (line {len(line)}, status header {len(status.encode())}) "
            f"exceeds the results topic's max.message.bytes ({limit})"
        )

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
                with contextlib.suppress(
                    ForwarderError
                ):  # recorded by acks.failed; publish raises it
                    await self._submit(partition)

    def _open(self, partition: int, n: int, before: bytes) -> Unit:
        unit = self.open[partition] = Unit(n, before, self.producer.create_batch())
        return unit

    async def _submit(self, partition: int) -> None:
        unit = self.open[partition]
        assert unit is not None
        self.open[partition], unit.size = None, unit.builder.size()
        topic = self.config.results_topic
        send = self.producer.send_batch(unit.builder, topic, partition=partition)
        await self.acks.hand_over(unit, send)
        unit.builder = None

    async def _dead_letter(
        self, n: int, line: bytes, reason: str, detail: str, before: bytes
    ) -> None:
        value, headers = dead_letter(line, n, reason, detail, self.dead_letters)
        unit = Unit(n, before, size=len(value), dead=True)
        unit.numbers.append(n)
        unit.labels.append(reason)
        target = self.dead_letters
        send = self.producer.send(target.topic, value, target.key, headers=headers)
        await self.acks.hand_over(unit, send)

    def _refused(self, unit: Unit, exc: BaseException) -> ForwarderError:
        """A producer's refusal of ``unit``, classified for the topic it was for."""
        topic = self.config.dead_letter_topic if unit.dead else self.config.results_topic
        what = f"lines from {unit.first_line} not acknowledged"
        return translate_send(exc, what, self.producer, topic)

    def _not_handed_from(self) -> int:
        """The first line not handed to the producer yet (in an open record batch, or unread)."""
        lines = [unit.first_line for unit in self.open if unit is not None]
        return min(lines, default=self.processed_through + 1)

    def abandon(self) -> None:
        """The attempt was cancelled (a rebalance or shutdown gave its job away): hand nothing
        more to Kafka, so the job's next owner does not find extra copies of unsent lines."""
        self._stop_timer()
        self.open[:] = [None] * self.partitions

    async def drain(self) -> None:
        """Hand over the open batches, wait for every acknowledgement, settle the counts and the
        prefix that the next attempt may skip."""
        self._stop_timer()
        if self._flushing is not None:
            await asyncio.wait({self._flushing})
        await self._submit_open()
        await self.acks.wait_all()
        self.acks.close(self.line_no, self.processed_through, self.last_line)


@dataclass(frozen=True, slots=True)
class DeadLetterTarget:
    """Where a batch's dead letters go and what every one of them carries (built per attempt)."""

    topic: str
    key: bytes  # the batch id
    room: int  # the topic's limit for a record, less the key
    cloudevent: tuple[tuple[str, bytes], ...]  # the batch's fixed CloudEvents attributes
    ce_id: bytes  # "<batch id>:" (the line number completes it)


def dead_letter(
    line: bytes, n: int, reason: str, detail: str, target: DeadLetterTarget
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A dead letter's value and headers (pure): line ``n``'s bytes, cut to the room if need be,
    with its place, the reason and its detail, and the CloudEvents attributes."""
    headers = [
        ("datagrid-batch-id", target.key),
        ("datagrid-line", str(n).encode()),
        ("forwarder-error", reason.encode()),
        # The value is the offending line's raw bytes, whatever they are.
        ("content-type", b"application/octet-stream"),
    ]
    if target.ce_id:  # CloudEvents on (FORWARDER_CLOUDEVENTS)
        headers += [
            *target.cloudevent,
            ("ce_type", DEAD_LETTER_TYPE),
            ("ce_id", b"%s%d" % (target.ce_id, n)),
        ]
    value, detail_bytes = fit_dead_letter(line, detail, target.room, headers, target.topic)
    return value, [*headers, ("forwarder-error-detail", detail_bytes)]


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
