"""The HTTP servers of ``forwarder serve``: the app under uvicorn with a SIGTERM drain, request
deadlines and a connection cap, and the management listener (probes and metrics) beside it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from types import FrameType

import structlog
import uvicorn
from litestar import Litestar
from litestar.di import Provide
from litestar.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from forwarder.api import healthz, problem_response, readyz
from forwarder.api import metrics as metrics_route
from forwarder.app import Services, create_app, provider
from forwarder.config import Settings
from forwarder.errors import ConfigError

# The service's events: a filter on the logger name keeps finding them.
log = structlog.get_logger("forwarder.app")


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for each request's headers: a client that
    trickles them (or sends nothing) is disconnected instead of holding a connection forever."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout, self._headers_late
        )

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete and self._header_timer:
            self._header_timer.cancel()  # the request line and headers arrived
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this connection gets its own

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def create_management_app(services: Services) -> Litestar:
    """Liveness, readiness and metrics alone, for the management port: a listener of their own
    without the public one's connection cap, so that idle keep-alive connections or a scanner on
    the webhook port never make a probe fail (and the kubelet restart a pod that is only busy)."""
    return Litestar(
        route_handlers=[healthz, readyz, metrics_route],
        dependencies={"services": Provide(provider(services), sync_to_thread=False)},
        exception_handlers={HTTPException: problem_response, Exception: problem_response},
        openapi_config=None,
        logging_config=None,
    )


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM drains the workers (readiness off) before HTTP stops; the
    management listener (if any) runs beside it in the same loop and stops after it."""

    def __init__(
        self,
        config: uvicorn.Config,
        services: Services,
        management: uvicorn.Server | None = None,
    ) -> None:
        super().__init__(config)
        self._services = services
        self._management = management
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        if self._management is None:
            await super().serve(sockets)
            return
        # Its _serve, not serve: this server alone captures the signals.
        management = asyncio.create_task(self._management._serve(), name="management-http")
        try:
            await super().serve(sockets)
        finally:
            self._management.should_exit = True
            await management

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
    server: _DrainingServer | None = None

    def stop_on_fatal(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    services_box: list[Services] = []
    app = create_app(settings, on_fatal=stop_on_fatal, expose=services_box.append)
    services = services_box[0]
    protocol = type(
        "HTTPProtocol", (_Protocol,), {"header_timeout": settings.http_request_timeout_seconds}
    )
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
        http=protocol,
        limit_concurrency=settings.http_max_connections,
    )
    management = None
    if settings.management_port:
        management = uvicorn.Server(
            uvicorn.Config(
                create_management_app(services),
                host=settings.http_host,
                port=settings.management_port,
                log_config=None,
                access_log=False,
                lifespan="off",
                server_header=False,
                timeout_keep_alive=5,
            )
        )
    server = _DrainingServer(config, services, management)
    server.run()
    if services.fatal is not None:
        print(f"forwarder: {services.fatal}", file=sys.stderr)
        return 2 if isinstance(services.fatal, ConfigError) else 1  # 2: a setting can never work
    return 0 if server.started else 1


__all__ = ["create_management_app", "serve"]
