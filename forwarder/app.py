"""The composition root: the one place that builds and wires every resource.

``open_core`` opens the topics check, the producer and the Datagrid client (``forward`` uses it);
``create_app`` adds the state store, the jobs worker and the HTTP routes in one lifespan, opened in
order and closed in reverse; ``serve`` runs it under uvicorn with a SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import httpx
import structlog
import uvicorn
from aiokafka import AIOKafkaProducer
from litestar import Litestar
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig

from forwarder import __version__
from forwarder.api import ROUTES, problem_response
from forwarder.config import ConfigError, Settings
from forwarder.datagrid import DatagridClient
from forwarder.errors import ForwarderError
from forwarder.jobs import JobQueue, StateStore, Worker
from forwarder.kafka import TopicLimits, make_jobs_consumer, make_producer, prepare_topics, translate
from forwarder.observability import Metrics
from forwarder.pipeline import BatchState, Pipeline
from forwarder.webhooks import _RecentEvents, datagrid_webhook

log = structlog.get_logger("forwarder.app")


@dataclass(frozen=True)
class Core:
    """What forwarding needs, opened and ready."""

    settings: Settings
    metrics: Metrics
    limits: TopicLimits
    producer: AIOKafkaProducer
    pipeline: Pipeline


@asynccontextmanager
async def open_core(
    settings: Settings,
    metrics: Metrics,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Core]:
    """Open topics, producer and upstream client; close them in reverse order on exit."""
    api_key = settings.require_api_key()
    async with AsyncExitStack() as stack:
        limits = await prepare_topics(settings)
        producer = make_producer(settings, limits)
        try:
            await producer.start()
        except Exception as exc:
            await producer.stop()
            raise translate(exc, "starting the producer") from exc
        stack.push_async_callback(producer.stop)
        datagrid = DatagridClient(
            settings.datagrid_base_url,
            api_key,
            teamspace=settings.datagrid_teamspace,
            connect_timeout=settings.datagrid_connect_timeout,
            read_timeout=settings.datagrid_read_timeout,
            transport=transport,
            on_response=metrics.on_upstream_response,
        )
        stack.push_async_callback(datagrid.aclose)
        pipeline = Pipeline(settings, datagrid, producer, limits, metrics)
        yield Core(settings, metrics, limits, producer, pipeline)


@dataclass
class Services:
    """What the HTTP handlers reach through ``state.services``."""

    settings: Settings
    metrics: Metrics
    webhook_secrets: list[bytes]
    api_tokens: list[bytes]
    recent_events: _RecentEvents = field(default_factory=_RecentEvents)
    queue: JobQueue | None = None
    store: StateStore | None = None
    worker: Worker | None = None
    kafka_ok: bool = False
    draining: bool = False

    def readiness(self) -> dict[str, bool]:
        """Named readiness checks; ready only when all hold."""
        return {
            "kafka": self.kafka_ok,
            "state_loaded": self.store is not None and self.store.ready.is_set(),
            "worker_assigned": self.worker is not None and self.worker.assigned.is_set(),
            "not_draining": not self.draining,
        }

    async def drain(self) -> None:
        """Readiness off, stop taking jobs, let in-flight batches finish within the drain timeout."""
        if self.draining:
            return
        self.draining = True
        log.info("drain_started", timeout_s=self.settings.drain_timeout_seconds)
        if self.worker is not None:
            await self.worker.drain(self.settings.drain_timeout_seconds)
        log.info("drain_finished")


def create_app(
    settings: Settings,
    metrics: Metrics | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Litestar:
    """The Litestar app with one lifespan owning every resource."""
    if not settings.webhook_secrets:
        raise ConfigError(
            "FORWARDER_WEBHOOK_SECRETS is empty: webhooks cannot be verified, refusing to start"
        )
    settings.require_api_key()
    metrics = metrics or Metrics()
    services = Services(
        settings=settings,
        metrics=metrics,
        webhook_secrets=[s.get_secret_value().encode() for s in settings.webhook_secrets],
        api_tokens=[t.get_secret_value().encode() for t in settings.api_tokens],
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            core = await stack.enter_async_context(open_core(settings, metrics, transport=transport))
            services.queue = JobQueue(core.producer, settings.jobs_topic)
            services.kafka_ok = True
            store = StateStore(settings)
            stack.push_async_callback(store.stop)
            await store.start()
            services.store = store

            async def record_state(state: BatchState) -> None:
                future = await core.producer.send(
                    settings.state_topic, state.encode(), key=state.batch_id.encode()
                )
                await future

            worker = Worker(
                settings,
                core.pipeline,
                store,
                metrics,
                consumer_factory=lambda: make_jobs_consumer(settings),
                record_state=record_state,
            )
            stack.push_async_callback(worker.stop)
            await worker.start()
            services.worker = worker
            probe = asyncio.create_task(_probe_kafka(core.producer, services))
            stack.callback(probe.cancel)
            log.info("started", port=settings.http_port, delivery=settings.delivery.value,
                     concurrency=settings.concurrency, version=__version__)
            yield
            await services.drain()
        log.info("stopped")

    return Litestar(
        route_handlers=[*ROUTES, datagrid_webhook],
        lifespan=[lifespan],
        state=State({"services": services}),
        exception_handlers={ForwarderError: problem_response, HTTPException: problem_response,
                            Exception: problem_response},
        request_max_body_size=settings.webhook_max_body_bytes,
        openapi_config=OpenAPIConfig(title="datagrid-forwarder", version=__version__),
        logging_config=None,
    )


async def _probe_kafka(producer: AIOKafkaProducer, services: Services, every: float = 2.0) -> None:
    """Keep ``kafka_ok`` true only while the cluster answers metadata requests."""
    while True:
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout=5)
            ok = True
        except Exception:  # any failure means "not reachable now"
            ok = False
        if ok != services.kafka_ok:
            log.warning("kafka_reachability_changed", reachable=ok)
        services.kafka_ok = ok
        await asyncio.sleep(every)


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM drains the workers (readiness off) before HTTP stops."""

    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self._services = services
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is None:
            log.info("signal_received", signal=signal.Signals(sig).name)
            self._drain_task = asyncio.get_event_loop().create_task(self._drain_then_exit())
            return
        super().handle_exit(sig, frame)  # a second signal: stop now

    async def _drain_then_exit(self) -> None:
        try:
            await self._services.drain()
        finally:
            self.should_exit = True


def serve(settings: Settings) -> int:
    """Run ``forwarder serve`` until SIGTERM; returns the exit status."""
    app = create_app(settings)
    services: Services = app.state.services
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = _DrainingServer(config, services)
    started = time.monotonic()
    server.run()
    if not server.started:
        log.error("start_failed", after_s=round(time.monotonic() - started, 1))
        return 1
    return 0


__all__ = ["Core", "Services", "create_app", "open_core", "serve"]
