"""One batch, end to end: fetch it, stream its results into Kafka, record its state.

``Pipeline.forward`` checks the batch is terminal, streams its NDJSON results through a
``publish.Publisher`` per attempt, and records the batch's state.  Retries follow the error tree
(``errors.Retry``) and wait by one ``errors.Backoff``.  After a stream breaks midway, at-least-once
mode re-streams and skips the lines Kafka already acknowledged (checking that the upstream replays
the same lines in the same order); exactly-once mode aborts the attempt's transaction and starts
again from line 1.  A batch is ``forwarded`` only when its stream ended cleanly and, when Datagrid
reported ``request_counts.total``, held exactly that many result lines.  Every attempt runs within
the batch's deadline (``FORWARDER_BATCH_TIMEOUT_SECONDS``).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError as AIOKafkaError

from forwarder.config import Settings
from forwarder.datagrid import (
    MAX_BATCH_ITEMS,
    TERMINAL_STATUSES,
    DatagridClient,
    check_batch_id,
    expected_lines,
    terminal_time,
)
from forwarder.errors import (
    KAFKA_BACKOFF,
    Backoff,
    BatchNotReady,
    BatchTimeout,
    ForwarderError,
    IncompleteStream,
    KafkaError,
    ProducerFailed,
    Retry,
    UpstreamUnavailable,
)
from forwarder.health import Health
from forwarder.kafka import TopicLimits, kafka_errors, translate_send
from forwarder.ndjson import LineSplitter, is_complete_object, without_bom
from forwarder.observability import Metrics, Redactor
from forwarder.producers import SharedProducer
from forwarder.publish import Batch, Progress, PublishConfig, Publisher
from forwarder.retry import TRANSIENT_OR_CONFIG, Policy, retry
from forwarder.state import BatchState, Status, iso, parse_time, utcnow

log = structlog.get_logger("forwarder.pipeline")

#: Blank lines a stream may hold besides its result lines before it counts as runaway.
BLANK_LINE_ALLOWANCE = 10_000


@dataclass(slots=True)
class Transaction:
    """Exactly-once context: the transactional producer, and the job offsets to commit with it."""

    producer: AIOKafkaProducer
    offsets: dict[TopicPartition, int] | None = None
    group_id: str | None = None
    #: Set once a transaction carrying ``offsets`` committed: the consumer need not commit them.
    offsets_committed: bool = False

    async def send_offsets(self) -> None:
        """Add the job's offsets to the open transaction (if any are to be committed)."""
        if self.offsets:
            await self.producer.send_offsets_to_transaction(self.offsets, self.group_id)


#: At-least-once: batches whose acknowledged lines are remembered after a call that raised, so
#: that the job's next try in this process skips them (the oldest are forgotten past this).
RESUMABLE_BATCHES = 1024


@dataclass
class _Attempt:
    """One try at a batch: what every step of it needs."""

    state: BatchState
    producer: AIOKafkaProducer
    logger: Any
    number: int = 0
    progress: Progress = field(default_factory=Progress)
    last_error: ForwarderError | None = None


class Pipeline:
    """Forwards batches with a shared upstream client and producer (or a transaction's producer)."""

    def __init__(
        self,
        settings: Settings,
        datagrid: DatagridClient,
        producer: SharedProducer,
        limits: TopicLimits,
        metrics: Metrics,
        health: Health | None = None,
    ) -> None:
        self._settings = settings
        self._datagrid = datagrid
        self._shared = producer
        self._metrics = metrics
        self._publish = PublishConfig.build(settings, limits, metrics)
        self._redact = Redactor.for_settings(settings)
        #: The service's health (None in one-shot commands); the worker reports to it too.
        self.health = health
        # A service (with a health to report to) waits out configuration problems; a one-shot
        # command ends on one, and gives up on a failing state write after the attempts.
        retry_on = TRANSIENT_OR_CONFIG if health is not None else frozenset({Retry.BACKOFF})
        self._attempt_policy = Policy(
            "batch_attempt_failed",
            Backoff(settings.retry_base_seconds, settings.retry_max_seconds),
            attempts=settings.max_attempts,
            retry_on=retry_on,
        )
        self._record_policy = Policy(
            "state_write_failed",
            Backoff(settings.retry_base_seconds, KAFKA_BACKOFF.cap),
            attempts=None if health is not None else settings.max_attempts,
            retry_on=retry_on,
        )
        self._resumable: OrderedDict[str, Progress] = OrderedDict()

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
        Without it (at-least-once), a re-stream skips the lines already acknowledged, and so does
        the next call for the same batch after this one raised: this process never sends a line
        again that Kafka acknowledged.

        Returns the final state (``forwarded`` or ``failed``).  Raises :class:`KafkaError` when
        Kafka keeps failing (still retriable after the last attempt, or a configuration problem
        that outlived the batch's deadline): the caller must not count the job as done.  Once the
        outcome is known, only the state record's write is retried (:meth:`record`).
        """
        check_batch_id(batch_id)
        delivery = self._settings.delivery.value if txn is None else "exactly-once"
        state = BatchState.forwarding(batch_id, source=source, event_id=event_id, delivery=delivery)
        progress = self._resumable.pop(batch_id, None) if txn is None else None
        attempt = _Attempt(
            state,
            txn.producer if txn else self._shared.current,
            log.bind(batch_id=batch_id, event_id=event_id, source=source),
            progress=progress or Progress(),
        )
        started = time.perf_counter()
        deadline = asyncio.timeout(self._settings.batch_timeout_seconds)
        self._metrics.batches_in_flight.inc()
        try:
            async with deadline:
                await self._attempts(attempt, txn)
        except TimeoutError:
            if not deadline.expired():
                raise
            if isinstance(attempt.last_error, KafkaError):
                # Kafka failing (or refusing this pod's setup) is no fault of the batch's: no
                # outcome; the job is kept and tried again.
                self._keep_for_resume(attempt, txn)
                raise attempt.last_error from None
            self._fail(state, BatchTimeout(f"batch {batch_id} took longer than the batch timeout"))
            attempt.logger.warning("batch_timeout", timeout_s=self._settings.batch_timeout_seconds)
        except ForwarderError as exc:
            # Not terminal yet (LATER), another owner (HAND_OFF), or Kafka still failing after the
            # last attempt (or refusing this pod's setup): no outcome for this batch; the caller
            # keeps the job (uncommitted).
            # (A one-shot command does not wait out a configuration problem: the batch fails,
            # and its state says why.)
            if exc.retry in (Retry.LATER, Retry.HAND_OFF) or (
                isinstance(exc, KafkaError) and exc.retry in self._attempt_policy.retry_on
            ):
                self._keep_for_resume(attempt, txn)
                raise
            self._fail(state, exc)
        except Exception as exc:  # a bug must fail one batch, not the worker
            attempt.logger.exception("batch_internal_error")
            self._metrics.internal_errors.labels(where="job").inc()
            self._fail(state, exc)
        finally:
            self._metrics.batches_in_flight.dec()
        await self._finish(attempt, txn, time.perf_counter() - started)
        return state

    def _keep_for_resume(self, attempt: _Attempt, txn: Transaction | None) -> None:
        """At-least-once: what Kafka acknowledged of this batch, for the job's next try here."""
        if txn is None and attempt.progress.acked_through:
            self._resumable[attempt.state.batch_id] = attempt.progress
            while len(self._resumable) > RESUMABLE_BATCHES:
                self._resumable.popitem(last=False)

    async def _attempts(self, attempt: _Attempt, txn: Transaction | None) -> None:
        """Try until forwarded, a permanent error, or the last attempt (``retry.retry``)."""

        async def one() -> None:
            attempt.number = attempt.state.attempts = attempt.number + 1
            attempt.last_error = None  # the deadline judges the failure it interrupts, if any
            if txn is None:
                await self._attempt(attempt)
            else:
                await self._transaction(attempt, txn)

        try:
            await retry(
                one,
                self._attempt_policy,
                health=self.health,
                component=self.component_of,
                before_retry=lambda exc, _n: self._before_retry(attempt, exc, txn),
                logger=attempt.logger,
            )
        except ForwarderError as exc:
            attempt.last_error = exc
            raise
        attempt.state.status = Status.FORWARDED

    async def _before_retry(
        self, attempt: _Attempt, exc: ForwarderError, txn: Transaction | None
    ) -> dict[str, Any]:
        attempt.last_error = exc
        if isinstance(exc, ProducerFailed) and txn is None:
            await self._shared.replace(attempt.producer)
            attempt.producer = self._shared.current
        broken = attempt.state.stream_restarts or attempt.progress.high_water
        self._metrics.retries.labels(reason="stream_broken" if broken else exc.code).inc()
        return {"attempt": attempt.number, "acked_through": attempt.progress.acked_through}

    def component_of(self, exc: ForwarderError) -> str | None:
        """The component (``health.Health``) a configuration problem belongs to: the topic the
        failing record was for."""
        topic = getattr(exc, "topic", None)
        settings = self._settings
        return (
            {
                settings.results_topic: "results_topic",
                settings.dead_letter_topic: "dead_letter_topic",
                settings.state_topic: "state_topic",
                settings.jobs_topic: "jobs_topic",
            }.get(topic)
            if isinstance(topic, str)
            else None
        )

    async def _transaction(self, attempt: _Attempt, txn: Transaction) -> None:
        """One exactly-once attempt: lines, state and offsets commit together or not at all."""
        attempt.progress = Progress()  # an aborted attempt leaves nothing behind: from line 1
        producer = txn.producer
        with kafka_errors(f"transaction for {attempt.state.batch_id}"):
            async with producer.transaction():
                await self._attempt(attempt)
                attempt.state.status = Status.FORWARDED
                attempt.state.finished_at = utcnow()
                self._settle(attempt)
                await self._send_state(attempt.state, producer)
                await txn.send_offsets()
            txn.offsets_committed = bool(txn.offsets)

    async def _attempt(self, attempt: _Attempt) -> None:
        """Fetch the batch; if terminal, stream its results through a publisher."""
        state, progress = attempt.state, attempt.progress
        batch = await self._datagrid.get_batch(state.batch_id)
        status = batch.get("status")
        state.batch_status = status if isinstance(status, str) else None
        if status not in TERMINAL_STATUSES:
            raise BatchNotReady(
                f"batch {state.batch_id} is {str(status)[:40]!r}, not terminal yet",
                batch_status=state.batch_status,
                problem={"expires_at": batch.get("expires_at")},
            )
        terminal = terminal_time(batch)
        state.terminal_at = iso(terminal) if terminal else None
        state.expected_lines = expected = expected_lines(batch)
        if progress.high_water:
            state.stream_restarts += 1
            self._metrics.stream_restarts.inc()
            attempt.logger.info(
                "stream_restart", attempt=attempt.number, skip_lines=progress.acked_through
            )
        # Read once per attempt: partitions added mid-batch take effect at the next attempt.
        with kafka_errors("reading the results topic's partitions"):
            partitions = len(await attempt.producer.partitions_for(self._settings.results_topic))
        # Without a total, a batch still holds at most Datagrid's 5,000 items: more is a runaway.
        most = MAX_BATCH_ITEMS if expected is None else expected
        publisher = Publisher(
            self._publish,
            attempt.producer,
            Batch(
                state.batch_id,
                state.event_id,
                most,
                most + BLANK_LINE_ALLOWANCE,
                state.terminal_at or state.started_at or "",
            ),
            progress,
            partitions,
        )
        try:
            await self._stream(publisher)
        except asyncio.CancelledError:
            publisher.abandon()
            raise
        finally:
            # Whatever happened, wait for what was handed to Kafka: it decides what is acknowledged.
            await publisher.drain()
        if expected is not None and progress.result_lines < expected:
            raise IncompleteStream(
                f"stream of {state.batch_id} ended after {progress.result_lines} of its "
                f"{expected} result lines"
            )

    async def _stream(self, publisher: Publisher) -> None:
        batch_id = publisher.batch.batch_id
        async with self._datagrid.stream_results(batch_id) as stream:
            splitter = LineSplitter(self._publish.max_line)
            async for chunk in without_bom(stream.chunks):
                lines = splitter.feed(chunk)
                if lines:
                    await publisher.publish(lines)
                    publisher.linger()
            tail = splitter.close()
            if tail and stream.close_delimited and not is_complete_object(tail[0]):
                # Only a closed connection ended this body: a last line without its newline is
                # a cut, unless it is a whole JSON object (a cut one never parses). Whether the
                # body held every line is the total's check (IncompleteStream), as for any body.
                raise UpstreamUnavailable(f"stream of {batch_id} ended in the middle of a line")
            if tail:
                await publisher.publish(tail)

    async def record(self, state: BatchState, txn: Transaction | None = None) -> None:
        """Write ``state`` to the state topic (with the job's offsets, in a transaction, if
        given), retrying only this write until it succeeds or the task is cancelled: once lines
        are in Kafka, a failing state topic must never make them be sent again."""
        await retry(
            lambda: self._record_once(state, txn),
            self._record_policy,
            health=self.health,
            component="state_topic",
            logger=log.bind(batch_id=state.batch_id),
        )

    async def _record_once(self, state: BatchState, txn: Transaction | None) -> None:
        if txn is None:
            await self._send_state(state, self._shared.current)
            return
        with kafka_errors(f"recording state of {state.batch_id}"):
            async with txn.producer.transaction():
                await self._send_state(state, txn.producer)
                await txn.send_offsets()
            txn.offsets_committed = bool(txn.offsets)

    async def _send_state(self, state: BatchState, producer: AIOKafkaProducer) -> None:
        topic = self._settings.state_topic
        try:
            future = await producer.send(topic, state.encode(), key=state.batch_id.encode())
            await future
        except AIOKafkaError as exc:
            what = f"recording state of {state.batch_id}"
            raise translate_send(exc, what, producer, topic) from exc

    def _settle(self, attempt: _Attempt) -> None:
        """Copy the distinct lines now in Kafka into the state record."""
        state, progress = attempt.state, attempt.progress
        state.lines = dict(progress.lines)
        state.dead_letters = dict(progress.dead_letters)
        state.blank_lines = progress.blank_lines

    def _fail(self, state: BatchState, exc: BaseException) -> None:
        state.fail(exc)
        if state.error is not None:
            state.error = self._redact.scrub(state.error)

    async def _finish(self, attempt: _Attempt, txn: Transaction | None, duration: float) -> None:
        """Record the outcome (unless the transaction already did), count it, log one line."""
        state = attempt.state
        if state.status is Status.FAILED and txn is not None:
            attempt.progress = Progress()  # every attempt was aborted: nothing of it is visible
        self._settle(attempt)
        state.finished_at = state.finished_at or utcnow()
        if txn is None or state.status is Status.FAILED:
            # (exactly-once success already wrote its state inside the transaction)
            await self.record(state, txn)
        self._count(attempt.progress)
        metrics = self._metrics
        metrics.batch_duration.observe(duration)
        metrics.batches.labels(outcome=state.status.value).inc()
        forward_delay: float | None = None
        terminal = parse_time(state.terminal_at)
        if state.status is Status.FORWARDED and terminal is not None:
            forward_delay = max((datetime.now(UTC) - terminal).total_seconds(), 0.0)
            metrics.forward_delay.observe(forward_delay)
        emit = attempt.logger.info if state.status is Status.FORWARDED else attempt.logger.warning
        emit(
            "batch_" + state.status.value,
            attempt=state.attempts,
            lines=state.lines,
            dead_letters=state.dead_letters,
            blank_lines=state.blank_lines,
            expected_lines=state.expected_lines,
            stream_restarts=state.stream_restarts,
            duration_s=round(duration, 3),
            forward_delay_s=None if forward_delay is None else round(forward_delay, 3),
            delivery=state.delivery,
            error=state.error,
        )

    def _count(self, progress: Progress) -> None:
        """Add what is now visible in Kafka to the metrics (once, at the end of the batch)."""
        metrics = self._metrics
        for status, n in progress.lines.items():
            metrics.lines_forwarded.labels(status=status).inc(n)
        for reason, n in progress.dead_letters.items():
            metrics.dead_letters.labels(reason=reason).inc(n)
        if progress.blank_lines:
            metrics.blank_lines.inc(progress.blank_lines)
