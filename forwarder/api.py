"""Internal API, health and metrics routes, the HTTP middleware, and the one mapping of errors to
problem+json.

``POST /v1/batches`` queues a batch; ``GET /v1/batches/{batch_id}`` returns its forwarding state.
Both need a bearer token from ``FORWARDER_API_TOKENS`` (compared in constant time).  Handlers reach
the service through :class:`Backend`, a typed dependency that the composition root provides.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol, TypeAlias, runtime_checkable

import msgspec
import structlog
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import FromPath
from litestar.status_codes import HTTP_202_ACCEPTED
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from forwarder.config import BATCH_ID_PATTERN, Settings
from forwarder.datagrid import check_batch_id
from forwarder.errors import BadRequest, ForwarderError, NotFound, Unauthorized
from forwarder.jobs import Job
from forwarder.observability import Metrics
from forwarder.state import BatchState

log = structlog.get_logger("forwarder.api")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://datagrid-forwarder.dev/problems/"


class RequestTimeout(ForwarderError):
    """The client did not send its request in time."""

    code = "request_timeout"
    http_status = 408


@runtime_checkable
class Backend(Protocol):
    """What the HTTP handlers need of the service."""

    settings: Settings
    metrics: Metrics
    webhook_secrets: list[bytes]
    api_tokens: list[bytes]

    def readiness(self) -> dict[str, bool]:
        """Named readiness checks; ready only when all hold."""

    def reason(self) -> str | None:
        """Why the service is not ready, in one line."""

    async def enqueue(self, job: Job) -> None:
        """Queue a job durably (or raise a retriable KafkaError)."""

    def state_of(self, batch_id: str) -> BatchState | None:
        """The batch's latest state if this pod owns it (None: unknown here)."""

    async def find_state(self, batch_id: str) -> BatchState | None:
        """Any batch's latest state, wherever it is kept."""

    def seen_event(self, event_id: str) -> bool:
        """True when this process queued the webhook event recently."""

    def remember_event(self, event_id: str) -> None:
        """Note a webhook event as queued."""


@dataclass
class Problem:
    """RFC 9457 problem details: every error answer."""

    type: str
    title: str
    status: int
    detail: str
    instance: str


def problems(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses for the problem+json answers a route can give."""
    return {
        code: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_JSON,
            description=HTTPStatus(code).phrase,
            generate_examples=False,
        )
        for code in codes
    }


def json_body(schema: Schema, description: str) -> type[Operation]:
    """An operation whose request body (read raw by the handler) is documented as ``schema``."""

    @dataclass
    class WithBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=schema)},
                description=description,
                required=True,
            )

    return WithBody


BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
_BATCH_REQUEST_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    required=["batch_id"],
    properties={
        "batch_id": Schema(type=OpenAPIType.STRING, pattern=BATCH_ID_PATTERN.pattern[:-2] + "$"),
        "replay": Schema(type=OpenAPIType.BOOLEAN, default=False),
    },
    additional_properties=False,
)


#: How a handler asks for the service: a named dependency (``services``) the app provides.
BackendDep: TypeAlias = NamedDependency[Backend]


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/batches``."""

    batch_id: str
    replay: bool = False


def problem_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Every error as RFC 9457 problem details; internal details never leak."""
    headers: dict[str, str] = {}
    if isinstance(exc, ForwarderError):
        status = exc.http_status
        code, detail = exc.code, str(exc)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer" if isinstance(exc, Unauthorized) else "Signature"
        if status >= 500:
            log.error("request_failed", path=request.url.path, error=str(exc))
            detail = "Kafka is unavailable; retry later" if status == 503 else "internal error"
            headers["Retry-After"] = "5"
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        code = {
            400: "bad_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
        }.get(status, "http_error")
        detail = exc.detail if status < 500 else "internal error"
    else:
        status, code, detail = 500, "internal_error", "internal error"
        log.exception("request_crashed", path=request.url.path)
    if status in (408, 413):
        # The body was refused unread: close the connection rather than let the server
        # read (and discard) the rest of it, however long the client keeps sending.
        headers["Connection"] = "close"
    body = {
        "type": PROBLEM_BASE + code,
        "title": code.replace("_", " ").capitalize(),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Bind a request id (the caller's ``X-Request-Id`` if sane, else a new one) to every log line
    of the request, and echo it in the response."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await app(scope, receive, send_with_id)

    return middleware


def http_middleware(metrics: Metrics, request_timeout: float) -> Callable[[ASGIApp], ASGIApp]:
    """Count and time every request by route template, and give each request's body
    ``request_timeout`` seconds from its start to arrive (a slow client gets 408)."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            deadline = started + request_timeout
            code = 500

            async def timed_receive() -> ReceiveMessage:
                remaining = deadline - time.perf_counter()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    return await asyncio.wait_for(receive(), remaining)
                except TimeoutError:
                    raise RequestTimeout("the request body did not arrive in time") from None

            async def counting_send(message: Message) -> None:
                nonlocal code
                if message["type"] == "http.response.start":
                    code = message["status"]
                await send(message)

            try:
                await app(scope, timed_receive, counting_send)
            finally:
                route = scope.get("path_template") or "other"
                metrics.http_requests.labels(route=route, method=scope["method"], code=code).inc()
                metrics.http_duration.labels(route=route).observe(time.perf_counter() - started)

        return middleware

    return wrap


def require_token(request: Request[Any, Any, Any], tokens: list[bytes]) -> None:
    """Raise :class:`Unauthorized` unless the request carries one of ``tokens`` as a bearer."""
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise Unauthorized("a bearer token is required")
    candidate = presented.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token)
    if not matched:
        raise Unauthorized("the bearer token is not valid")


@post(
    "/v1/batches",
    status_code=HTTP_202_ACCEPTED,
    summary="Queue a batch for forwarding",
    security=BEARER,
    responses=problems(400, 401, 413, 503),
    operation_class=json_body(_BATCH_REQUEST_SCHEMA, "The batch to forward."),
)
async def queue_batch(request: Request[Any, Any, Any], services: BackendDep) -> dict[str, Any]:
    """Queue ``batch_id`` (``replay: true`` forwards again even if it was forwarded)."""
    require_token(request, services.api_tokens)
    try:
        payload = msgspec.json.decode(await request.body(), type=BatchRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f'body must be {{"batch_id": str, "replay": bool}}: {exc}') from exc
    check_batch_id(payload.batch_id)
    await services.enqueue(Job(batch_id=payload.batch_id, source="api", replay=payload.replay))
    log.info("batch_queued", batch_id=payload.batch_id, replay=payload.replay)
    return {"status": "queued", "batch_id": payload.batch_id, "replay": payload.replay}


@get(
    "/v1/batches/{batch_id:str}",
    summary="A batch's forwarding state",
    security=BEARER,
    responses=problems(400, 401, 404, 503),
)
async def batch_state(
    request: Request[Any, Any, Any], services: BackendDep, batch_id: FromPath[str]
) -> Response[Any]:
    """The batch's latest state record (the same JSON as the state topic)."""
    require_token(request, services.api_tokens)
    check_batch_id(batch_id)
    known = await services.find_state(batch_id)
    if known is None:
        raise NotFound(f"no forwarding state for batch {batch_id}")
    return Response(msgspec.to_builtins(known))


@get("/healthz", summary="Liveness", include_in_schema=True)
async def healthz() -> dict[str, str]:
    """200 while the process serves HTTP; restart it only if this fails."""
    return {"status": "ok"}


@get("/readyz", summary="Readiness", responses=problems(503))
async def readyz(services: BackendDep) -> Response[Any]:
    """200 when Kafka is reachable, the state topic is loaded, the worker joined its group, the
    process is not draining and (exactly-once) transactions can start; 503 with the failing checks
    and the reason otherwise."""
    checks = services.readiness()
    ready = all(checks.values())
    services.metrics.ready.set(1 if ready else 0)
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": checks}
    if not ready:
        body["reason"] = services.reason()
    return Response(body, status_code=200 if ready else 503)


@get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(services: BackendDep) -> Response[bytes]:
    """Prometheus text exposition of the service's registry."""
    # Readiness is exported even when nothing probes /readyz.
    services.metrics.ready.set(1 if all(services.readiness().values()) else 0)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


ROUTES = [queue_batch, batch_state, healthz, readyz, metrics]
