"""The jobs topic's value and its writers.

A :class:`Job` asks for one batch to be forwarded; :func:`parse_job` reads one from any producer
(JSON, or a bare batch id); :class:`JobQueue` writes jobs through a shared producer and returns once
Kafka acknowledged them; :func:`enqueue_jobs` is the ``enqueue`` command.  The consumer side is
``worker.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from aiokafka import AIOKafkaProducer

from forwarder.config import Settings
from forwarder.datagrid import check_batch_id
from forwarder.errors import InvalidBatchId
from forwarder.kafka import kafka_errors, make_job_writer


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
            except (msgspec.DecodeError, UnicodeEncodeError) as exc:
                raise InvalidBatchId("job is not valid JSON") from exc
        job = Job(batch_id=text.decode("utf-8", "replace"))
    check_batch_id(job.batch_id)
    return job


class JobQueue:
    """Writes jobs to the jobs topic through a shared producer."""

    def __init__(self, producer: Callable[[], AIOKafkaProducer], topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def put(self, job: Job) -> None:
        """Queue ``job``; returns only after Kafka acknowledged it (durable)."""
        check_batch_id(job.batch_id)
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
