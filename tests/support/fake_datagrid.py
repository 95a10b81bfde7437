"""A faithful fake of the Datagrid batch-predictions API, served over real HTTP/1.1.

Run it as a subprocess from the repository root::

    python -m tests.support.fake_datagrid --host 127.0.0.1 --port 0 --api-key KEY [--port-file PATH]

``--port 0`` picks a free port; the port is printed (``fake-datagrid listening on
http://HOST:PORT/v1``) and, with ``--port-file``, written to PATH (atomically, only once the
server accepts connections). Tests use :func:`start_fake_datagrid`, which does all of that.

Why a raw asyncio server rather than Litestar + uvicorn: tests need byte-exact control of the
results body (chunk boundaries that split UTF-8 characters and ``\\r\\n`` pairs), of the chunked
framing itself, and of how a connection dies mid-body (FIN or RST, after an exact byte). A
framework sits in between on all three. HTTP/1.1 with keep-alive, ``Content-Length`` request
bodies and ``Expect: 100-continue`` is all the clients here (httpx, curl) need.

Upstream API (base path ``/v1``, ``Authorization: Bearer <api key>``):

* ``GET /v1/batch-predictions/{id}`` -> the ``batch_prediction`` object.
* ``GET /v1/batch-predictions/{id}/results`` -> ``application/x-ndjson``, chunked, streamed
  from a generator (a million-line batch needs no big memory).
* Errors are RFC 9457 ``application/problem+json`` with
  ``type`` ``https://api.datagrid.com/errors/<code>``. Every ``/v1`` response carries
  ``X-Request-Id`` and ``X-RateLimit-*`` headers.
* By default nothing is limited (the ``X-RateLimit-*`` values are fixed). With
  ``--rate-limit N [--rate-window S]`` (:func:`start_fake_datagrid`'s ``rate_limit`` and
  ``rate_window``) the fake enforces Datagrid's documented limit, see :class:`SlidingWindow`.

Control API (no auth, JSON): see :data:`CONTROL_API_DOC` and ``PUT /_fake/batches/{id}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import email.utils
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote

import httpx

CONTROL_API_DOC = """
PUT /_fake/batches/{id}   JSON body, every key optional:
  status            "completed" (default) | any batch status
  status_sequence   ["in_progress", ..., "completed"]: the n-th request about this batch
                    (GET batch *or* GET results) observes the n-th status; the last one sticks.
                    Mutually exclusive with status.
  lines             ["<text>", ...]   each line's UTF-8 bytes, verbatim (may hold "\\r", "\\n")
  lines_b64         ["<base64>", ...] each line's raw bytes (invalid UTF-8, NUL, anything)
  generate          {"count": N, "line_bytes": 300, "statuses": ["succeeded", ...],
                     "distinct_ids": K}   deterministic realistic lines, see generate_lines()
                    (at most one of lines / lines_b64 / generate; none = empty body)
  line_ending       "\\n" (default) | "\\r\\n"   written after every line ...
  trailing_newline  true (default)             ... including the last one
  chunk_size        bytes per HTTP chunk, default 65536 (1 splits every character)
  drip_delay        seconds to sleep between chunks, default 0
  faults            FIFO, one popped by each authorised results request for this batch:
                    {"kind": "status", "code": 503, "retry_after": 1, "retry_after_ms": 250,
                     "type": "...", "title": "...", "detail": "...", "headers": {...}}
                    {"kind": "drop", "after_lines": N, "mid_line": false, "reset": false}
                    {"kind": "stall", "after_lines": N, "seconds": S}
  non_terminal_code 409 (default, problem "conflict"): answer for results of a non-terminal
                    batch; any 4xx/5xx, or 200 to stream the lines anyway
  results_gone      false; true -> results always 410 results_gone, results_url null
  model, metadata, error, request_counts, created_at, expires_at (ISO strings),
  timestamps        {"completed_at": ISO, ...} overrides for the *_at fields
GET    /_fake/batches/{id}   control view (observed count, next status, faults left)
DELETE /_fake/batches/{id}   forget one batch
DELETE /_fake/batches        forget every batch and the request log
GET    /_fake/requests       request log (every non-/_fake request), oldest first
DELETE /_fake/requests       clear the request log
GET    /_fake/health         {"ok": true}
GET    /v1/batch-predictions?limit=N&after=CURSOR   the list endpoint: every batch, newest
                    (created_at) first, cursor pagination (next_cursor, has_more)
"""

PROBLEM_BASE = "https://api.datagrid.com/errors/"
# fmt: off
BATCH_STATUSES = (
    "validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled",
    "expired",
)
# fmt: on
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "expired"})
LINE_STATUSES = ("succeeded", "errored", "canceled", "expired")
DEFAULT_CHUNK_SIZE = 65536

# (code, title) of the problem served for each HTTP status. Only no_authentication,
# resource_not_found, conflict, results_gone and validation_failed are in Datagrid's registry;
# the others are our inference and are labelled as such in the fact sheet.
PROBLEMS: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "Invalid Request"),
    401: ("no_authentication", "No Authentication"),
    403: ("permission_denied", "Permission Denied"),
    404: ("resource_not_found", "Resource Not Found"),
    405: ("method_not_allowed", "Method Not Allowed"),
    408: ("request_timeout", "Request Timeout"),
    409: ("conflict", "Conflict"),
    410: ("results_gone", "Results Gone"),
    422: ("validation_failed", "Validation Failed"),
    429: ("rate_limit_exceeded", "Rate Limit Exceeded"),
    500: ("internal_error", "Internal Server Error"),
    502: ("bad_gateway", "Bad Gateway"),
    503: ("service_unavailable", "Service Unavailable"),
    504: ("gateway_timeout", "Gateway Timeout"),
}

# Per-line problems for generated non-succeeded lines (statuses other than 422 are guesses).
_LINE_ERRORS: dict[str, tuple[str, str, int]] = {
    "errored": ("prediction_failed", "Prediction Failed", 422),
    "canceled": ("batch_cancelled", "Batch Cancelled", 409),
    "expired": ("batch_expired", "Batch Expired", 410),
}
# Batch-level `error` for terminal non-completed batches (inferred, open question 9).
_BATCH_ERRORS: dict[str, tuple[str, str, int]] = {
    "failed": ("validation_failed", "Validation Failed", 422),
    "cancelled": ("batch_cancelled", "Batch Cancelled", 409),
    "expired": ("batch_expired", "Batch Expired", 410),
}
# fmt: off
_TIME_FIELDS = (
    "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
    "cancelled_at", "expired_at",
)
# fmt: on
# Entering a state implies its predecessors happened (validating has no *_at field).
_IMPLIED_STATES: dict[str, tuple[str, ...]] = {
    "finalizing": ("in_progress",),
    "completed": ("in_progress", "finalizing"),
    "cancelled": ("cancelling",),
}
_FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
_BATCH_PATH = re.compile(r"/v1/batch-predictions/([^/]+)(/results)?")
_CONTROL_BATCH_PATH = re.compile(r"/_fake/batches/([^/]+)")
# fmt: off
_SPEC_KEYS = frozenset({
    "status", "status_sequence", "lines", "lines_b64", "generate", "line_ending",
    "trailing_newline", "chunk_size", "drip_delay", "faults", "non_terminal_code",
    "results_gone", "model", "metadata", "error", "request_counts", "created_at", "expires_at",
    "timestamps",
})
# fmt: on


class SlidingWindow:
    """Datagrid's documented rate limit, enforced: at most ``limit`` requests in any ``window``
    seconds (200 per 60 s for Datagrid) per route and method (the fake has one API key, so one
    teamspace).

    Every authorised ``/v1`` response carries ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``
    (slots left in the window after this request) and ``X-RateLimit-Reset``; a request over the
    limit is answered 429 and does not use a slot. When no slot is left (the request that took the
    last one, and every 429) the response also carries ``Retry-After``, as Datagrid documents.

    Datagrid documents ``X-RateLimit-Reset`` as Unix epoch seconds but not which moment of a
    sliding window it names; here it is when the oldest request in the window leaves it, i.e. the
    first moment another request is accepted, rounded up to a whole second (rounding down would
    invite a request one second too early). ``Retry-After`` is the same moment as whole seconds
    from now, at least 1.
    """

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("rate limit must be >= 1 request per window > 0 seconds")
        self.limit = limit
        self.window = window
        self._sent: dict[tuple[str, str], deque[float]] = {}

    def take(self, method: str, path: str) -> dict[str, Any]:
        """Count one request now; return its rate-limit facts (``allowed`` False: answer 429)."""
        now = time.time()
        sent = self._sent.setdefault((method, route_of(path)), deque())
        while sent and sent[0] <= now - self.window:
            sent.popleft()
        allowed = len(sent) < self.limit
        if allowed:
            sent.append(now)
        remaining = self.limit - len(sent)
        frees_at = sent[0] + self.window if sent else now
        facts: dict[str, Any] = {
            "allowed": allowed,
            "limit": self.limit,
            "remaining": remaining,
            "reset": math.ceil(frees_at),
            "retry_after": None,
        }
        if remaining == 0:
            facts["retry_after"] = max(1, math.ceil(frees_at - now))
        return facts


def route_of(path: str) -> str:
    """The route a path belongs to (Datagrid counts per route, not per batch id)."""
    match = _BATCH_PATH.fullmatch(path)
    if match is None:
        return path
    return "/v1/batch-predictions/{id}" + (match.group(2) or "")


class SpecError(ValueError):
    """A control-API batch spec is invalid (answered with 400 and this message)."""


# --------------------------------------------------------------------------- data generation


@dataclass(frozen=True)
class GenerateSpec:
    """Parameters of a generated batch; see :func:`generate_lines`."""

    count: int
    line_bytes: int = 300
    statuses: tuple[str, ...] = ("succeeded",)
    distinct_ids: int | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> GenerateSpec:
        """Validate a ``generate`` JSON object."""
        unknown = set(raw) - {"count", "line_bytes", "statuses", "distinct_ids"}
        if unknown:
            raise SpecError(f"generate: unknown keys {sorted(unknown)}")
        count = _int(raw.get("count"), "generate.count", minimum=0)
        line_bytes = _int(raw.get("line_bytes", 300), "generate.line_bytes", minimum=1)
        statuses = raw.get("statuses", ["succeeded"])
        if (
            not isinstance(statuses, list)
            or not statuses
            or any(s not in LINE_STATUSES for s in statuses)
        ):
            raise SpecError(f"generate.statuses must be a non-empty list of {LINE_STATUSES}")
        distinct = raw.get("distinct_ids")
        if distinct is not None:
            distinct = _int(distinct, "generate.distinct_ids", minimum=1)
        return cls(count, line_bytes, tuple(statuses), distinct)

    def status_counts(self) -> dict[str, int]:
        """How many generated lines carry each line status (without generating them)."""
        counts = dict.fromkeys(LINE_STATUSES, 0)
        cycles, rest = divmod(self.count, len(self.statuses))
        for index, status in enumerate(self.statuses):
            counts[status] += cycles + (1 if index < rest else 0)
        return counts


def _line_template(batch_id: str, status: str) -> tuple[str, str, str, str]:
    """Four fixed parts; a line is ``a + custom_id + b + seq + c + padding + d``."""
    head = (
        '{"object":"batch_prediction.result","batch_id":' + json.dumps(batch_id) + ',"custom_id":"'
    )
    if status == "succeeded":
        return head, '","status":"succeeded","output":{"seq":', ',"text":"', '"},"error":null}'
    code, title, http_status = _LINE_ERRORS[status]
    return (
        head,
        (
            f'","status":"{status}","output":null,"error":{{"type":"{PROBLEM_BASE}{code}",'
            f'"title":"{title}","status":{http_status},"detail":"item '
        ),
        ": ",
        '"}}',
    )


def generate_lines(batch_id: str, spec: Mapping[str, Any] | GenerateSpec) -> Iterator[bytes]:
    """The lines (without terminators) a ``generate`` spec serves, deterministically.

    Line ``i`` (0-based) has status ``statuses[i % len(statuses)]``, custom_id
    ``cid-{i % distinct_ids:08d}``, ``seq`` ``i + 1`` and ASCII padding so that it is exactly
    ``line_bytes`` bytes long (or the minimum, about 130-230 bytes, if that is larger).
    """
    gen = spec if isinstance(spec, GenerateSpec) else GenerateSpec.parse(spec)
    templates = []
    for status in gen.statuses:
        a, b, c, d = _line_template(batch_id, status)
        templates.append((a, b, c, d, len(a) + len(b) + len(c) + len(d)))
    filler = _FILLER * (gen.line_bytes // len(_FILLER) + 1)
    distinct = gen.distinct_ids or max(gen.count, 1)
    n_templates = len(templates)
    target = gen.line_bytes
    # Hot path for the benchmark: one f-string per line, no per-line JSON encoding.
    for i in range(gen.count):
        a, b, c, d, fixed = templates[i % n_templates]
        custom_id = f"cid-{i % distinct:08d}"
        seq = str(i + 1)
        pad = target - fixed - len(custom_id) - len(seq)
        yield f"{a}{custom_id}{b}{seq}{c}{filler[:pad] if pad > 0 else ''}{d}".encode()


def expected_body(batch_id: str, **spec: Any) -> bytes:
    """The exact results body the fake serves for ``configure(batch_id, **spec)``."""
    batch = Batch.from_spec(batch_id, _normalize_spec(spec))
    return b"".join(batch.body_pieces())


def _terminated(lines: Iterable[bytes], ending: bytes, trailing: bool) -> Iterator[bytes]:
    """Each line with its terminator; the last one only if ``trailing``."""
    it = iter(lines)
    previous = next(it, None)
    if previous is None:
        return
    for line in it:
        yield previous + ending
        previous = line
    yield previous + ending if trailing else previous


def _blocks(pieces: Iterator[bytes], per_block: int, record: dict[str, Any]) -> Iterator[bytes]:
    """Join ``per_block`` lines at a time so the socket sees few, large writes."""
    while group := list(islice(pieces, per_block)):
        record["lines_sent"] += len(group)
        yield b"".join(group)


def _rechunk(blocks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Re-cut a byte stream into pieces of exactly ``size`` bytes (the last may be shorter)."""
    buf = bytearray()
    for block in blocks:
        buf += block
        if len(buf) >= size:
            end = len(buf) - len(buf) % size
            for start in range(0, end, size):
                yield bytes(buf[start : start + size])
            del buf[:end]
    if buf:
        yield bytes(buf)


# --------------------------------------------------------------------------- batch state


def _int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise SpecError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def _iso(moment: datetime) -> str:
    """ISO-8601 in UTC with milliseconds and ``Z``, like Datagrid's examples."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _check_iso(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{name} must be an ISO-8601 string")
    try:
        datetime.fromisoformat(value)
    except ValueError as exc:
        raise SpecError(f"{name}: {exc}") from exc
    return value


@dataclass(frozen=True)
class Fault:
    """One queued fault for a results request."""

    kind: str
    code: int = 0
    after_lines: int = 0
    mid_line: bool = False
    reset: bool = False
    seconds: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    problem: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any) -> Fault:
        """Validate one fault object."""
        if not isinstance(raw, dict):
            raise SpecError(f"fault must be an object, got {raw!r}")
        kind = raw.get("kind")
        if kind == "status":
            allowed = {"kind", "code", "retry_after", "retry_after_ms", "type", "title", "detail"}
            _no_unknown(raw, allowed | {"headers"}, "status fault")
            code = _int(raw.get("code"), "fault.code", minimum=400)
            if code > 599:
                raise SpecError("fault.code must be 400-599")
            headers = [(str(k), str(v)) for k, v in dict(raw.get("headers") or {}).items()]
            if "retry_after" in raw:
                headers.append(("Retry-After", _header_number(raw["retry_after"])))
            if "retry_after_ms" in raw:
                headers.append(("retry-after-ms", _header_number(raw["retry_after_ms"])))
            problem = {k: raw[k] for k in ("type", "title", "detail") if k in raw}
            return cls("status", code=code, headers=tuple(headers), problem=problem, raw=raw)
        if kind == "drop":
            _no_unknown(raw, {"kind", "after_lines", "mid_line", "reset"}, "drop fault")
            return cls(
                "drop",
                after_lines=_int(raw.get("after_lines", 0), "fault.after_lines", minimum=0),
                mid_line=bool(raw.get("mid_line", False)),
                reset=bool(raw.get("reset", False)),
                raw=raw,
            )
        if kind == "stall":
            _no_unknown(raw, {"kind", "after_lines", "seconds"}, "stall fault")
            return cls(
                "stall",
                after_lines=_int(raw.get("after_lines", 0), "fault.after_lines", minimum=0),
                seconds=_number(raw.get("seconds"), "fault.seconds"),
                raw=raw,
            )
        raise SpecError(f"fault.kind must be status, drop or stall, got {kind!r}")


def _no_unknown(raw: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise SpecError(f"{what}: unknown keys {sorted(unknown)}")


def _header_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SpecError(f"retry header value must be a number or string, got {value!r}")
    return str(value)


@dataclass
class Batch:
    """One configured batch: what it serves and its mutable progress."""

    id: str
    sequence: list[str]
    lines: list[bytes] | None
    generate: GenerateSpec | None
    line_ending: bytes
    trailing_newline: bool
    chunk_size: int
    drip_delay: float
    faults: deque[Fault]
    non_terminal_code: int
    results_gone: bool
    model: str
    metadata: dict[str, str] | None
    error: dict[str, Any] | None
    counts: dict[str, int]
    counts_override: dict[str, int] | None
    created_at: str
    expires_at: str
    times: dict[str, str]
    observed: int = 0

    @classmethod
    def from_spec(cls, batch_id: str, spec: Mapping[str, Any]) -> Batch:
        """Validate a control-API spec (already normalised: no bytes) and build the batch."""
        if not isinstance(spec, Mapping):
            raise SpecError("spec must be a JSON object")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise SpecError(f"unknown keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
        if "status" in spec and "status_sequence" in spec:
            raise SpecError("give status or status_sequence, not both")
        sequence = spec.get("status_sequence", [spec.get("status", "completed")])
        if not isinstance(sequence, list) or not sequence:
            raise SpecError("status_sequence must be a non-empty list")
        for status in sequence:
            if status not in BATCH_STATUSES:
                raise SpecError(f"unknown batch status {status!r}; use one of {BATCH_STATUSES}")
        sources = [k for k in ("lines", "lines_b64", "generate") if k in spec]
        if len(sources) > 1:
            raise SpecError(f"give at most one of lines, lines_b64, generate (got {sources})")
        lines: list[bytes] | None = None
        generate: GenerateSpec | None = None
        if "generate" in spec:
            if not isinstance(spec["generate"], Mapping):
                raise SpecError("generate must be an object")
            generate = GenerateSpec.parse(spec["generate"])
            counts = generate.status_counts()
        else:
            lines = _decode_lines(spec)
            counts = _count_line_statuses(lines)
        ending = spec.get("line_ending", "\n")
        if ending not in ("\n", "\r\n"):
            raise SpecError('line_ending must be "\\n" or "\\r\\n"')
        non_terminal = _int(spec.get("non_terminal_code", 409), "non_terminal_code", minimum=200)
        if non_terminal != 200 and not 400 <= non_terminal <= 599:
            raise SpecError("non_terminal_code must be 200 or 400-599")
        faults_raw = spec.get("faults", [])
        if not isinstance(faults_raw, list):
            raise SpecError("faults must be a list")
        metadata = spec.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise SpecError("metadata must be an object or null")
        counts_override = spec.get("request_counts")
        if counts_override is not None and not isinstance(counts_override, dict):
            raise SpecError("request_counts must be an object")
        now = datetime.now(UTC)
        created_at = _check_iso(spec.get("created_at", _iso(now)), "created_at")
        default_expiry = datetime.fromisoformat(created_at) + timedelta(hours=24)
        expires_at = _check_iso(spec.get("expires_at", _iso(default_expiry)), "expires_at")
        timestamps = spec.get("timestamps") or {}
        if not isinstance(timestamps, dict) or set(timestamps) - set(_TIME_FIELDS):
            raise SpecError(f"timestamps keys must be among {_TIME_FIELDS}")
        times = {k: _check_iso(v, f"timestamps.{k}") for k, v in timestamps.items()}
        batch = cls(
            id=batch_id,
            sequence=list(sequence),
            lines=lines,
            generate=generate,
            line_ending=ending.encode(),
            trailing_newline=bool(spec.get("trailing_newline", True)),
            chunk_size=_int(spec.get("chunk_size", DEFAULT_CHUNK_SIZE), "chunk_size", minimum=1),
            drip_delay=_number(spec.get("drip_delay", 0), "drip_delay"),
            faults=deque(Fault.parse(f) for f in faults_raw),
            non_terminal_code=non_terminal,
            results_gone=bool(spec.get("results_gone", False)),
            model=str(spec.get("model", "gemini-2.5-flash")),
            metadata=metadata,
            error=spec.get("error"),
            counts=counts,
            counts_override=counts_override,
            created_at=created_at,
            expires_at=expires_at,
            times=times,
        )
        # The batch has been in its first state since it was configured.
        batch._enter(sequence[0], now)
        return batch

    def _enter(self, status: str, moment: datetime) -> None:
        """Stamp ``<status>_at`` (and implied earlier states) unless already stamped."""
        for state in (*_IMPLIED_STATES.get(status, ()), status):
            if f"{state}_at" in _TIME_FIELDS:
                self.times.setdefault(f"{state}_at", _iso(moment))

    def peek_status(self) -> str:
        """The status the next request will observe."""
        return self.sequence[min(self.observed, len(self.sequence) - 1)]

    def observe(self) -> str:
        """Advance the status sequence by one request and return the observed status."""
        status = self.peek_status()
        self.observed += 1
        self._enter(status, datetime.now(UTC))
        return status

    def body_pieces(self) -> Iterator[bytes]:
        """The results body as a lazy sequence of terminated lines."""
        source: Iterable[bytes]
        if self.generate is not None:
            source = generate_lines(self.id, self.generate)
        else:
            source = self.lines or []
        return _terminated(source, self.line_ending, self.trailing_newline)

    def to_json(self, status: str) -> dict[str, Any]:
        """The ``batch_prediction`` object as seen in ``status``."""
        terminal = status in TERMINAL_STATUSES
        total = sum(self.counts.values())
        if self.counts_override is not None:
            counts: dict[str, int] = dict(self.counts_override)
        elif terminal:
            counts = {"total": total, "processing": 0, **self.counts}
        else:
            counts = {"total": total, "processing": total, **dict.fromkeys(LINE_STATUSES, 0)}
        error = self.error
        if error is None and status in _BATCH_ERRORS:
            code, title, http_status = _BATCH_ERRORS[status]
            error = {"type": PROBLEM_BASE + code, "title": title, "status": http_status}
        return {
            "object": "batch_prediction",
            "id": self.id,
            "status": status,
            "model": self.model,
            "completion_window": "24h",
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            **{name: self.times.get(name) for name in _TIME_FIELDS},
            "request_counts": counts,
            "metadata": self.metadata,
            "error": error,
            "results_url": (
                f"/v1/batch-predictions/{self.id}/results"
                if terminal and not self.results_gone
                else None
            ),
        }

    def control_view(self) -> dict[str, Any]:
        """What ``GET /_fake/batches/{id}`` shows."""
        return {
            "id": self.id,
            "observed": self.observed,
            "next_status": self.peek_status(),
            "faults_left": [f.raw for f in self.faults],
            "line_count": sum(self.counts.values()),
        }


def _decode_lines(spec: Mapping[str, Any]) -> list[bytes]:
    if "lines_b64" in spec:
        raw = spec["lines_b64"]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise SpecError("lines_b64 must be a list of base64 strings")
        try:
            return [base64.b64decode(x, validate=True) for x in raw]
        except binascii.Error as exc:
            raise SpecError(f"lines_b64: {exc}") from exc
    raw = spec.get("lines", [])
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise SpecError("lines must be a list of strings (use lines_b64 for raw bytes)")
    return [x.encode() for x in raw]


def _count_line_statuses(lines: list[bytes]) -> dict[str, int]:
    """request_counts for explicit lines, one item per result line the body holds: blank lines
    are not items, and a spec line with embedded newlines is several; anything unparseable counts
    as errored."""
    counts = dict.fromkeys(LINE_STATUSES, 0)
    physical = [piece for line in lines for piece in line.split(b"\n")]
    for line in physical:
        if not line.strip(b" \t\r\n\f\v"):
            continue
        try:
            status = json.loads(line).get("status")
        except (ValueError, AttributeError, RecursionError):
            status = None
        counts[status if status in counts else "errored"] += 1
    return counts


def _normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Client-side convenience: ``lines`` may hold bytes; send them as ``lines_b64``."""
    out = dict(spec)
    lines = out.get("lines")
    if isinstance(lines, list) and any(isinstance(x, bytes | bytearray) for x in lines):
        out["lines_b64"] = [
            base64.b64encode(x if isinstance(x, bytes | bytearray) else str(x).encode()).decode()
            for x in out.pop("lines")
        ]
    return out


# --------------------------------------------------------------------------- HTTP server


@dataclass
class Request:
    """A parsed HTTP/1.1 request."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _Close(Exception):
    """The connection must be closed without another response."""


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise _Close from exc
    except asyncio.LimitOverrunError as exc:
        raise _Close from exc
    request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        method, target, version = request_line.split(" ", 2)
    except ValueError as exc:
        raise _Close from exc
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _Close  # no client here sends chunked request bodies
    length = int(headers.get("content-length", "0") or 0)
    if length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for this on big PUTs
    body = await reader.readexactly(length) if length else b""
    path, _, query = target.partition("?")
    keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return Request(method, unquote(path), query, headers, body, keep_alive)


def _head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FakeDatagridServer:
    """The asyncio connection handler and all server state."""

    def __init__(self, api_key: str, rate_limit: SlidingWindow | None = None) -> None:
        self.api_key = api_key
        self.rate_limit = rate_limit
        self.batches: dict[str, Batch] = {}
        self.log: list[dict[str, Any]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until either side closes it."""
        try:
            while True:
                request = await _read_request(reader, writer)
                if not await self._dispatch(request, writer) or not request.keep_alive:
                    break
        except (_Close, ConnectionError):
            pass
        except asyncio.CancelledError:
            # Shutdown cancels handlers mid-stall; end quietly instead of asyncio logging a
            # traceback for every cancelled connection.
            pass
        except Exception:
            traceback.print_exc()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- responses

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        request: Request,
        status: int,
        body: bytes,
        content_type: str,
        extra: Iterable[tuple[str, str]] = (),
    ) -> bool:
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Date", email.utils.formatdate(usegmt=True)),
            *extra,
        ]
        if not request.keep_alive:
            headers.append(("Connection", "close"))
        writer.write(_head(status, headers) + body)
        await writer.drain()
        return True

    async def _json(
        self, writer: asyncio.StreamWriter, request: Request, status: int, data: Any
    ) -> bool:
        return await self._send(writer, request, status, _compact(data), "application/json")

    @staticmethod
    def _api_headers(record: dict[str, Any], limited: bool = False) -> list[tuple[str, str]]:
        facts = record["ratelimit"]
        if facts is None:  # not enforcing: fixed values
            return [
                ("X-Request-Id", record["request_id"]),
                ("X-RateLimit-Limit", "200"),
                ("X-RateLimit-Remaining", "0" if limited else "199"),
                ("X-RateLimit-Reset", str(int(time.time()) + 60)),
            ]
        headers = [
            ("X-Request-Id", record["request_id"]),
            ("X-RateLimit-Limit", str(facts["limit"])),
            ("X-RateLimit-Remaining", str(facts["remaining"])),
            ("X-RateLimit-Reset", str(facts["reset"])),
        ]
        if facts["retry_after"] is not None:
            headers.append(("Retry-After", str(facts["retry_after"])))
        return headers

    async def _problem(
        self,
        writer: asyncio.StreamWriter,
        request: Request,
        record: dict[str, Any],
        status: int,
        detail: str,
        overrides: Mapping[str, Any] | None = None,
        extra: Iterable[tuple[str, str]] = (),
    ) -> bool:
        code, title = PROBLEMS.get(status, (f"http_{status}", _phrase(status)))
        problem: dict[str, Any] = {
            "type": PROBLEM_BASE + code,
            "title": title,
            "status": status,
            "detail": detail,
        }
        for key, value in (overrides or {}).items():
            problem[key] = (
                PROBLEM_BASE + value
                if key == "type" and isinstance(value, str) and "/" not in value
                else value
            )
        record["status"] = status
        record["outcome"] = "problem"
        headers = [*self._api_headers(record, status == 429), *extra]
        body = _compact(problem)
        return await self._send(writer, request, status, body, "application/problem+json", headers)

    # -- routing

    async def _dispatch(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.path.startswith("/_fake/"):
            return await self._control(request, writer)
        record: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "status": None,
            "auth_ok": False,
            "timestamp": time.time(),
            "request_id": f"req_{uuid.uuid4().hex[:20]}",
            "batch_id": None,
            "fault": None,
            "outcome": None,
            "lines_sent": 0,
            "bytes_sent": 0,
            "headers": {k: v for k, v in request.headers.items() if k != "authorization"},
            "ratelimit": None,
        }
        self.log.append(record)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        record["auth_ok"] = scheme.lower() == "bearer" and token.strip() == self.api_key
        if not record["auth_ok"]:
            detail = "Missing, invalid, expired or revoked API key."
            return await self._problem(writer, request, record, 401, detail)
        if self.rate_limit is not None:
            # Counted once authenticated: Datagrid's window belongs to the key's teamspace.
            record["ratelimit"] = self.rate_limit.take(request.method, request.path)
            if not record["ratelimit"]["allowed"]:
                await self._problem(writer, request, record, 429, "Rate limit exceeded.")
                record["outcome"] = "rate_limited"
                return True
        if request.path == "/v1/batch-predictions" and request.method == "GET":
            return await self._list(writer, request, record)
        match = _BATCH_PATH.fullmatch(request.path)
        if match is None:
            return await self._problem(writer, request, record, 404, "No such endpoint.")
        if request.method != "GET":
            return await self._problem(
                writer, request, record, 405, f"{request.method} is not allowed here."
            )
        batch_id, results = match.group(1), bool(match.group(2))
        record["batch_id"] = batch_id
        batch = self.batches.get(batch_id)
        if batch is None:
            detail = (
                f"Batch prediction {batch_id} does not exist, or the authenticated user "
                "does not have permission to access it."
            )
            return await self._problem(writer, request, record, 404, detail)
        status = batch.observe()
        if not results:
            record["status"], record["outcome"] = 200, "ok"
            body = _compact(batch.to_json(status))
            headers = self._api_headers(record)
            return await self._send(writer, request, 200, body, "application/json", headers)
        return await self._results(writer, request, record, batch, status)

    async def _list(
        self, writer: asyncio.StreamWriter, request: Request, record: dict[str, Any]
    ) -> bool:
        """``GET /v1/batch-predictions?limit=&after=``: newest first, cursor pagination. Listing
        does not advance a batch's status sequence (it shows the status the next request sees)."""
        query = dict(pair.partition("=")[::2] for pair in request.query.split("&") if pair)
        try:
            limit = int(query.get("limit", "20"))
            offset = int(query["after"].removeprefix("c")) if query.get("after") else 0
        except ValueError:
            return await self._problem(writer, request, record, 400, "Bad limit or cursor.")
        if not 1 <= limit <= 100:
            return await self._problem(writer, request, record, 400, "limit must be 1-100.")
        ordered = sorted(
            enumerate(self.batches.values()), key=lambda item: (item[1].created_at, item[0])
        )
        ordered.reverse()
        page = [batch.to_json(batch.peek_status()) for _, batch in ordered[offset : offset + limit]]
        more = offset + limit < len(ordered)
        body = _compact(
            {
                "object": "list",
                "data": page,
                "next_cursor": f"c{offset + limit}" if more else None,
                "has_more": more,
            }
        )
        record["status"], record["outcome"] = 200, "ok"
        headers = self._api_headers(record)
        return await self._send(writer, request, 200, body, "application/json", headers)

    async def _results(
        self,
        writer: asyncio.StreamWriter,
        request: Request,
        record: dict[str, Any],
        batch: Batch,
        status: str,
    ) -> bool:
        fault = batch.faults.popleft() if batch.faults else None
        if fault is not None:
            record["fault"] = fault.raw
        if fault is not None and fault.kind == "status":
            detail = f"Injected fault for batch {batch.id}."
            return await self._problem(
                writer, request, record, fault.code, detail, fault.problem, fault.headers
            )
        if batch.results_gone:
            detail = f"Result lines for {batch.id} were cleaned up."
            return await self._problem(writer, request, record, 410, detail)
        if status not in TERMINAL_STATUSES and batch.non_terminal_code != 200:
            detail = (
                f"Batch prediction {batch.id} is {status}; results are available once it "
                "reaches a terminal state."
            )
            return await self._problem(writer, request, record, batch.non_terminal_code, detail)
        return await self._stream(writer, request, record, batch, fault)

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        request: Request,
        record: dict[str, Any],
        batch: Batch,
        fault: Fault | None,
    ) -> bool:
        headers = [
            ("Content-Type", "application/x-ndjson"),
            ("Transfer-Encoding", "chunked"),
            ("Date", email.utils.formatdate(usegmt=True)),
            *self._api_headers(record),
        ]
        if not request.keep_alive:
            headers.append(("Connection", "close"))
        record["status"], record["outcome"] = 200, "streaming"
        writer.write(_head(200, headers))
        pieces = batch.body_pieces()
        try:
            if fault is None:
                await self._send_chunks(writer, batch, pieces, record)
            else:
                await self._send_chunks(writer, batch, islice(pieces, fault.after_lines), record)
                if fault.kind == "stall":
                    record["outcome"] = "stalled"
                    await asyncio.sleep(fault.seconds)
                    await self._send_chunks(writer, batch, pieces, record)
                else:
                    await self._drop(writer, batch, pieces, fault, record)
                    return False
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            record["outcome"] = "client_disconnected"
            return False
        record["outcome"] = "complete"
        return True

    @staticmethod
    async def _send_chunks(
        writer: asyncio.StreamWriter, batch: Batch, pieces: Iterator[bytes], record: dict[str, Any]
    ) -> None:
        # Large chunks: join hundreds of lines per write; tiny chunks: one line at a time so
        # lines_sent stays close to what really went out.
        per_block = max(1, min(256, batch.chunk_size // 256))
        first = True
        for chunk in _rechunk(_blocks(pieces, per_block, record), batch.chunk_size):
            if batch.drip_delay and not first:
                await asyncio.sleep(batch.drip_delay)
            first = False
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            record["bytes_sent"] += len(chunk)
            await writer.drain()

    @staticmethod
    async def _drop(
        writer: asyncio.StreamWriter,
        batch: Batch,
        pieces: Iterator[bytes],
        fault: Fault,
        record: dict[str, Any],
    ) -> None:
        """Send half of the next line if asked, then kill the connection mid-body."""
        following = next(pieces, None) if fault.mid_line else None
        if following:
            content = len(following)
            if following.endswith(batch.line_ending):
                content -= len(batch.line_ending)
            half = following[: max(1, content // 2)] if content else b""
            if half:
                writer.write(b"%x\r\n%b\r\n" % (len(half), half))
                record["bytes_sent"] += len(half)
        await writer.drain()
        record["outcome"] = "dropped"
        transport = writer.transport
        if fault.reset:
            # RST instead of FIN: wait until the kernel has every byte (abort() would discard
            # what is still buffered), then close with SO_LINGER 0.
            while transport.get_write_buffer_size():
                await asyncio.sleep(0.001)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            # FIN before the terminating 0-chunk: h11 reports "incomplete chunked read".
            transport.close()

    # -- control API

    async def _control(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        method, path = request.method, request.path
        if path == "/_fake/health" and method == "GET":
            return await self._json(writer, request, 200, {"ok": True})
        if path == "/_fake/requests":
            if method == "GET":
                return await self._json(writer, request, 200, self.log)
            if method == "DELETE":
                self.log.clear()
                return await self._json(writer, request, 200, {"ok": True})
        if path == "/_fake/batches" and method == "DELETE":
            self.batches.clear()
            self.log.clear()
            return await self._json(writer, request, 200, {"ok": True})
        match = _CONTROL_BATCH_PATH.fullmatch(path)
        if match is not None:
            batch_id = match.group(1)
            if method == "PUT":
                try:
                    batch = Batch.from_spec(batch_id, json.loads(request.body or b"{}"))
                except (SpecError, ValueError) as exc:
                    return await self._json(writer, request, 400, {"error": str(exc)})
                self.batches[batch_id] = batch
                return await self._json(writer, request, 200, batch.control_view())
            batch_or_none = self.batches.get(batch_id)
            if batch_or_none is None:
                return await self._json(writer, request, 404, {"error": "no such batch"})
            if method == "GET":
                return await self._json(writer, request, 200, batch_or_none.control_view())
            if method == "DELETE":
                del self.batches[batch_id]
                return await self._json(writer, request, 200, {"ok": True})
        error = f"no control route {method} {path}"
        return await self._json(writer, request, 404, {"error": error, "help": CONTROL_API_DOC})


def _compact(data: Any) -> bytes:
    """Compact JSON, as an API server sends it."""
    return json.dumps(data, separators=(",", ":")).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def serve(
    host: str,
    port: int,
    api_key: str,
    port_file: str | None = None,
    rate_limit: SlidingWindow | None = None,
) -> None:
    """Run the fake until SIGTERM/SIGINT."""
    app = FakeDatagridServer(api_key, rate_limit)
    server = await asyncio.start_server(app.handle, host, port)
    actual_port = server.sockets[0].getsockname()[1]
    if port_file:
        # Atomic: a reader never sees an empty or partial file.
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(str(actual_port))
        tmp.replace(port_file)
    print(f"fake-datagrid listening on http://{host}:{actual_port}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m tests.support.fake_datagrid``)."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_datagrid",
        description="Fake Datagrid batch-predictions API for tests and demos.",
        epilog=CONTROL_API_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DATAGRID_API_KEY"),
        help="accepted bearer token (default: $DATAGRID_API_KEY)",
    )
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument(
        "--rate-limit",
        type=int,
        metavar="N",
        help="enforce Datagrid's limit: N requests per window per route and method, 429 and "
        "Retry-After beyond (Datagrid: 200; default: no limit)",
    )
    parser.add_argument(
        "--rate-window", type=float, default=60.0, metavar="S", help="window seconds (60)"
    )
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("--api-key (or DATAGRID_API_KEY) is required")
    limiter = None
    if args.rate_limit is not None:
        try:
            limiter = SlidingWindow(args.rate_limit, args.rate_window)
        except ValueError as exc:
            parser.error(str(exc))
    asyncio.run(serve(args.host, args.port, args.api_key, args.port_file, limiter))


# --------------------------------------------------------------------------- test client

_REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeDatagrid:
    """A handle on a running fake: its URLs and API key, and the control API.

    Returned by :func:`start_fake_datagrid`; also usable on its own (``process=None``) for a
    fake started elsewhere. Use as a context manager to stop the process on exit.
    """

    def __init__(
        self,
        root_url: str,
        api_key: str,
        process: subprocess.Popen[bytes] | None = None,
        cleanup_dir: str | None = None,
    ) -> None:
        self.root_url = root_url.rstrip("/")
        self.base_url = f"{self.root_url}/v1"
        self.api_key = api_key
        self.process = process
        self._http = httpx.Client(base_url=self.root_url, timeout=10.0)
        self._cleanup_dir = cleanup_dir

    @property
    def auth_headers(self) -> dict[str, str]:
        """``Authorization`` header accepted by the fake."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def health(self) -> None:
        """Raise unless the fake answers ``GET /_fake/health``."""
        self._http.get("/_fake/health").raise_for_status()

    def configure(self, batch_id: str, **spec: Any) -> dict[str, Any]:
        """Create or replace a batch (``PUT /_fake/batches/{id}``); see :data:`CONTROL_API_DOC`.

        ``lines`` may mix ``str`` and ``bytes``; bytes are sent as ``lines_b64``.
        """
        response = self._http.put(f"/_fake/batches/{batch_id}", json=_normalize_spec(spec))
        if response.status_code != 200:
            raise ValueError(f"fake rejected spec for {batch_id}: {response.text}")
        result: dict[str, Any] = response.json()
        return result

    def batch(self, batch_id: str) -> dict[str, Any]:
        """Control view of a batch: observed requests, next status, faults left."""
        response = self._http.get(f"/_fake/batches/{batch_id}")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def requests(self) -> list[dict[str, Any]]:
        """Every upstream request the fake has seen since the last clear, oldest first."""
        response = self._http.get("/_fake/requests")
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def clear_requests(self) -> None:
        """Empty the request log."""
        self._http.delete("/_fake/requests").raise_for_status()

    def reset(self) -> None:
        """Forget every batch and the request log."""
        self._http.delete("/_fake/batches").raise_for_status()

    def stop(self) -> None:
        """Terminate the subprocess (if we own one) and release resources."""
        self._http.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._cleanup_dir is not None:
            shutil.rmtree(self._cleanup_dir, ignore_errors=True)
            self._cleanup_dir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_fake_datagrid(
    api_key: str = "test-api-key",
    *,
    host: str = "127.0.0.1",
    startup_timeout: float = 10.0,
    rate_limit: int | None = None,
    rate_window: float = 60.0,
) -> FakeDatagrid:
    """Start the fake as a subprocess on a free port and wait until it answers.

    ``rate_limit`` (requests per ``rate_window`` seconds per route and method) turns on the
    enforced limit of :class:`SlidingWindow`; without it nothing is limited.
    Call ``.stop()`` on the result, or use it in a ``with`` block.
    """
    tmpdir = tempfile.mkdtemp(prefix="fake-datagrid-")
    port_file = Path(tmpdir) / "port"
    command = [sys.executable, "-m", "tests.support.fake_datagrid", "--host", host, "--port", "0"]
    command += ["--api-key", api_key, "--port-file", str(port_file)]
    if rate_limit is not None:
        command += ["--rate-limit", str(rate_limit), "--rate-window", str(rate_window)]
    process = subprocess.Popen(command, cwd=_REPO_ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + startup_timeout
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise RuntimeError(f"fake datagrid did not start (exit code {process.poll()})")
        time.sleep(0.01)
    fake = FakeDatagrid(f"http://{host}:{port_file.read_text()}", api_key, process, tmpdir)
    try:
        fake.health()
    except Exception:
        fake.stop()
        raise
    return fake


if __name__ == "__main__":
    main()
