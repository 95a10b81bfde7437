"""The Datagrid API client: batch metadata and the results stream, errors translated at the edge.

The client takes an ``httpx`` transport (a seam for tests), counts every response in the
metrics, and keeps to Datagrid's rate limit (:class:`RateLimiter`).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from forwarder import __version__
from forwarder.config import BATCH_ID_PATTERN, Settings
from forwarder.errors import (
    BatchNotReady,
    InvalidBatchId,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from forwarder.observability import Metrics

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "expired"})
#: Most items a batch holds (Datagrid's documented limit): bounds a results stream of unknown size.
MAX_BATCH_ITEMS = 5_000
_RETRIABLE_STATUSES = frozenset({408, 429})
_MAX_ERROR_BODY = 16_384
#: Datagrid's rate-limit window; no pause it asks for is honoured beyond it.
RATE_LIMIT_WINDOW = 60.0
#: Largest batch object read; a real one is a few KB.
MAX_METADATA_BYTES = 1_048_576
#: Media types a results stream may have (NDJSON under its usual names); none at all is accepted
#: too, as Datagrid's own SDK does. Anything else (a proxy's HTML page) is an upstream error.
NDJSON_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonl",
        "application/jsonlines",
        "application/x-jsonlines",
        "application/json",
    }
)


def check_batch_id(batch_id: str) -> str:
    """Return ``batch_id`` if it may go into a URL, else raise :class:`InvalidBatchId`."""
    if not isinstance(batch_id, str) or not BATCH_ID_PATTERN.match(batch_id):
        raise InvalidBatchId(
            "batch id must be 1-128 letters, digits, '_' or '-'"
            + (f", got {batch_id[:64]!r}" if isinstance(batch_id, str) else "")
        )
    return batch_id


def terminal_time(batch: dict[str, Any]) -> datetime | None:
    """When the batch reached its terminal state, from its ``<status>_at`` field."""
    value = batch.get(f"{batch.get('status')}_at")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def expected_lines(batch: dict[str, Any]) -> int | None:
    """The batch's ``request_counts.total``: how many result lines its stream must hold."""
    counts = batch.get("request_counts")
    total = counts.get("total") if isinstance(counts, dict) else None
    if type(total) is int and total >= 0:
        return total
    return None


def _seconds(text: str, scale: float = 1.0) -> float | None:
    try:
        value = float(text) / scale
    except ValueError:
        return None
    return max(value, 0.0) if math.isfinite(value) else None


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date).

    Always a finite number of seconds, at least 0, or None: ``nan``, ``inf`` and garbage are
    ignored (the caller's own backoff applies), negative values and dates in the past mean now.
    """
    if (millis := headers.get("retry-after-ms")) is not None and (
        seconds := _seconds(millis, 1000.0)
    ) is not None:
        return seconds
    value = headers.get("retry-after")
    if value is None:
        return None
    if (seconds := _seconds(value)) is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


@dataclass(frozen=True, slots=True)
class ResultsStream:
    """An open results stream: its byte chunks, and whether only closing the connection ends it
    (no length, no chunking), so that a cut connection looks like a normal end."""

    chunks: AsyncIterator[bytes]
    close_delimited: bool


class RateLimiter:
    """At most ``per_minute`` requests to each endpoint in any 60 s, and a pause whenever Datagrid
    says its window is used up (``X-RateLimit-Remaining: 0`` until ``X-RateLimit-Reset``, or a
    429's ``Retry-After``).  Datagrid counts per teamspace, so the pause is what keeps N pods
    together under its limit: each of them sees the shared window run out.

    Near the end of the shared window (``X-RateLimit-Remaining`` at most a tenth of
    ``X-RateLimit-Limit``) and on the first request after a pause, requests to the endpoint go
    one at a time, each waiting for the previous answer's headers: otherwise every request this
    pod has in flight when the window runs out is answered 429."""

    def __init__(self, per_minute: float, on_wait: Callable[[float], None]) -> None:
        self._limit = int(per_minute)
        self._sent: dict[str, deque[float]] = {}
        self._paused_until: dict[str, float] = {}
        self._cautious: set[str] = set()
        self._gates: dict[str, asyncio.Lock] = {}
        self._on_wait = on_wait

    async def acquire(self, endpoint: str) -> asyncio.Lock | None:
        """Wait until a request to ``endpoint`` may go; the gate to release once it answered."""
        while True:
            now = time.monotonic()
            wait = self._paused_until.get(endpoint, 0.0) - now
            sent = self._sent.setdefault(endpoint, deque())
            while sent and sent[0] <= now - 60.0:
                sent.popleft()
            if self._limit and len(sent) >= self._limit:
                wait = max(wait, sent[0] + 60.0 - now)
            if wait > 0:
                self._on_wait(wait)
                await asyncio.sleep(wait)
                continue
            gate = None
            if endpoint in self._cautious:
                gate = self._gates.setdefault(endpoint, asyncio.Lock())
                await gate.acquire()
                if self._paused_until.get(endpoint, 0.0) > time.monotonic():
                    gate.release()  # the answer we waited for paused the endpoint
                    continue
            if self._limit:
                sent.append(time.monotonic())
            return gate

    def observe(self, endpoint: str, status: int, headers: httpx.Headers) -> None:
        """Learn from a response's rate-limit headers."""
        pause = None
        remaining = _seconds(headers.get("x-ratelimit-remaining", ""))
        limit = _seconds(headers.get("x-ratelimit-limit", ""))
        if status == 429:
            pause = parse_retry_after(headers) or 1.0
        elif remaining == 0:
            reset = _seconds(headers.get("x-ratelimit-reset", ""))
            pause = reset - time.time() if reset is not None else None
        if pause is not None and pause > 0:
            until = time.monotonic() + min(pause, RATE_LIMIT_WINDOW)
            self._paused_until[endpoint] = max(self._paused_until.get(endpoint, 0.0), until)
            self._cautious.add(endpoint)
        elif remaining is not None and (limit is None or remaining > limit / 10):
            self._cautious.discard(endpoint)
        elif remaining is not None:
            self._cautious.add(endpoint)


class DatagridClient:
    """Async client for the endpoints the forwarder needs."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        api_key = settings.require_api_key()
        headers = {
            "Authorization": f"Bearer {api_key.get_secret_value()}",
            "User-Agent": f"datagrid-forwarder/{__version__}",
        }
        if settings.datagrid_teamspace:
            headers["Datagrid-Teamspace"] = settings.datagrid_teamspace
        base_url = settings.datagrid_base_url.rstrip("/") + "/"
        timeout = httpx.Timeout(
            settings.datagrid_read_timeout, connect=settings.datagrid_connect_timeout
        )
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )
        # Each request is built from these, not by the client's build_request, which merges the
        # base URL, headers, cookies and timeout anew every time (about 80 µs a request, twice a
        # batch): the same as it would, done once.
        self._base_url = base_url
        self._timeout = {"timeout": timeout.as_dict()}
        self._headers: dict[str, httpx.Headers] = {}
        self._on_response = metrics.on_upstream_response
        self._limiter = RateLimiter(
            settings.datagrid_requests_per_minute, metrics.ratelimit_wait.inc
        )

    async def aclose(self) -> None:
        """Close the connection pool (safe to call twice)."""
        await self._http.aclose()

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        """The ``batch_prediction`` object."""
        return await self._get_json(f"batch-predictions/{check_batch_id(batch_id)}")

    async def list_batches(
        self, after: str | None = None, limit: int = 100
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of ``GET /batch-predictions`` (newest first) and the next page's cursor."""
        params: dict[str, str | int] = {"limit": limit}
        if after:
            params["after"] = after
        page = await self._get_json("batch-predictions", params)
        data = page.get("data")
        cursor = page.get("next_cursor")
        batches = [b for b in data if isinstance(b, dict)] if isinstance(data, list) else []
        return batches, cursor if isinstance(cursor, str) and cursor else None

    async def _get_json(
        self, path: str, params: dict[str, str | int] | None = None
    ) -> dict[str, Any]:
        """A JSON object from ``GET path``, read up to :data:`MAX_METADATA_BYTES`."""
        async with self._open(path, "application/json", params) as response:
            if response.status_code != 200:
                body = await _read_bounded(response, _MAX_ERROR_BODY)
                _raise_for_status(path, response.status_code, response.headers, body)
            content = await _read_bounded(response, MAX_METADATA_BYTES + 1, strict=path)
        if len(content) > MAX_METADATA_BYTES:
            raise UpstreamUnavailable(
                f"GET {path}: response larger than {MAX_METADATA_BYTES} bytes"
            )
        try:
            value = msgspec.json.decode(content)
        except msgspec.DecodeError as exc:
            raise UpstreamUnavailable(f"GET {path}: response is not JSON") from exc
        if not isinstance(value, dict):
            raise UpstreamUnavailable(f"GET {path}: response is not a JSON object")
        return value

    @asynccontextmanager
    async def _open(
        self, path: str, accept: str, params: dict[str, str | int] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """Send ``GET path`` and yield the response with its body unread; errors translated."""
        endpoint = _endpoint(path)
        gate = await self._limiter.acquire(endpoint)
        try:
            response = await self._send(path, accept, endpoint, params)
        finally:
            if gate is not None:
                gate.release()
        try:
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                # We asked for identity: a compressed body can inflate without bound in one
                # decoded chunk (a "zip bomb"), so none is ever decoded.
                raise UpstreamUnavailable(
                    f"GET {path}: {response.status_code} with Content-Encoding "
                    f"{encoding[:40]!r}, not identity"
                )
            yield response
        finally:
            await response.aclose()

    async def _send(
        self, path: str, accept: str, endpoint: str, params: dict[str, str | int] | None
    ) -> httpx.Response:
        """Send ``GET path``; the response's headers are read (and observed), its body is not."""
        started = time.perf_counter()
        request = self._request(path, accept, params)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.LocalProtocolError as exc:
            # Our own request is malformed (say, an API key with a control character): trying
            # again cannot help, and the message may quote the header, so it is not repeated.
            self._on_response("error", time.perf_counter() - started)
            raise UpstreamRejected(f"GET {path}: the request could not be sent") from exc
        except httpx.TransportError as exc:
            self._on_response("error", time.perf_counter() - started)
            raise UpstreamUnavailable(f"GET {path}: {type(exc).__name__}: {exc}") from exc
        self._on_response(str(response.status_code), time.perf_counter() - started)
        self._limiter.observe(endpoint, response.status_code, response.headers)
        return response

    def _request(
        self, path: str, accept: str, params: dict[str, str | int] | None
    ) -> httpx.Request:
        """``GET path`` as the client's ``build_request`` would build it."""
        if self._http.cookies:  # a server set cookies (say, a load balancer's): merge them
            return self._http.build_request(
                "GET", path, headers=self._headers_for(accept), params=params
            )
        return httpx.Request(
            "GET",
            self._base_url + path,
            params=params,
            headers=self._headers_for(accept),
            extensions=dict(self._timeout),
        )

    def _headers_for(self, accept: str) -> httpx.Headers:
        headers = self._headers.get(accept)
        if headers is None:
            headers = self._headers[accept] = self._http.headers.copy()
            # identity: a compressed body would let a small response inflate without bound.
            headers.update({"Accept": accept, "Accept-Encoding": "identity"})
        return headers

    @asynccontextmanager
    async def stream_results(self, batch_id: str) -> AsyncIterator[ResultsStream]:
        """Open the NDJSON results stream.

        Errors while opening or reading are translated: a broken or stalled stream, or a body
        that is not NDJSON, is :class:`UpstreamUnavailable` (retriable); a 409 is
        :class:`BatchNotReady`.
        """
        path = f"batch-predictions/{check_batch_id(batch_id)}/results"
        async with self._open(path, "application/x-ndjson") as response:
            if response.status_code != 200:
                body = await _read_bounded(response, _MAX_ERROR_BODY)
                _raise_for_status(path, response.status_code, response.headers, body)
            media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type and media_type not in NDJSON_TYPES:
                raise UpstreamUnavailable(
                    f"GET {path}: 200 with Content-Type {media_type[:80]!r}, not NDJSON"
                )
            close_delimited = (
                "content-length" not in response.headers
                and "chunked" not in response.headers.get("transfer-encoding", "").lower()
            )
            yield ResultsStream(_chunks(path, response), close_delimited)


def _endpoint(path: str) -> str:
    """The rate-limit scope of a path: Datagrid counts per endpoint, not per batch."""
    if path.endswith("/results"):
        return "results"
    return "batch" if path.startswith("batch-predictions/") else "list"


async def _chunks(path: str, response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.TransportError as exc:
        # RemoteProtocolError (connection dropped mid-body), ReadTimeout (stall), ReadError...
        raise UpstreamUnavailable(
            f"GET {path}: stream broken: {type(exc).__name__}: {exc}"
        ) from exc


async def _read_bounded(response: httpx.Response, limit: int, *, strict: str = "") -> bytes:
    """At most ``limit`` bytes of the body. With ``strict`` (the request, for the message) a body
    that breaks is an error; without, what arrived is enough (the status already says what
    matters)."""
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= limit:
                break
    except httpx.TransportError as exc:
        if strict:
            raise UpstreamUnavailable(f"GET {strict}: {type(exc).__name__}: {exc}") from exc
    return bytes(body[:limit])


def _problem(body: bytes) -> dict[str, Any] | None:
    try:
        problem = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return problem if isinstance(problem, dict) else None


def _raise_for_status(path: str, status: int, headers: httpx.Headers, body: bytes) -> None:
    problem = _problem(body)
    title = ""
    if problem:
        title = str(problem.get("detail") or problem.get("title") or "")[:300]
    message = f"GET {path}: HTTP {status}" + (f": {title}" if title else "")
    error: type[UpstreamError]
    if status in _RETRIABLE_STATUSES or status >= 500:
        error = UpstreamUnavailable
    elif status == 409:
        error = BatchNotReady
    else:
        error = UpstreamRejected
    raise error(message, status=status, problem=problem, retry_after=parse_retry_after(headers))
