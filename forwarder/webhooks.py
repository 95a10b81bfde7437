"""``POST /webhooks/datagrid``: verify Datagrid's signature, then durably queue terminal batch
events.

Signature (``Datagrid-Signature: t=<unix>,v1=<hex>``): ``v1`` is HMAC-SHA256, keyed by the webhook
secret, of ``"<t>." + raw body``.  Every configured secret is tried (rotation), every ``v1`` value
in the header is accepted, comparisons are constant-time, and ``t`` must be within the tolerance of
now, in either direction.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import structlog
from litestar import Request, Response, post
from litestar.exceptions import HTTPException
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import HeaderParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from forwarder.api import BackendDep, json_body, problems
from forwarder.datagrid import TERMINAL_STATUSES, check_batch_id
from forwarder.errors import InvalidBatchId, InvalidWebhook, KafkaError, SignatureError
from forwarder.jobs import Job

log = structlog.get_logger("forwarder.webhooks")

TERMINAL_EVENTS = frozenset(f"batch_prediction.{status}" for status in TERMINAL_STATUSES)
_MAX_HEADER = 4096


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``v1`` value Datagrid sends for ``body`` at ``timestamp`` (lowercase hex)."""
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def _parse_header(header: str | None) -> tuple[int, list[bytes]]:
    """``(t, [v1, ...])`` of a ``Datagrid-Signature`` header, or :class:`SignatureError`."""
    if not header:
        raise SignatureError("missing Datagrid-Signature header")
    if len(header) > _MAX_HEADER:
        raise SignatureError("malformed Datagrid-Signature header")
    timestamp: int | None = None
    candidates: list[bytes] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed Datagrid-Signature header")
        if name == "t":
            # ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses.
            if not (value.isascii() and value.isdigit()) or len(value) > 12:
                raise SignatureError("malformed Datagrid-Signature timestamp")
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value.strip().lower().encode("ascii", "replace"))
    if timestamp is None or not candidates:
        raise SignatureError("malformed Datagrid-Signature header")
    return timestamp, candidates


def verify_signature(
    header: str | None,
    body: bytes,
    secrets: Sequence[bytes],
    *,
    now: float,
    tolerance: float,
) -> int:
    """Return the signed timestamp, or raise :class:`SignatureError` saying why (never which
    secret)."""
    timestamp, candidates = _parse_header(header)
    # Compute and compare against every secret and every v1 without an early exit,
    # so timing reveals neither which secret matched nor how much of a signature was right.
    matched = False
    for secret in secrets:
        expected = sign(secret, timestamp, body).encode()
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("signature does not match")
    if abs(now - timestamp) > tolerance:
        raise SignatureError("signature timestamp outside the tolerance")
    return timestamp


class RecentEvents:
    """Event ids queued recently by this process (bounded), to answer redeliveries cheaply."""

    def __init__(self, size: int = 10_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)


def parse_event(body: bytes) -> tuple[str, str, dict[str, Any]]:
    """``(event_id, event_type, data)`` of a webhook body, or :class:`InvalidWebhook`."""
    try:
        event = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidWebhook("body is not valid JSON") from exc
    if not isinstance(event, dict):
        raise InvalidWebhook("body is not a JSON object")
    event_id, event_type, data = event.get("id"), event.get("event_type"), event.get("data")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 256:
        raise InvalidWebhook("event id is missing or not a string")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidWebhook("event_type is missing or not a string")
    if not isinstance(data, dict):
        data = {}
    return event_id, event_type, data


_EVENT_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    required=["id", "event_type", "data"],
    properties={
        "id": Schema(type=OpenAPIType.STRING, description="The event id (deduplicated)."),
        "event_type": Schema(
            type=OpenAPIType.STRING,
            description="Terminal `batch_prediction.*` events are queued; others are ignored.",
            examples=sorted(TERMINAL_EVENTS),
        ),
        "timestamp": Schema(type=OpenAPIType.INTEGER),
        "data": Schema(
            type=OpenAPIType.OBJECT,
            required=["id"],
            properties={"id": Schema(type=OpenAPIType.STRING, description="The batch id.")},
        ),
    },
)


@post(
    "/webhooks/datagrid",
    status_code=HTTP_202_ACCEPTED,
    summary="Datagrid webhook receiver",
    description="Signed by Datagrid: `Datagrid-Signature: t=<unix>,v1=<hex>`, where `v1` is the "
    'HMAC-SHA256 of `"<t>." + raw body`, keyed by a webhook secret. 202 queued; 200 ignored or '
    "duplicate.",
    responses=problems(400, 401, 413, 503),
    operation_class=json_body(_EVENT_SCHEMA, "A Datagrid webhook event."),
)
async def datagrid_webhook(
    request: Request[Any, Any, Any],
    services: BackendDep,
    signature: Annotated[
        str | None,
        HeaderParameter(name="Datagrid-Signature", description="`t=<unix>,v1=<hex HMAC-SHA256>`"),
    ] = None,
) -> Response[Any]:
    """Verify the signature; queue terminal ``batch_prediction.*`` events (202), ignore others
    (200)."""
    metrics = services.metrics
    try:
        body = await request.body()  # bounded by request_max_body_size: 413 beyond it
    except HTTPException as exc:
        if exc.status_code == 413:
            metrics.webhooks.labels(outcome="too_large").inc()
        raise
    try:
        verify_signature(
            signature,
            body,
            services.webhook_secrets,
            now=time.time(),
            tolerance=services.settings.webhook_tolerance_seconds,
        )
    except SignatureError:
        metrics.webhooks.labels(outcome="bad_signature").inc()
        raise
    try:
        event_id, event_type, data = parse_event(body)
        structlog.contextvars.bind_contextvars(event_id=event_id)
        if event_type not in TERMINAL_EVENTS:
            metrics.webhooks.labels(outcome="ignored").inc()
            log.info("webhook_ignored", event_type=event_type[:100])
            return Response({"status": "ignored", "event_id": event_id}, status_code=HTTP_200_OK)
        batch_id = data.get("id")
        if not isinstance(batch_id, str):
            raise InvalidWebhook("data.id (the batch id) is missing")
        check_batch_id(batch_id)
    except (InvalidWebhook, InvalidBatchId):
        metrics.webhooks.labels(outcome="invalid").inc()
        raise
    known = services.state_of(batch_id)
    if services.seen_event(event_id) or (known is not None and known.done):
        metrics.webhooks.labels(outcome="duplicate").inc()
        log.info("webhook_duplicate", batch_id=batch_id)
        return Response(
            {"status": "duplicate", "event_id": event_id, "batch_id": batch_id},
            status_code=HTTP_200_OK,
        )
    try:
        await services.enqueue(Job(batch_id=batch_id, source="webhook", event_id=event_id))
    except KafkaError:
        # Datagrid retries a 503; count it, since a retry that never comes loses the batch
        # (until the reconciler finds it).
        metrics.webhooks.labels(outcome="unavailable").inc()
        raise
    services.remember_event(event_id)
    metrics.webhooks.labels(outcome="accepted").inc()
    log.info("webhook_accepted", batch_id=batch_id, event_type=event_type)
    return Response(
        {"status": "queued", "event_id": event_id, "batch_id": batch_id},
        status_code=HTTP_202_ACCEPTED,
    )
