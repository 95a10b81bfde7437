"""The jobs-topic consumer: a group member that forwards each batch once.

:class:`Worker` runs up to ``concurrency`` batches at once and commits a partition's offset only up
to its oldest unfinished job (:class:`PartitionOffsets`), so a crash redoes unfinished work and
never skips it.  A batch that is not terminal yet is parked as a ``waiting`` state record (durable)
and re-checked on a timer by the pod owning its jobs partition, so it blocks neither a slot nor its
partition's commits.  In exactly-once mode each jobs partition has its own transactional producer
(``kafka.TransactionalProducers``), whose id is derived from the partition so that a new owner
fences the old one.

Its collaborators, each beside it: ``offsets`` (what a partition may commit, the per-batch lock),
``parking`` (the timers of waiting batches), ``lag`` (the lag gauges) and ``rebalance`` (the
listener the consumer calls when the group moves partitions).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from forwarder.config import Settings
from forwarder.errors import KAFKA_BACKOFF, BatchNotReady, Fenced, InvalidJob, KafkaError
from forwarder.jobs import Job, JobQueue, deployment_of, parse_job
from forwarder.kafka import kafka_errors, make_jobs_consumer, partition_for
from forwarder.lag import LagReporter
from forwarder.observability import Metrics
from forwarder.offsets import GroupCommit, JobsLedger, KeyedLock, PartitionOffsets
from forwarder.parking import Parking
from forwarder.pipeline import Pipeline, Transaction
from forwarder.producers import TransactionalProducers
from forwarder.rebalance import Rebalance, finish_or_abandon
from forwarder.retry import Policy, retry
from forwarder.state import BatchState, Status
from forwarder.store import StateStore

log = structlog.get_logger("forwarder.worker")


class Worker:
    """Consumes the jobs topic and forwards each batch once."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        store: StateStore,
        queue: JobQueue,
        metrics: Metrics,
        *,
        transactional_producer: Callable[[str], AIOKafkaProducer] | None = None,
    ) -> None:
        self._settings = settings
        self._health = pipeline.health
        self._deployment = deployment_of(settings)
        self._pipeline = pipeline
        self._store = store
        self._queue = queue
        self._metrics = metrics
        make = transactional_producer
        self._txn = TransactionalProducers(settings.consumer_group, make) if make else None
        self._consumer: AIOKafkaConsumer | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._jobs = JobsLedger()
        self._batch_locks = KeyedLock()
        self._commits = self._jobs.commits = GroupCommit(self._commit_offsets)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._stopping = asyncio.Event()
        self._lag = LagReporter(metrics)
        self._parking = Parking(
            store,
            metrics,
            rerun=self._run_until_done,
            jobs_partition=self._jobs_partition,
            poll_cap=settings.not_ready_poll_seconds,
        )
        self._rebalance = Rebalance(
            store=store,
            parking=self._parking,
            lag=self._lag,
            txn=self._txn,
            jobs=self._jobs,
            grace=settings.drain_timeout_seconds,
        )
        self.assigned = self._rebalance.assigned  # joined the group (possibly with no partitions)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the consumer group and start the loop."""
        self._consumer = make_jobs_consumer(self._settings)
        self._consumer.subscribe([self._settings.jobs_topic], listener=self._rebalance)
        with kafka_errors("starting the jobs consumer"):
            await self._consumer.start()
        self._loop_task = asyncio.create_task(self._loop(), name="jobs-loop")
        self._loop_task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The poll loop ends only when drained; ended by an error (a bug), this pod takes no
        more jobs: say so loudly (log, metric, alert) and leave readiness, so that its
        partitions' jobs are not silently held."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("jobs_loop_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        self._metrics.internal_errors.labels(where="task").inc()
        if self._health is not None:
            self._health.fail("jobs_topic", f"the jobs loop stopped: {type(exc).__name__}: {exc}")

    async def drain(self, grace: float) -> None:
        """Stop taking jobs; let in-flight batches finish for ``grace`` s, then abandon them
        (uncommitted, so another pod, or this one restarted, redoes them)."""
        self._stopping.set()
        if self._loop_task is not None:
            # The loop only polls and starts jobs: stopped at once, even while its poll is
            # retrying against an unreachable broker (the jobs it started run on below).
            self._loop_task.cancel()
            # (A loop that failed was reported when it ended: _loop_ended.)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
            self._loop_task = None
        running = self._jobs.running()
        if running:
            log.info("draining", batches=len(running), timeout_s=grace)
            await finish_or_abandon(running, grace, "drain_timeout_abandoned")
        self._parking.cancel()

    async def stop(self) -> None:
        """Drain with no grace (if not drained yet) and leave the group (safe to call twice)."""
        if not self._stopping.is_set() or self._loop_task is not None:
            await self.drain(0)
        if self._consumer is not None:
            await self._commits.flush()
            await self._consumer.stop()
            self._consumer = None
        if self._txn is not None:
            await self._txn.close()

    # --- the loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._stopping.is_set():
            running = self._jobs.running()
            free = self._settings.concurrency - len(running)
            assignment = list(consumer.assignment())
            # When full, keep polling (paused: the group must not think we died) but wait for a
            # job to finish outside the poll: a paused poll lasts its whole timeout.
            timeout_ms = 500
            if free <= 0:
                consumer.pause(*assignment)
                await asyncio.wait(running, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                timeout_ms = 0
            else:
                consumer.resume(*assignment)
            batches = await retry(
                functools.partial(self._poll, consumer, timeout_ms, free),
                Policy("jobs_poll_failed", KAFKA_BACKOFF),
                health=self._health,
                component="jobs_topic",
            )
            for tp, records in batches.items():
                for record in records:
                    self._start(tp, record)
            queued_at = [queued for _, _, queued in self._jobs.tasks.values()]
            await self._lag.update(consumer, self._jobs.offsets, queued_at)

    @staticmethod
    async def _poll(
        consumer: AIOKafkaConsumer, timeout_ms: int, free: int
    ) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        with kafka_errors("polling the jobs topic"):
            batches: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]
            batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max(free, 1))
            return batches

    def _start(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        offsets = self._jobs.offsets.setdefault(tp, PartitionOffsets())
        offsets.add(record.offset)
        task = asyncio.create_task(
            self._handle(tp, record), name=f"job-{tp.partition}-{record.offset}"
        )
        queued_at = record.timestamp / 1000 if record.timestamp else time.time()
        self._jobs.tasks[task] = (tp, record.offset, queued_at)
        task.add_done_callback(self._jobs.tasks.pop)

    async def _handle(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        """One job record, from parsing to commit. Whatever happens, the partition's commits go
        on: a record that is no job, or a job of another deployment, is logged, counted and
        committed past; only a job handed off to another owner stays uncommitted."""
        logger = log.bind(partition=tp.partition, offset=record.offset)
        try:
            job = parse_job(record.value)
            if job.deployment is not None and job.deployment != self._deployment:
                logger.error(
                    "job_foreign",
                    batch_id=job.batch_id,
                    queued_by=job.deployment,
                    this_deployment=self._deployment,
                    hint="two installs share the consumer group: give each its own",
                )
                self._metrics.batches.labels(outcome="foreign").inc()
            elif record.key != job.batch_id.encode() and not self._store.owns(job.batch_id):
                await self._reroute(job, tp)
            elif not await self._run_until_done(job, tp, record.offset):
                return  # handed off: the partition's new owner redoes the job
        except InvalidJob as exc:
            logger.error("job_invalid", error=str(exc))
            self._metrics.batches.labels(outcome="invalid").inc()
        except asyncio.CancelledError:
            raise  # abandoned (drain, revocation): uncommitted, its next owner redoes it
        except Exception:  # a bug: count it, log it, and do not wedge the partition behind it
            logger.exception("job_internal_error")
            self._metrics.internal_errors.labels(where="job").inc()
        self._commit(tp, record.offset)

    async def _reroute(self, job: Job, tp: TopicPartition) -> None:
        """A job not keyed by its batch id (another producer's) sits in a partition whose state
        does not hold its batch: queue it again, keyed, so that its batch's owner dedupes it."""
        await retry(
            functools.partial(self._queue.put, job),
            Policy("job_reroute_failed", KAFKA_BACKOFF),
            health=self._health,
            component="jobs_topic",
        )
        log.info("job_rerouted", batch_id=job.batch_id, from_partition=tp.partition)

    async def _run_until_done(
        self, job: Job, tp: TopicPartition | None = None, offset: int | None = None
    ) -> bool:
        """Run ``job`` until it is done (True), or until it is handed off (False).

        While Kafka fails, the job is retried (``retry.retry``) and its offset stays uncommitted.
        A fenced producer means another process may own the partition now: we wait a session
        timeout (a zombie learns it lost the group by then, and its revocation cancels this) and
        retry only if the partition is still ours, with a new producer; a broker that aborted a
        transaction fences its producer too, and must not wedge the partition.
        """

        async def once() -> None:
            try:
                await self.run_job(job, tp, offset)
            except Fenced as exc:
                log.warning("producer_fenced", batch_id=job.batch_id, error=str(exc))
                await asyncio.sleep(self._settings.kafka_session_timeout_ms / 1000)
                if not self._owns(tp or self._jobs_partition(job.batch_id)):
                    raise
                raise KafkaError(f"{exc}; the partition is still ours: a new producer") from exc

        try:
            await retry(
                once,
                Policy("job_retry_kafka", KAFKA_BACKOFF),
                health=self._health,
                component=self._pipeline.component_of,
                logger=log.bind(batch_id=job.batch_id),
            )
        except Fenced:
            return False
        return True

    async def run_job(
        self, job: Job, tp: TopicPartition | None = None, offset: int | None = None
    ) -> None:
        """Forward ``job``'s batch unless it already was (or park it if it is not terminal).

        In exactly-once mode the job's offset (``tp``, ``offset``) commits in the batch's
        transaction, and a partition's jobs run one at a time (one transaction per producer).
        """
        if self._txn is None:
            async with self._batch_locks.hold(job.batch_id), self._slots:
                await self._run_locked(job, None)
            return
        tp = tp or self._jobs_partition(job.batch_id)
        if tp is None or not self._owns(tp):
            raise Fenced(f"jobs partition {tp} is not owned by this process")
        producer = await self._txn.get(tp)
        async with self._txn.lock(tp), self._batch_locks.hold(job.batch_id), self._slots:
            # The job's offset commits in its batch's transaction, and only so far as no older
            # job of the partition is still running (a crash then redoes that one); what the
            # transaction commits, the consumer does not commit again (_commit).
            tracked = self._jobs.offsets.get(tp)
            commit = tracked.peek(offset) if tracked is not None and offset is not None else None
            offsets = {tp: commit} if commit is not None else None
            txn = Transaction(producer, offsets, self._settings.consumer_group)
            try:
                await self._run_locked(job, txn)
            except KafkaError:
                # A failed transactional producer is never reused: its state may be final.
                await self._txn.discard(tp)
                raise
            if txn.offsets_committed and commit is not None:
                self._jobs.committed_in_transaction(tp, commit)

    async def _run_locked(self, job: Job, txn: Transaction | None) -> None:
        logger = log.bind(batch_id=job.batch_id, event_id=job.event_id, source=job.source)
        if not job.replay:
            # No read of the state topic here: this pod restores its partitions' state when it
            # gets them and is their only writer since, keeping what it writes (put below).
            await self._store.restored(job.batch_id)
            known = self._store.get(job.batch_id)
            parked = known is not None and known.status is Status.WAITING
            if known is not None and (known.done or (parked and job.batch_id in self._parking)):
                self._metrics.batches.labels(outcome="duplicate").inc()
                logger.info("batch_duplicate", status=known.status.value)
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
        checks = (previous.attempts if previous and previous.status is Status.WAITING else 0) + 1
        state = BatchState.waiting(
            job.batch_id, source=job.source, event_id=job.event_id, not_ready=exc, checks=checks
        )
        await self._pipeline.record(state, txn)
        self._store.put(state)
        if state.status is Status.FAILED:
            self._metrics.batches.labels(outcome="failed").inc()
            log.warning("batch_failed", batch_id=job.batch_id, error=state.error)
            return
        self._parking.schedule(job, checks, exc.batch_status)

    def _commit(self, tp: TopicPartition, offset: int) -> None:
        offsets = self._jobs.offsets.get(tp)
        if offsets is None or self._consumer is None:
            return  # partition revoked meanwhile: its new owner decides
        commit = offsets.finish(offset)
        if commit is None:
            return
        if self._jobs.in_transaction(tp, commit):
            self._metrics.job_commits.labels(via="transaction").inc()
            return  # exactly-once: committed with the batch, atomically
        self._commits.add(tp, commit)  # (sent within COMMIT_LINGER, with others')

    async def _commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        """One consumer commit of the finished jobs' offsets gathered by :class:`GroupCommit`.
        Never raises: a failed commit is not fatal (the jobs may be redone, and the state store
        makes them duplicates)."""
        # Only partitions still ours, and not committed further by a transaction meanwhile.
        offsets = {
            tp: commit
            for tp, commit in offsets.items()
            if tp in self._jobs.offsets and not self._jobs.in_transaction(tp, commit)
        }
        if not offsets or self._consumer is None:
            return
        try:
            with kafka_errors(f"committing {sorted(tp.partition for tp in offsets)}"):
                await self._consumer.commit(offsets)
            self._metrics.job_commits.labels(via="consumer").inc(len(offsets))
        except KafkaError as exc:
            for tp, commit in offsets.items():
                log.warning("commit_failed", partition=tp.partition, offset=commit, error=str(exc))
        except Exception:  # a bug: counted and logged, the jobs are redone at worst
            log.exception("commit_internal_error")
            self._metrics.internal_errors.labels(where="job").inc()

    @property
    def transactions_failure(self) -> str | None:
        """Exactly-once: why the last transactional producer could not start, if it could not."""
        return self._txn.failure if self._txn is not None else None

    # --- helpers -------------------------------------------------------------------------------
    def _owns(self, tp: TopicPartition | None) -> bool:
        return tp is not None and self._consumer is not None and tp in self._consumer.assignment()

    def _jobs_partition(self, batch_id: str) -> TopicPartition | None:
        assert self._consumer is not None
        partitions = self._consumer.partitions_for_topic(self._settings.jobs_topic)
        if not partitions:
            return None
        index = partition_for(batch_id.encode(), len(partitions))
        return TopicPartition(self._settings.jobs_topic, index)
