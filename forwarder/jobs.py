"""The jobs topic's value and its writers.

A :class:`Job` asks for one batch to be forwarded; :func:`parse_job` reads one from any producer
(JSON, or a bare batch id); :class:`JobQueue` writes jobs through a shared producer and returns once
Kafka acknowledged them; :func:`enqueue_jobs` is the ``enqueue`` command.  The consumer side is
``worker.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import msgspec
from aiokafka import AIOKafkaProducer

from forwarder.config import Settings
from forwarder.datagrid import check_batch_id
from forwarder.errors import InvalidBatchId, InvalidJob
from forwarder.kafka import kafka_errors, make_job_writer

#: Bounds on a job's fields: a job's fields go into its batch's state record, which must always
#: fit the state topic, so a hostile producer cannot make a batch's state unwritable.
MAX_SOURCE = 64
MAX_EVENT_ID = 256
MAX_DEPLOYMENT = 512
#: Largest job record (a real one is about 200 bytes): larger is refused before it is decoded.
MAX_JOB_BYTES = 4096


class Job(msgspec.Struct, omit_defaults=True):
    """One request to forward a batch: the jobs topic's value."""

    batch_id: str
    source: Annotated[str, msgspec.Meta(max_length=MAX_SOURCE)] = "producer"
    event_id: Annotated[str, msgspec.Meta(max_length=MAX_EVENT_ID)] | None = None
    replay: bool = False
    #: The deployment that queued the job (``deployment_of``); None from other producers, which
    #: any deployment consuming the topic may forward.
    deployment: Annotated[str, msgspec.Meta(max_length=MAX_DEPLOYMENT)] | None = None

    def encode(self) -> bytes:
        """JSON for the jobs topic."""
        return msgspec.json.encode(self)


def deployment_of(settings: Settings) -> str:
    """This deployment's identity: its consumer group and its results topic. Two installs that
    share a jobs topic forward only their own jobs (``worker.Worker`` skips the others')."""
    return f"{settings.consumer_group}/{settings.results_topic}"


_decode_job = msgspec.json.Decoder(Job).decode


def parse_job(value: bytes | None) -> Job:
    """A job from a jobs-topic value: JSON, or a bare batch id written by any producer.

    Raises :class:`InvalidJob` for anything else, whatever is wrong with it (undecodable,
    nested too deep, fields too long, an invalid batch id): a record that is no job must never
    stop the worker."""
    try:
        return _parse_job(value)
    except InvalidJob:
        raise
    except InvalidBatchId as exc:
        raise InvalidJob(str(exc)) from exc
    except Exception as exc:  # RecursionError, MemoryError on hostile input, a decoder bug...
        raise InvalidJob(f"job cannot be decoded: {type(exc).__name__}") from exc


def _parse_job(value: bytes | None) -> Job:
    if not value:
        raise InvalidJob("empty job")
    if len(value) > MAX_JOB_BYTES:
        raise InvalidJob(f"job of {len(value)} bytes is larger than {MAX_JOB_BYTES}")
    text = value.strip()
    if text[:1] == b"{":
        try:
            job = _decode_job(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidJob(f"job is not a valid JSON job: {exc}") from exc
    else:
        if text[:1] == b'"':  # a JSON string is a bare id too
            try:
                text = msgspec.json.decode(text, type=str).encode()
            except (msgspec.DecodeError, UnicodeEncodeError) as exc:
                raise InvalidJob("job is not valid JSON") from exc
        job = Job(batch_id=text.decode("utf-8", "replace"))
    check_batch_id(job.batch_id)
    return job


class JobQueue:
    """Writes jobs to the jobs topic through a shared producer."""

    def __init__(
        self,
        producer: Callable[[], AIOKafkaProducer],
        topic: str,
        deployment: str | None = None,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._deployment = deployment

    async def put(self, job: Job) -> None:
        """Queue ``job``, stamped with this queue's deployment unless it has one; returns only
        after Kafka acknowledged it (durable)."""
        check_batch_id(job.batch_id)
        if job.deployment is None and self._deployment is not None:
            job = msgspec.structs.replace(job, deployment=self._deployment)
        with kafka_errors(f"queueing {job.batch_id}"):
            future = await self._producer().send(
                self._topic, job.encode(), key=job.batch_id.encode()
            )
            await future


async def enqueue_jobs(
    settings: Settings, batch_ids: list[str], *, replay: bool, source: str
) -> None:
    """Queue batch ids with a short-lived producer (the ``enqueue`` command)."""
    for batch_id in batch_ids:
        check_batch_id(batch_id)
    producer = make_job_writer(settings)
    try:
        with kafka_errors("enqueue"):
            await producer.start()
        queue = JobQueue(lambda: producer, settings.jobs_topic)
        for batch_id in batch_ids:
            await queue.put(Job(batch_id=batch_id, source=source, replay=replay))
    finally:
        await producer.stop()
