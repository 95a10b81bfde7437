"""Prototype of the proposed hot path: ``forwarder forward`` with per-partition record batches.

Run like the service (same ``FORWARDER_*`` environment)::

    python -m bench.proto_fastpath [--mode batch|send] BATCH_ID

``--mode batch`` (default) is the full proposal below.  ``--mode send`` is the smaller step: keep
one ``producer.send()`` per line but pass ``partition=`` (our murmur2), keep no per-line entry,
count and update metrics per chunk, and await a chunk's futures together; it shows what the per-line
``send()`` itself costs once everything around it is cheap.

It reuses the service's building blocks unchanged (settings, topic check, ``make_producer``, the
Datagrid client, ``LineSplitter``, ``classify``, metrics, ``BatchState``) and replaces only what
``_Run.publish`` does per line:

* no ``await producer.send()`` per line: each valid line is appended to an open aiokafka
  ``BatchBuilder`` of its partition (``producer.create_batch()``), and a full builder goes to
  ``producer.send_batch()``: one future per ~800 lines instead of one per line, no per-line
  ``TopicPartition``/``RecordMetadata``/future, no per-line metadata wait;
* partition = Kafka's murmur2 computed here with a 2x faster pure-Python murmur2
  (``bench._common.murmur2``, equal to aiokafka's and Java's);
* acknowledgements, metrics and counters per batch, not per line (``labels().inc(n)``);
* the in-flight bound counts submitted batches' bytes, and waits on the oldest batch's future.

What it keeps: the same records (topic, key, value, partition, the four headers), dead letters
through the ordinary ``send()`` (rare), the state record, the byte bound on memory.  What it
leaves out (the port must keep it, see ``bench/RESULTS.md``): re-stream skipping after a broken
stream.  It does record per batch what that needs (first line number, the bytes of the line
before it, the line numbers), so its cost is in the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError as AIOKafkaError

from bench._common import murmur2
from forwarder.config import Settings, load_settings
from forwarder.datagrid import DatagridClient
from forwarder.errors import ForwarderError
from forwarder.kafka import RECORD_OVERHEAD_BYTES, make_producer, prepare_topics, translate
from forwarder.ndjson import LineHead, LineSplitter, Oversized, classify, is_blank
from forwarder.observability import Metrics, configure_logging, line_status_label
from forwarder.pipeline import BatchState

CONTENT_TYPE = ("content-type", b"application/json")


@dataclass(slots=True)
class _Unit:
    """Records acknowledged together: one record batch of one partition, or one dead letter."""

    first_line: int  # smallest line number in the unit
    before_first: bytes  # bytes of line first_line - 1: the restart boundary if this unit fails
    builder: Any = None  # aiokafka BatchBuilder while open
    future: asyncio.Future[Any] | None = None
    futures: list[asyncio.Future[Any]] = field(default_factory=list)  # --mode send
    size: int = 0
    line_numbers: list[int] = field(default_factory=list)
    labels: Counter[str] = field(default_factory=Counter)
    dead: bool = False


class FastRun:
    """One stream of one batch, publishing through per-partition record batches."""

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        metrics: Metrics,
        batch_id: str,
        partitions: int,
        results_limit: int,
        dlq_limit: int,
        mode: str = "batch",
    ) -> None:
        self.batch_mode = mode == "batch"
        self.settings = settings
        self.producer = producer
        self.metrics = metrics
        self.batch_id = batch_id
        self.key_batch = batch_id.encode()
        self.partitions = partitions
        self.topic = settings.results_topic
        self.limit = results_limit - RECORD_OVERHEAD_BYTES
        self.dlq_limit = dlq_limit - RECORD_OVERHEAD_BYTES
        self.max_in_flight = settings.max_in_flight_bytes
        self.prefix = [("datagrid-batch-id", self.key_batch), CONTENT_TYPE]
        self.open: list[_Unit | None] = [None] * partitions
        self.in_flight: deque[_Unit] = deque()
        self.in_flight_bytes = 0
        self.line_no = 0
        self.last_line = b""
        self.lines: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.blank = 0
        self.status_bytes: dict[object, bytes] = {}

    async def publish(self, lines: list[bytes | Oversized]) -> None:
        """Number, classify and append lines to their partition's open batch."""
        n = self.line_no
        prefix = self.prefix
        partitions = self.partitions
        open_units = self.open
        limit = self.limit
        status_bytes = self.status_bytes
        batch_mode = self.batch_mode
        send = self.producer.send
        chunk_unit: _Unit | None = None
        for line in lines:
            n += 1
            if type(line) is Oversized:
                self.line_no = n
                await self._dead_letter(n, line.prefix, "too_large", f"line of {line.size} bytes")
            elif is_blank(line):  # type: ignore[arg-type]
                self.blank += 1
            else:
                head = classify(line, self.batch_id)  # type: ignore[arg-type]
                if type(head) is not LineHead:
                    self.line_no = n
                    await self._dead_letter(n, line, *head)  # type: ignore[arg-type,misc]
                else:
                    key = head.custom_id.encode()  # type: ignore[attr-defined]
                    if len(line) + len(key) > limit:  # type: ignore[arg-type]
                        self.line_no = n
                        raw = cast(bytes, line)
                        await self._dead_letter(n, raw, "too_large", "exceeds max.message.bytes")
                        self.last_line = raw
                        continue
                    status = head.status
                    sb = status_bytes.get(status)
                    if sb is None:
                        sb = status_bytes[status] = (
                            status.encode() if isinstance(status, str) else b""
                        )
                    headers = [*prefix, ("datagrid-status", sb), ("datagrid-line", b"%d" % n)]
                    p = (murmur2(key) & 0x7FFFFFFF) % partitions
                    if not batch_mode:
                        unit = chunk_unit
                        if unit is None:
                            unit = chunk_unit = _Unit(n, self.last_line)
                        unit.futures.append(
                            await send(self.topic, line, key, partition=p, headers=headers)
                        )
                        unit.size += len(line)  # type: ignore[arg-type]
                        unit.line_numbers.append(n)
                        unit.labels[line_status_label(status)] += 1
                        self.last_line = line  # type: ignore[assignment]
                        continue
                    unit = open_units[p]
                    if unit is None:
                        unit = open_units[p] = _Unit(
                            n, self.last_line, self.producer.create_batch()
                        )
                    if (
                        unit.builder.append(key=key, value=line, timestamp=None, headers=headers)
                        is None
                    ):
                        self.line_no = n - 1
                        await self._submit(p)
                        unit = open_units[p] = _Unit(
                            n, self.last_line, self.producer.create_batch()
                        )
                        if (
                            unit.builder.append(
                                key=key, value=line, timestamp=None, headers=headers
                            )
                            is None
                        ):
                            raise RuntimeError(f"line {n} does not fit an empty batch")
                    unit.size += len(line)  # type: ignore[arg-type]
                    unit.line_numbers.append(n)
                    unit.labels[line_status_label(status)] += 1
            self.last_line = line if type(line) is bytes else line.prefix  # type: ignore[union-attr]
        self.line_no = n
        if chunk_unit is not None:
            self._track(chunk_unit)
        # Release what Kafka already acknowledged (keeps memory flat), then respect the bound.
        while self.in_flight and self._done(self.in_flight[0]):
            await self._ack_oldest()
        while self.in_flight_bytes > self.max_in_flight:
            await self._ack_oldest()

    @staticmethod
    def _done(unit: _Unit) -> bool:
        if unit.future is not None:
            return unit.future.done()
        return unit.futures[-1].done() and all(f.done() for f in unit.futures)

    async def _submit(self, p: int) -> None:
        unit = self.open[p]
        assert unit is not None
        self.open[p] = None
        try:
            unit.future = await self.producer.send_batch(unit.builder, self.topic, partition=p)
        except AIOKafkaError as exc:
            raise translate(exc, f"producing a batch at line {unit.first_line}") from exc
        unit.builder = None
        self._track(unit)

    def _track(self, unit: _Unit) -> None:
        self.in_flight.append(unit)
        self.in_flight_bytes += unit.size
        sent = time.perf_counter()
        (unit.future or unit.futures[-1]).add_done_callback(
            lambda _f: self.metrics.produce_latency.observe(time.perf_counter() - sent)
        )

    async def _dead_letter(self, n: int, line: bytes, reason: str, detail: str) -> None:
        value = line[: self.dlq_limit]
        headers = [
            ("datagrid-batch-id", self.key_batch),
            ("datagrid-line", str(n).encode()),
            ("forwarder-error", reason.encode()),
            ("forwarder-error-detail", detail.encode("utf-8", "replace")[:1024]),
        ]
        future = await self.producer.send(
            self.settings.dead_letter_topic, value, self.key_batch, headers=headers
        )
        unit = _Unit(n, self.last_line, future=future, size=len(line), line_numbers=[n], dead=True)
        unit.labels[reason] += 1
        self._track(unit)

    async def _ack_oldest(self) -> None:
        unit = self.in_flight.popleft()
        self.in_flight_bytes -= unit.size
        try:
            if unit.future is not None:
                await unit.future
            else:
                for future in unit.futures:
                    if not future.done():
                        await future
                    elif future.exception() is not None:
                        raise future.exception()  # type: ignore[misc]
        except AIOKafkaError as exc:
            # The port must compute the acknowledged prefix here: min(first_line of every failed
            # or unsent unit) - 1, boundary = that unit's before_first (see RESULTS.md).
            raise translate(exc, f"batch from line {unit.first_line} not acknowledged") from exc
        if unit.dead:
            self.dead_letters.update(unit.labels)
            for reason, count in unit.labels.items():
                self.metrics.dead_letters.labels(reason=reason).inc(count)
        else:
            self.lines.update(unit.labels)
            for status, count in unit.labels.items():
                self.metrics.lines_forwarded.labels(status=status).inc(count)

    async def drain(self) -> None:
        """Submit the open batches and wait for every acknowledgement."""
        for p, unit in enumerate(self.open):
            if unit is not None:
                await self._submit(p)
        while self.in_flight:
            await self._ack_oldest()


async def forward(settings: Settings, batch_id: str, mode: str = "batch") -> BatchState:
    """Forward one batch with the fast path; return its final state (also on the state topic)."""
    metrics = Metrics(process=False)
    limits = await prepare_topics(settings)
    producer = make_producer(settings, limits)
    await producer.start()
    datagrid = DatagridClient(
        settings.datagrid_base_url,
        settings.require_api_key(),
        read_timeout=settings.datagrid_read_timeout,
        on_response=metrics.on_upstream_response,
    )
    state = BatchState(
        batch_id=batch_id,
        status="forwarding",
        source="cli",
        attempts=1,
        delivery=settings.delivery.value,
    )
    started = time.perf_counter()
    try:
        batch = await datagrid.get_batch(batch_id)
        state.batch_status = batch.get("status")
        partitions = len(await producer.partitions_for(settings.results_topic))
        run = FastRun(
            settings,
            producer,
            metrics,
            batch_id,
            partitions,
            limits.results,
            limits.dead_letters,
            mode,
        )
        try:
            async with datagrid.stream_results(batch_id) as chunks:
                splitter = LineSplitter(max(limits.results, limits.dead_letters))
                async for chunk in chunks:
                    lines = splitter.feed(chunk)
                    if lines:
                        await run.publish(lines)
                tail = splitter.close()
                if tail:
                    await run.publish(tail)
        finally:
            await run.drain()
        state.status = "forwarded"
        state.lines, state.dead_letters = dict(run.lines), dict(run.dead_letters)
        state.blank_lines = run.blank
    except ForwarderError as exc:
        state.status = "failed"
        state.error = {"code": exc.code, "detail": str(exc)}
    finally:
        future = await producer.send(settings.state_topic, state.encode(), key=batch_id.encode())
        await future
        await producer.stop()
        await datagrid.aclose()
    print(
        f"{batch_id}: {state.status}: {sum(state.lines.values())} lines {dict(state.lines)}, "
        f"{sum(state.dead_letters.values())} dead letters, {state.blank_lines} blank, "
        f"{time.perf_counter() - started:.2f} s",
        file=sys.stderr,
    )
    return state


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proto_fastpath")
    parser.add_argument("--mode", choices=("batch", "send"), default="batch")
    parser.add_argument("batch_id")
    args = parser.parse_args()
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level, stream=sys.stderr)
    state = asyncio.run(forward(settings, args.batch_id, args.mode))
    return 0 if state.status == "forwarded" else 1


if __name__ == "__main__":
    sys.exit(main())
