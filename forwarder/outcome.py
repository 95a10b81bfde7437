"""A batch's outcome: its state record written (that write alone retried), counted, logged once.

:class:`Outcomes` is the last step of ``pipeline.Pipeline.forward``: once a batch is forwarded or
failed, its state goes to the state topic (in exactly-once mode inside a :class:`Transaction`,
with the job's offsets), its lines to the metrics, and one canonical log line says how it went.
Only the state write is ever retried here: the lines are in Kafka already, and a failing state
topic must never make them be sent again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError as AIOKafkaError

from forwarder.config import Settings
from forwarder.health import Health
from forwarder.kafka import kafka_errors, translate_send
from forwarder.observability import Metrics, Redactor
from forwarder.producers import SharedProducer
from forwarder.publish import Progress
from forwarder.retry import Policy, retry
from forwarder.state import BatchState, Status, parse_time, utcnow

log = structlog.get_logger("forwarder.pipeline")


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


def settle(state: BatchState, progress: Progress) -> None:
    """Copy the distinct lines now in Kafka into the state record."""
    state.lines = dict(progress.lines)
    state.dead_letters = dict(progress.dead_letters)
    state.blank_lines = progress.blank_lines


class Outcomes:
    """Writes, counts and logs the outcome of each batch."""

    def __init__(
        self,
        settings: Settings,
        producer: SharedProducer,
        metrics: Metrics,
        health: Health | None,
        policy: Policy,
    ) -> None:
        self._state_topic = settings.state_topic
        self._shared = producer
        self._metrics = metrics
        self._health = health
        self._policy = policy
        self._redact = Redactor.for_settings(settings)

    def fail(self, state: BatchState, exc: BaseException) -> None:
        """Mark ``state`` failed because of ``exc`` (no secret in what it records)."""
        state.fail(exc)
        if state.error is not None:
            state.error = self._redact.scrub(state.error)

    async def record(self, state: BatchState, txn: Transaction | None = None) -> None:
        """Write ``state`` to the state topic (with the job's offsets, in a transaction, if
        given), retrying only this write until it succeeds or the task is cancelled."""
        await retry(
            lambda: self._record_once(state, txn),
            self._policy,
            health=self._health,
            component="state_topic",
            logger=log.bind(batch_id=state.batch_id),
        )

    async def _record_once(self, state: BatchState, txn: Transaction | None) -> None:
        if txn is None:
            await self.send_state(state, self._shared.current)
            return
        with kafka_errors(f"recording state of {state.batch_id}"):
            async with txn.producer.transaction():
                await self.send_state(state, txn.producer)
                await txn.send_offsets()
            txn.offsets_committed = bool(txn.offsets)

    async def send_state(self, state: BatchState, producer: AIOKafkaProducer) -> None:
        """Send ``state`` through ``producer`` and wait for its acknowledgement (one try)."""
        try:
            future = await producer.send(
                self._state_topic, state.encode(), key=state.batch_id.encode()
            )
            await future
        except AIOKafkaError as exc:
            what = f"recording state of {state.batch_id}"
            raise translate_send(exc, what, producer, self._state_topic) from exc

    async def finish(
        self,
        state: BatchState,
        progress: Progress,
        logger: Any,
        txn: Transaction | None,
        duration: float,
    ) -> None:
        """Record the outcome (unless the transaction already did), count it, log one line."""
        settle(state, progress)
        state.finished_at = state.finished_at or utcnow()
        if txn is None or state.status is Status.FAILED:
            # (exactly-once success already wrote its state inside the transaction)
            await self.record(state, txn)
        self._count(progress)
        metrics = self._metrics
        metrics.batch_duration.observe(duration)
        metrics.batches.labels(outcome=state.status.value).inc()
        forward_delay: float | None = None
        terminal = parse_time(state.terminal_at)
        if state.status is Status.FORWARDED and terminal is not None:
            forward_delay = max((datetime.now(UTC) - terminal).total_seconds(), 0.0)
            metrics.forward_delay.observe(forward_delay)
        emit = logger.info if state.status is Status.FORWARDED else logger.warning
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
