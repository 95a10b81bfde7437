"""The Datagrid API client: batch metadata and the results stream, errors translated at the edge.

The client takes an ``httpx`` transport (a seam for tests) and reports every response to
``on_response(code, seconds)`` so metrics live elsewhere.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
from pydantic import SecretStr

from forwarder import __version__
from forwarder.config import BATCH_ID_PATTERN
from forwarder.errors import (
    BatchNotReady,
    InvalidBatchId,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "expired"})
_RETRIABLE_STATUSES = frozenset({408, 429})
_MAX_ERROR_BODY = 16_384

ResponseHook = Callable[[str, float], None]


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


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


class DatagridClient:
    """Async client for the two endpoints the forwarder needs."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        teamspace: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        on_response: ResponseHook | None = None,
    ) -> None:
        headers = {
            "Authorization": f"Bearer {api_key.get_secret_value()}",
            "User-Agent": f"datagrid-forwarder/{__version__}",
        }
        if teamspace:
            headers["Datagrid-Teamspace"] = teamspace
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            transport=transport,
            follow_redirects=False,
        )
        self._on_response = on_response or (lambda code, seconds: None)

    async def aclose(self) -> None:
        """Close the connection pool (safe to call twice)."""
        await self._http.aclose()

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        """The ``batch_prediction`` object."""
        path = f"batch-predictions/{check_batch_id(batch_id)}"
        started = time.perf_counter()
        try:
            response = await self._http.get(path, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            self._on_response("error", time.perf_counter() - started)
            raise UpstreamUnavailable(f"GET {path}: {type(exc).__name__}: {exc}") from exc
        self._on_response(str(response.status_code), time.perf_counter() - started)
        if response.status_code != 200:
            _raise_for_status(path, response.status_code, response.headers, response.content)
        try:
            batch = msgspec.json.decode(response.content)
        except msgspec.DecodeError as exc:
            raise UpstreamUnavailable(f"GET {path}: response is not JSON") from exc
        if not isinstance(batch, dict):
            raise UpstreamUnavailable(f"GET {path}: response is not a JSON object")
        return batch

    @asynccontextmanager
    async def stream_results(self, batch_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open the NDJSON results stream; yields an iterator of raw byte chunks.

        Errors while opening or reading are translated: a broken or stalled stream is
        :class:`UpstreamUnavailable` (retriable); a 409 is :class:`BatchNotReady`.
        """
        path = f"batch-predictions/{check_batch_id(batch_id)}/results"
        started = time.perf_counter()
        request = self._http.build_request("GET", path, headers={"Accept": "application/x-ndjson"})
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            self._on_response("error", time.perf_counter() - started)
            raise UpstreamUnavailable(f"GET {path}: {type(exc).__name__}: {exc}") from exc
        try:
            self._on_response(str(response.status_code), time.perf_counter() - started)
            if response.status_code != 200:
                body = await _read_bounded(response)
                _raise_for_status(path, response.status_code, response.headers, body)
            yield _chunks(path, response)
        finally:
            await response.aclose()


async def _chunks(path: str, response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.TransportError as exc:
        # RemoteProtocolError (connection dropped mid-body), ReadTimeout (stall), ReadError...
        raise UpstreamUnavailable(
            f"GET {path}: stream broken: {type(exc).__name__}: {exc}"
        ) from exc


async def _read_bounded(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= _MAX_ERROR_BODY:
                break
    except httpx.TransportError:
        pass  # the status code already says what matters
    return bytes(body[:_MAX_ERROR_BODY])


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
