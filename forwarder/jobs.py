"""The durable queue of batches: jobs in, the consumer loop, and the memory of what was forwarded.

* :class:`JobQueue` writes jobs (key: batch id) and returns once Kafka acknowledged them.
* :class:`StateStore` reads the compacted state topic into a dict: every pod knows each batch's
latest
  state, which makes "forward each batch once" hold across restarts and pods.
* :class:`Worker` is a consumer group member on the jobs topic.  It runs up to ``concurrency``
batches
  at once and commits a partition's offset only up to its oldest unfinished job, so a crash redoes
  unfinished work and never skips it.  A batch that is not terminal yet is parked as a ``waiting``
  state record (durable) and re-checked on a timer by the pod owning its jobs partition, so it
  blocks
  neither a slot nor its partition's commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError as AIOKafkaError

from forwarder.config import Settings
from forwarder.datagrid import check_batch_id
from forwarder.errors import BatchNotReady, Fenced, ForwarderError, InvalidBatchId, KafkaError
from forwarder.kafka import connection_options, partition_for, topic_partitions, translate
from forwarder.observability import Metrics
from forwarder.pipeline import BatchState, Pipeline, Transaction, utcnow

log = structlog.get_logger("forwarder.jobs")


class Job(msgspec.Struct, omit_defaults=True):
    """One request to forward a batch: the jobs topic's value."""

    batch_id: str
    source: str = "producer"
    event_id: str | None = None
    replay: bool = False

    def encode(self) -> bytes:
        """JSON for the jobs topic."""
        return msgspec.json.encode(self)


_decode_job = msgspec.json.Decoder(Job).decode


def parse_job(value: bytes | None) -> Job:
    """A job from a jobs-topic value: JSON, or a bare batch id written by any producer."""
    if not value:
        raise InvalidBatchId("empty job")
    text = value.strip()
    if text[:1] == b"{":
        try:
            job = _decode_job(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidBatchId(f"job is not a valid JSON job: {exc}") from exc
    else:
        if text[:1] == b'"':  # a JSON string is a bare id too
            try:
                text = msgspec.json.decode(text, type=str).encode()
            except msgspec.DecodeError as exc:
                raise InvalidBatchId("job is not valid JSON") from exc
        job = Job(batch_id=text.decode("utf-8", "replace"))
    check_batch_id(job.batch_id)
    return job


class JobQueue:
    """Writes jobs to the jobs topic through a shared producer."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def put(self, job: Job) -> None:
        """Queue ``job``; returns only after Kafka acknowledged it (durable)."""
        check_batch_id(job.batch_id)
        try:
            future = await self._producer.send(self._topic, job.encode(), key=job.batch_id.encode())
            await future
        except AIOKafkaError as exc:
            raise translate(exc, f"queueing {job.batch_id}") from exc


async def enqueue_jobs(
    settings: Settings, batch_ids: list[str], *, replay: bool, source: str
) -> None:
    """Queue batch ids with a short-lived producer (the ``enqueue`` command)."""
    for batch_id in batch_ids:
        check_batch_id(batch_id)
    producer = AIOKafkaProducer(**connection_options(settings), acks="all", enable_idempotence=True)
    try:
        await producer.start()
        queue = JobQueue(producer, settings.jobs_topic)
        for batch_id in batch_ids:
            await queue.put(Job(batch_id=batch_id, source=source, replay=replay))
    except AIOKafkaError as exc:
        raise translate(exc, "enqueue") from exc
    finally:
        await producer.stop()


class StateStore:
    """The state topic, read from the beginning into memory and followed."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._states: dict[str, BatchState] = {}
        self._consumer: AIOKafkaConsumer | None = None
        # End offsets come from a second client: on the follower's own connection a ListOffsets
        # request queues behind its idle fetch (a long poll of fetch_max_wait_ms, 500 ms), which
        # made every sync(), so every job, wait half a second.
        self._end_reader: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[TopicPartition] = []
        self._progress = asyncio.Condition()
        self.ready = asyncio.Event()

    def get(self, batch_id: str) -> BatchState | None:
        """The latest known state of ``batch_id``."""
        return self._states.get(batch_id)

    def put(self, state: BatchState) -> None:
        """Remember a state this process just wrote (the topic will echo it later)."""
        self._states[state.batch_id] = state

    def waiting(self) -> list[BatchState]:
        """Batches parked until Datagrid finishes them."""
        return [s for s in self._states.values() if s.status == "waiting"]

    async def start(self) -> None:
        """Assign every partition of the state topic, read it to the end, then keep following."""
        consumer = AIOKafkaConsumer(
            **connection_options(self._settings),
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
        self._consumer = consumer
        self._end_reader = AIOKafkaConsumer(
            **connection_options(self._settings),
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",  # its end offsets are the follower's (the LSO)
        )
        try:
            await consumer.start()
            await self._end_reader.start()
            options = connection_options(self._settings)
            partitions = await topic_partitions(options, self._settings.state_topic)
            if not partitions:
                raise KafkaError(f"state topic {self._settings.state_topic} has no partitions")
            self._partitions = [
                TopicPartition(self._settings.state_topic, p) for p in sorted(partitions)
            ]
            consumer.assign(self._partitions)
            await consumer.seek_to_beginning(*self._partitions)
        except AIOKafkaError as exc:
            raise translate(exc, "reading the state topic") from exc
        self._task = asyncio.create_task(self._follow(), name="state-store")
        await self.sync()
        self.ready.set()

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except AIOKafkaError as exc:
                log.warning("state_store_read_failed", error=str(exc))
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for record in records:
                    self._apply(record)
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
        assert self._consumer is not None and self._end_reader is not None
        try:
            ends = await self._end_reader.end_offsets(self._partitions)
        except AIOKafkaError as exc:
            raise translate(exc, "reading state topic offsets") from exc

        async def caught_up() -> bool:
            for tp, end in ends.items():
                if await self._consumer.position(tp) < end:  # type: ignore[union-attr]
                    return False
            return True

        deadline = time.monotonic() + within
        while not await caught_up():
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
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._end_reader is not None:
            await self._end_reader.stop()
            self._end_reader = None


class _PartitionOffsets:
    """Offsets of one partition's jobs in flight; the committable offset is the oldest
    unfinished."""

    def __init__(self) -> None:
        self.pending: dict[int, bool] = {}  # offset -> finished (insertion order = offset order)
        self.committed = -1

    def add(self, offset: int) -> None:
        self.pending[offset] = False

    def finish(self, offset: int) -> int | None:
        """Mark done; return the new offset to commit, if it moved."""
        if offset in self.pending:
            self.pending[offset] = True
        commit = None
        for pending_offset in list(self.pending):
            if not self.pending[pending_offset]:
                break
            del self.pending[pending_offset]
            commit = pending_offset + 1
        if commit is not None and commit > self.committed:
            self.committed = commit
            return commit
        return None


class Worker(ConsumerRebalanceListener):  # type: ignore[misc]
    """Consumes the jobs topic and forwards each batch once."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        store: StateStore,
        metrics: Metrics,
        *,
        consumer_factory: Callable[[], AIOKafkaConsumer],
        transactional_producer: Callable[[str], AIOKafkaProducer] | None = None,
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._store = store
        self._metrics = metrics
        self._consumer_factory = consumer_factory
        # Exactly-once: one transactional producer per assigned jobs partition, its id derived
        # from the partition, so a new owner's init_transactions fences the previous one (zombie).
        self._make_txn_producer = transactional_producer
        self._txn_producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._partition_locks: dict[TopicPartition, asyncio.Lock] = {}
        self._producer_start = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: dict[asyncio.Task[None], tuple[TopicPartition, int, float]] = {}
        self._offsets: dict[TopicPartition, _PartitionOffsets] = {}
        self._waiters: dict[str, asyncio.Task[None]] = {}
        self._batch_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._stopping = asyncio.Event()
        self.assigned = asyncio.Event()  # joined the group (possibly with no partitions)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the consumer group and start the loop."""
        self._consumer = self._consumer_factory()
        self._consumer.subscribe([self._settings.jobs_topic], listener=self)
        try:
            await self._consumer.start()
        except AIOKafkaError as exc:
            raise translate(exc, "starting the jobs consumer") from exc
        self._loop_task = asyncio.create_task(self._loop(), name="jobs-loop")

    async def drain(self, grace: float) -> None:
        """Stop taking jobs; let in-flight batches finish for ``grace`` s, then abandon them.

        Abandoned jobs stay uncommitted, so another pod (or this one, restarted) redoes them.
        """
        self._stopping.set()
        if self._loop_task is not None:
            await self._loop_task
            self._loop_task = None
        running = [t for t in self._tasks if not t.done()]
        if running:
            log.info("draining", batches=len(running), timeout_s=grace)
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("drain_timeout_abandoned", batches=len(late))
                await asyncio.wait(late)
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()

    async def stop(self) -> None:
        """Drain with no grace (if not drained yet) and leave the group (safe to call twice)."""
        if not self._stopping.is_set() or self._loop_task is not None:
            await self.drain(0)
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        for tp in list(self._txn_producers):
            await self._txn_producers.pop(tp).stop()

    # --- rebalance listener ------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish (within the drain timeout) or abandon the jobs of partitions leaving us."""
        revoked_set = set(revoked)
        mine = [t for t, (tp, _, _) in self._tasks.items() if tp in revoked_set and not t.done()]
        if mine:
            _, late = await asyncio.wait(mine, timeout=self._settings.drain_timeout_seconds)
            for task in late:
                task.cancel()
            if late:
                # Uncommitted: the partition's next owner redoes them (at-least-once: duplicates).
                log.warning(
                    "rebalance_abandoned",
                    batches=len(late),
                    timeout_s=self._settings.drain_timeout_seconds,
                )
                await asyncio.wait(late)
        for tp in revoked_set:
            self._offsets.pop(tp, None)
            with contextlib.suppress(KeyError):  # its new owner reports its lag now
                self._metrics.jobs_lag.remove(str(tp.partition))
            self._partition_locks.pop(tp, None)
            producer = self._txn_producers.pop(tp, None)
            if producer is not None:
                await producer.stop()
        for batch_id, waiter in list(self._waiters.items()):
            if self._jobs_partition(batch_id) in revoked_set:
                waiter.cancel()
                del self._waiters[batch_id]
        self._update_waiting_gauge()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """Track the new partitions and adopt the waiting batches they own."""
        for tp in assigned:
            self._offsets.setdefault(tp, _PartitionOffsets())
            if self._make_txn_producer is not None:
                with contextlib.suppress(KafkaError):  # logged; run_job tries again
                    await self._transactional_producer(tp)
        assigned_set = set(assigned)
        for state in self._store.waiting():
            if state.batch_id not in self._waiters and self._jobs_partition(state.batch_id) in (
                assigned_set
            ):
                job = Job(
                    batch_id=state.batch_id,
                    source=state.source or "producer",
                    event_id=state.event_id,
                )
                self._park(job, state, delay=0.0)
        self.assigned.set()

    # --- the loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._stopping.is_set():
            running = [t for t in self._tasks if not t.done()]
            free = self._settings.concurrency - len(running)
            assignment = list(consumer.assignment())
            # Keep polling even when full, so the group does not think we died; just take nothing.
            # When full, wait for a job to finish rather than in the poll: a poll of paused
            # partitions always lasts its whole timeout, which capped a process at `concurrency`
            # jobs per 500 ms however short the jobs were.
            timeout_ms = 500
            if free <= 0:
                consumer.pause(*assignment)
                await asyncio.wait(running, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                timeout_ms = 0
            else:
                consumer.resume(*assignment)
            try:
                batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max(free, 1))
            except AIOKafkaError as exc:
                log.warning("jobs_poll_failed", error=str(exc))
                await asyncio.sleep(1)
                continue
            for tp, records in batches.items():
                for record in records:
                    self._start(tp, record)
            self._update_lag()

    def _start(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        offsets = self._offsets.setdefault(tp, _PartitionOffsets())
        offsets.add(record.offset)
        task = asyncio.create_task(
            self._handle(tp, record), name=f"job-{tp.partition}-{record.offset}"
        )
        queued_at = record.timestamp / 1000 if record.timestamp else time.time()
        self._tasks[task] = (tp, record.offset, queued_at)
        task.add_done_callback(self._tasks.pop)

    async def _handle(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        try:
            job = parse_job(record.value)
        except InvalidBatchId as exc:
            log.error("job_invalid", partition=tp.partition, offset=record.offset, error=str(exc))
            self._metrics.batches.labels(outcome="invalid").inc()
        else:
            delay = 1.0
            while True:
                try:
                    await self.run_job(job, tp, record.offset)
                    break
                except Fenced:
                    # Another process owns this partition now: it will redo the job.
                    log.warning("producer_fenced", batch_id=job.batch_id, partition=tp.partition)
                    return
                except KafkaError as exc:
                    # Kafka itself is failing: do not commit; try again until it recovers.
                    log.warning(
                        "job_retry_kafka", batch_id=job.batch_id, error=str(exc), retry_in=delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        await self._commit(tp, record.offset)

    async def run_job(
        self, job: Job, tp: TopicPartition | None = None, offset: int | None = None
    ) -> None:
        """Forward ``job``'s batch unless it already was (or park it if it is not terminal).

        In exactly-once mode the job's offset (``tp``, ``offset``) commits in the batch's
        transaction, and a partition's jobs run one at a time (one transaction per producer).
        """
        txn = None
        if self._make_txn_producer is not None:
            tp = tp or self._jobs_partition(job.batch_id)
            if tp is None or self._consumer is None or tp not in self._consumer.assignment():
                raise KafkaError(f"jobs partition {tp} is not owned by this process")
            producer = await self._transactional_producer(tp)
            offsets = {tp: offset + 1} if offset is not None else None
            txn = Transaction(producer, offsets, self._settings.consumer_group)
            lock = self._partition_locks.setdefault(tp, asyncio.Lock())
            async with lock, self._batch_lock(job.batch_id), self._slots:
                await self._run_locked(job, txn)
            return
        async with self._batch_lock(job.batch_id), self._slots:
            await self._run_locked(job, None)

    @contextlib.asynccontextmanager
    async def _batch_lock(self, batch_id: str) -> AsyncIterator[None]:
        """Serialise jobs of one batch in this process (other pods get other partitions)."""
        entry = self._batch_locks.setdefault(batch_id, (asyncio.Lock(), [0]))
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._batch_locks[batch_id]

    async def _run_locked(self, job: Job, txn: Transaction | None) -> None:
        logger = log.bind(batch_id=job.batch_id, event_id=job.event_id, source=job.source)
        if not job.replay:
            await self._store.sync()
            known = self._store.get(job.batch_id)
            if known is not None and known.status == "forwarded":
                self._metrics.batches.labels(outcome="duplicate").inc()
                logger.info("batch_duplicate", forwarded_at=known.finished_at)
                return
            if known is not None and known.status == "waiting" and job.batch_id in self._waiters:
                self._metrics.batches.labels(outcome="duplicate").inc()
                logger.info("batch_duplicate_waiting")
                return
        try:
            state = await self._pipeline.forward(
                job.batch_id, source=job.source, event_id=job.event_id, txn=txn
            )
        except BatchNotReady as exc:
            await self._wait_for(job, exc, txn)
            return
        self._store.put(state)

    async def _wait_for(self, job: Job, exc: BatchNotReady, txn: Transaction | None) -> None:
        previous = self._store.get(job.batch_id)
        checks = (previous.attempts if previous and previous.status == "waiting" else 0) + 1
        expires_at = (exc.problem or {}).get("expires_at")
        if _past(expires_at):
            state = BatchState(
                batch_id=job.batch_id,
                status="failed",
                source=job.source,
                event_id=job.event_id,
                batch_status=exc.batch_status,
                finished_at=utcnow(),
                attempts=checks,
                error={
                    "code": "batch_expired_unfinished",
                    "detail": f"batch still {exc.batch_status!r} after expires_at {expires_at}",
                },
            )
            await self._pipeline.record(state, txn)
            self._store.put(state)
            self._metrics.batches.labels(outcome="failed").inc()
            log.warning("batch_failed", batch_id=job.batch_id, error=state.error)
            return
        delay = min(self._settings.not_ready_poll_seconds, 2.0 ** min(checks, 10))
        delay *= random.uniform(0.8, 1.0)  # noqa: S311 - jitter
        state = BatchState(
            batch_id=job.batch_id,
            status="waiting",
            source=job.source,
            event_id=job.event_id,
            batch_status=exc.batch_status,
            attempts=checks,
            started_at=utcnow(),
            error={"code": "batch_not_ready", "detail": str(exc), "expires_at": expires_at},
        )
        await self._pipeline.record(state, txn)
        self._store.put(state)
        log.info(
            "batch_waiting",
            batch_id=job.batch_id,
            batch_status=exc.batch_status,
            next_check_s=round(delay, 2),
            checks=checks,
        )
        self._park(job, state, delay)

    def _park(self, job: Job, state: BatchState, delay: float) -> None:
        async def wake() -> None:
            await asyncio.sleep(delay)
            self._waiters.pop(job.batch_id, None)
            self._update_waiting_gauge()
            while True:
                try:
                    await self.run_job(job)
                    return
                except Fenced:
                    return  # the partition moved: its new owner adopts the waiting batch
                except KafkaError as exc:
                    log.warning("job_retry_kafka", batch_id=job.batch_id, error=str(exc))
                    await asyncio.sleep(5)

        old = self._waiters.pop(job.batch_id, None)
        if old is not None:
            old.cancel()
        self._waiters[job.batch_id] = asyncio.create_task(wake(), name=f"wait-{job.batch_id}")
        self._update_waiting_gauge()

    async def _transactional_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        """The partition's transactional producer, started on first use.

        Its id is derived from the partition, so starting it (init_transactions) fences whichever
        process owned the partition before (a zombie's late commit then fails).
        """
        producer = self._txn_producers.get(tp)
        if producer is not None:
            return producer
        assert self._make_txn_producer is not None
        async with self._producer_start:  # starts are rare: one at a time is fine
            producer = self._txn_producers.get(tp)
            if producer is None:
                transactional_id = f"{self._settings.consumer_group}-{tp.topic}-{tp.partition}"
                producer = self._make_txn_producer(transactional_id)
                try:
                    await producer.start()
                except AIOKafkaError as exc:
                    await producer.stop()
                    log.error(
                        "transactional_producer_failed", partition=tp.partition, error=str(exc)
                    )
                    raise translate(exc, f"starting the producer of {tp}") from exc
                self._txn_producers[tp] = producer
        return producer

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        offsets = self._offsets.get(tp)
        if offsets is None or self._consumer is None:
            return  # partition revoked meanwhile: its new owner decides
        commit = offsets.finish(offset)
        if commit is None:
            return
        try:
            await self._consumer.commit({tp: commit})
        except AIOKafkaError as exc:
            # Not fatal: the job may be redone, and the state store makes that a duplicate.
            log.warning("commit_failed", partition=tp.partition, offset=commit, error=str(exc))

    # --- helpers -------------------------------------------------------------------------------
    def _jobs_partition(self, batch_id: str) -> TopicPartition | None:
        assert self._consumer is not None
        partitions = self._consumer.partitions_for_topic(self._settings.jobs_topic)
        if not partitions:
            return None
        index = partition_for(batch_id.encode(), len(partitions))
        return TopicPartition(self._settings.jobs_topic, index)

    def _update_waiting_gauge(self) -> None:
        self._metrics.batches_waiting.set(len(self._waiters))

    def _update_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            offsets = self._offsets.get(tp)
            if highwater is None or offsets is None:
                continue
            position = offsets.committed if offsets.committed >= 0 else None
            if offsets.pending:
                position = next(iter(offsets.pending))
            if position is None:
                position = highwater
            self._metrics.jobs_lag.labels(partition=str(tp.partition)).set(
                max(highwater - position, 0)
            )
        oldest = min((queued for _, _, queued in self._tasks.values()), default=None)
        self._metrics.jobs_lag_seconds.set(0 if oldest is None else max(time.time() - oldest, 0))

    @property
    def draining(self) -> bool:
        """True once drain started."""
        return self._stopping.is_set()


def _past(iso: object) -> bool:
    if not isinstance(iso, str):
        return False
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return False
    return when < datetime.now(UTC)


__all__ = ["ForwarderError", "Job", "JobQueue", "StateStore", "Worker", "enqueue_jobs", "parse_job"]
