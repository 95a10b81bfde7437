"""The composition root: the one place that builds and wires every resource.

``core.open_core`` opens the topics check, the producer and the Datagrid client (``forward`` uses
only that, without the HTTP stack); ``create_app`` adds the state store, the jobs worker, the
reconciler and the HTTP routes in one lifespan, opened in order and closed in reverse.
``server.serve`` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from aiokafka import AIOKafkaProducer
from litestar import Litestar
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from forwarder import __revision__, __version__
from forwarder.api import ROUTES, Backend, http_middleware, problem_response, request_id_middleware
from forwarder.config import Delivery, Settings
from forwarder.core import open_core
from forwarder.errors import KAFKA_BACKOFF, ConfigError, ForwarderError, KafkaError, Retry
from forwarder.health import Health
from forwarder.jobs import Job, JobQueue, deployment_of
from forwarder.kafka import make_producer
from forwarder.observability import HEALTH_COMPONENTS, Metrics
from forwarder.reconcile import Reconciler
from forwarder.retry import Policy, retry
from forwarder.state import BatchState
from forwarder.store import StateStore
from forwarder.webhooks import RecentEvents, datagrid_webhook
from forwarder.worker import Worker

log = structlog.get_logger("forwarder.app")


@dataclass
class Services:
    """The running service: what the HTTP handlers reach through their ``Backend`` dependency."""

    settings: Settings
    metrics: Metrics
    webhook_secrets: list[bytes]
    api_tokens: list[bytes]
    recent_events: RecentEvents = field(default_factory=RecentEvents)
    queue: JobQueue | None = None
    store: StateStore | None = None
    worker: Worker | None = None
    kafka_ok: bool = False
    draining: bool = False
    fatal: BaseException | None = None
    problem: str | None = None  # the last start-up or Kafka failure, for /readyz
    on_fatal: Callable[[BaseException], None] = lambda exc: None
    health: Health = field(default_factory=Health)

    def readiness(self) -> dict[str, bool]:
        """Named readiness checks; ready only when all hold."""
        problems = self.health.problems
        checks = {
            "kafka": self.kafka_ok,
            "state_loaded": self.store is not None and self.store.loaded,
            "worker_assigned": self.worker is not None and self.worker.assigned.is_set(),
            "not_draining": not self.draining,
            # Each topic this pod writes or reads takes what it is sent (health.Health).
            **{component: component not in problems for component in HEALTH_COMPONENTS},
        }
        if self.settings.delivery is Delivery.EXACTLY_ONCE:
            checks["transactions"] = (
                self.worker is not None and self.worker.transactions_failure is None
            )
        return checks

    def reason(self) -> str | None:
        """Why the service is not ready, in one line (None when nothing went wrong)."""
        if self.worker is not None and self.worker.transactions_failure is not None:
            return self.worker.transactions_failure
        if problems := self.health.problems:
            return "; ".join(f"{component}: {why}" for component, why in problems.items())
        return self.problem

    async def enqueue(self, job: Job) -> None:
        """Queue a job durably, or raise a retriable :class:`KafkaError` (503) while not
        connected.  A draining pod still queues: the Service routes to it until its endpoint is
        removed, and the job goes to Kafka, not to this pod's workers."""
        if self.queue is None:
            raise KafkaError("not connected to Kafka (starting or stopped)")
        await self.queue.put(job)

    def state_of(self, batch_id: str) -> BatchState | None:
        """The batch's latest state if this pod owns it (memory only: for dedupe)."""
        return self.store.get(batch_id) if self.store is not None else None

    async def find_state(self, batch_id: str) -> BatchState | None:
        """Any batch's latest state (read from the broker if another pod owns it)."""
        if self.store is None:
            raise KafkaError("not connected to Kafka (starting or stopped)")
        return await self.store.find(batch_id)

    def seen_event(self, event_id: str) -> bool:
        """True when this process queued the webhook event recently."""
        return event_id in self.recent_events

    def remember_event(self, event_id: str) -> None:
        """Note a webhook event as queued."""
        self.recent_events.add(event_id)

    async def run(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """Open every resource in order (retrying while Kafka is unreachable), then hold them
        until cancelled, closing them in reverse order.  A permanent failure at start (a setting,
        a topic missing with creation off) stops the process."""

        async def open_and_hold() -> None:
            try:
                async with AsyncExitStack() as stack:
                    await self._open(stack, transport)
                    self.problem = None
                    await asyncio.Event().wait()  # hold until cancelled
            except ForwarderError as exc:
                self.kafka_ok = False
                self.problem = str(exc)
                raise
            finally:
                self.queue = None
                self.worker = None

        try:
            policy = Policy("startup_retry", KAFKA_BACKOFF, retry_on=frozenset({Retry.BACKOFF}))
            await retry(open_and_hold, policy)
        except ForwarderError as exc:
            log.error("startup_failed", error=str(exc))
            self.fatal = exc
            self.on_fatal(exc)

    async def _open(
        self, stack: AsyncExitStack, transport: httpx.AsyncBaseTransport | None
    ) -> None:
        settings, metrics = self.settings, self.metrics
        core = await stack.enter_async_context(
            open_core(settings, metrics, transport=transport, health=self.health)
        )
        self.queue = JobQueue(
            lambda: core.producer.current, settings.jobs_topic, deployment_of(settings)
        )
        self.kafka_ok = True
        store = StateStore(settings, metrics, self.health)
        stack.push_async_callback(store.stop)
        await store.start()
        self.store = store

        transactional = None
        if settings.delivery is Delivery.EXACTLY_ONCE:

            def transactional(transactional_id: str) -> AIOKafkaProducer:
                return make_producer(settings, core.limits, transactional_id=transactional_id)

        worker = Worker(
            settings,
            core.pipeline,
            store,
            self.queue,
            metrics,
            transactional_producer=transactional,
        )
        stack.push_async_callback(worker.stop)
        await worker.start()
        self.worker = worker
        if settings.reconcile_interval_seconds > 0:
            reconciler = Reconciler(settings, core.datagrid, self.queue, store, metrics)
            task = asyncio.create_task(reconciler.run(), name="reconciler")
            stack.callback(task.cancel)
        probe = asyncio.create_task(_probe_kafka(lambda: core.producer.current, self))
        stack.callback(probe.cancel)
        log.info(
            "started",
            port=settings.http_port,
            delivery=settings.delivery.value,
            concurrency=settings.concurrency,
            version=__version__,
        )

    async def drain(self) -> None:
        """Readiness off, stop taking jobs, let in-flight batches finish within the drain
        timeout."""
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
    on_fatal: Callable[[BaseException], None] | None = None,
    expose: Callable[[Services], None] | None = None,
) -> Litestar:
    """The Litestar app with one lifespan owning every resource (``expose`` receives the
    services object, for ``serve``'s drain)."""
    if not settings.webhook_secrets:
        raise ConfigError(
            "FORWARDER_WEBHOOK_SECRETS is empty: webhooks cannot be verified, refusing to start"
        )
    settings.require_api_key()
    metrics = metrics or Metrics()
    metrics.build_info.labels(version=__version__, revision=__revision__).set(1)
    services = Services(
        settings=settings,
        metrics=metrics,
        health=Health(metrics),
        webhook_secrets=[s.get_secret_value().encode() for s in settings.webhook_secrets],
        api_tokens=[t.get_secret_value().encode() for t in settings.api_tokens],
    )
    if on_fatal is not None:
        services.on_fatal = on_fatal
    if expose is not None:
        expose(services)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # No task dies unobserved: what the loop would print as "Task exception was never
        # retrieved" is logged and counted (forwarder_internal_errors_total, an alert).
        asyncio.get_running_loop().set_exception_handler(_task_failed(metrics))
        # Resources open in the background so that /healthz answers at once and /readyz tells
        # the truth while Kafka is still out of reach; a permanent error stops the process.
        runner = asyncio.create_task(services.run(transport), name="resources")
        try:
            yield
        finally:
            await services.drain()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            log.info("stopped")

    return Litestar(
        route_handlers=[*ROUTES, datagrid_webhook],
        lifespan=[lifespan],
        dependencies={"services": Provide(provider(services), sync_to_thread=False)},
        exception_handlers={
            ForwarderError: problem_response,
            HTTPException: problem_response,
            Exception: problem_response,
        },
        request_max_body_size=settings.webhook_max_body_bytes,
        middleware=[
            http_middleware(metrics, settings.http_request_timeout_seconds),
            request_id_middleware,
        ],
        openapi_config=OpenAPIConfig(
            title="datagrid-forwarder",
            version=__version__,
            # The document itself, served offline: no UI page that loads assets from a CDN.
            render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"]), YamlRenderPlugin()],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http", scheme="bearer", description="FORWARDER_API_TOKENS"
                    )
                }
            ),
        ),
        logging_config=None,
    )


def _task_failed(metrics: Metrics) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The loop's exception handler: an exception nobody awaited is an internal error."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        metrics.internal_errors.labels(where="task").inc()
        exc = context.get("exception")
        task = context.get("task") or context.get("future")
        log.error(
            "task_failed",
            message=context.get("message"),
            task=getattr(task, "get_name", lambda: None)(),
            error=f"{type(exc).__name__}: {exc}" if exc is not None else None,
            exc_info=exc,
        )

    return handle


def provider(services: Services) -> Callable[[], Backend]:
    """The handlers' ``services`` dependency (the public and the management app share it)."""

    def provide() -> Backend:
        return services

    return provide


async def _probe_kafka(
    producer: Callable[[], AIOKafkaProducer], services: Services, every: float = 2.0
) -> None:
    """Keep ``kafka_ok`` true only while the cluster answers metadata requests."""
    while True:
        try:
            await asyncio.wait_for(producer().client.fetch_all_metadata(), timeout=5)
            ok = True
        except Exception as exc:  # any failure means "not reachable now"
            ok = False
            services.problem = f"Kafka metadata request failed: {type(exc).__name__}: {exc}"
        if ok != services.kafka_ok:
            log.warning("kafka_reachability_changed", reachable=ok, reason=services.problem)
        if ok:
            services.problem = None
        services.kafka_ok = ok
        await asyncio.sleep(every)


__all__ = ["Services", "create_app", "provider"]
