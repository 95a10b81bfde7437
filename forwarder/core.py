"""The forwarding core, opened in order and closed in reverse: the topics check (with the Datagrid
client set up meanwhile), the producer and the pipeline.  ``forwarder forward`` needs only this
(no HTTP stack, so it starts fast); ``app.py`` builds the service on top of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx

from forwarder.config import Settings
from forwarder.datagrid import DatagridClient
from forwarder.health import Health
from forwarder.kafka import TopicLimits
from forwarder.observability import Metrics
from forwarder.pipeline import Pipeline
from forwarder.producers import SharedProducer
from forwarder.topics import prepare_topics


@dataclass(frozen=True)
class Core:
    """What forwarding needs, opened and ready."""

    settings: Settings
    metrics: Metrics
    limits: TopicLimits
    producer: SharedProducer
    datagrid: DatagridClient
    pipeline: Pipeline


@asynccontextmanager
async def open_core(
    settings: Settings,
    metrics: Metrics,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    health: Health | None = None,
) -> AsyncIterator[Core]:
    """Open topics, producer and upstream client; close them in reverse order on exit.

    ``health`` is the long-running service's: with it, a configuration problem mid-run is waited
    out (not ready, retried at the cap); without it (one-shot commands) it ends the command."""
    settings.require_api_key()  # before any connection: a missing key is a setting error
    async with AsyncExitStack() as stack:
        # The topics check is round trips to Kafka; the Datagrid client's set-up is CPU (its TLS
        # context loads the CA bundle): one is done while the other waits.
        topics = asyncio.ensure_future(prepare_topics(settings))
        try:
            datagrid = DatagridClient(settings, metrics, transport=transport)
        except BaseException:
            topics.cancel()
            await asyncio.gather(topics, return_exceptions=True)
            raise
        stack.push_async_callback(datagrid.aclose)
        limits = await topics
        producer = SharedProducer(settings, limits)
        stack.push_async_callback(producer.stop)
        await producer.start()
        pipeline = Pipeline(settings, datagrid, producer, limits, metrics, health)
        yield Core(settings, metrics, limits, producer, datagrid, pipeline)
