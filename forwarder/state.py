"""A batch's forwarding state and its transitions.

:class:`BatchState` is the state topic's value and the body of ``GET /v1/batches/{id}``; its
status is a :class:`Status`, and each transition has a named constructor or method.
The map that holds this pod's states is ``statemap.py``; ``store.py`` follows the state topic
into it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec
import structlog

from forwarder.errors import BatchNotReady, ForwarderError

log = structlog.get_logger("forwarder.state")


def utcnow() -> str:
    """Current time as an ISO-8601 UTC string with milliseconds."""
    return iso(datetime.now(UTC))


def iso(when: datetime) -> str:
    """``when`` as an ISO-8601 UTC string with milliseconds and a ``Z``."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object) -> datetime | None:
    """An ISO-8601 timestamp (``Z`` or an offset) as an aware datetime; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def is_past(value: object) -> bool:
    """True when ``value`` is a timestamp before now (False when it is not a timestamp)."""
    when = parse_time(value)
    return when is not None and when < datetime.now(UTC)


#: Bounds on what a state record holds from outside (upstream problems, error details), so that
#: a record always fits the state topic: a hostile upstream or job cannot make it unwritable.
MAX_DETAIL = 1000
MAX_PROBLEM_BYTES = 2048


def bounded_problem(problem: object) -> dict[str, Any] | None:
    """An upstream problem+json object small enough to record: whole when it is, else its
    standard members (RFC 9457), each cut short."""
    if not isinstance(problem, dict) or not problem:
        return None
    if len(msgspec.json.encode(problem)) <= MAX_PROBLEM_BYTES:
        return dict(problem)
    kept = {
        key: value[:200] if isinstance(value, str) else value
        for key, value in problem.items()
        if key in ("type", "title", "status", "detail", "instance", "code", "expires_at")
        and isinstance(value, str | int | None)
    }
    return {**kept, "truncated": True}


class Status(StrEnum):
    """Where a batch stands."""

    FORWARDING = "forwarding"
    WAITING = "waiting"  # Datagrid has not finished it: parked, re-checked on a timer
    FORWARDED = "forwarded"  # every result line is on the results or the dead-letter topic
    FAILED = "failed"


class BatchState(msgspec.Struct, kw_only=True):
    """A batch's forwarding state: the state topic's value and ``GET /v1/batches/{id}``."""

    batch_id: str
    status: Status
    lines: dict[str, int] = msgspec.field(default_factory=dict)
    dead_letters: dict[str, int] = msgspec.field(default_factory=dict)
    blank_lines: int = 0
    expected_lines: int | None = None
    attempts: int = 0
    stream_restarts: int = 0
    batch_status: str | None = None
    source: str | None = None
    event_id: str | None = None
    delivery: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    terminal_at: str | None = None
    error: dict[str, Any] | None = None

    @classmethod
    def forwarding(
        cls, batch_id: str, *, source: str, event_id: str | None, delivery: str
    ) -> BatchState:
        """A batch whose forwarding starts now."""
        return cls(
            batch_id=batch_id,
            status=Status.FORWARDING,
            source=source,
            event_id=event_id,
            delivery=delivery,
            started_at=utcnow(),
        )

    @classmethod
    def waiting(
        cls,
        batch_id: str,
        *,
        source: str,
        event_id: str | None,
        not_ready: BatchNotReady,
        checks: int,
    ) -> BatchState:
        """A batch that Datagrid has not finished yet, checked ``checks`` times so far; or, once
        its ``expires_at`` has passed (Datagrid will never finish it), a failed one."""
        expires_at = (not_ready.problem or {}).get("expires_at")
        state = cls(
            batch_id=batch_id,
            status=Status.WAITING,
            source=source,
            event_id=event_id,
            batch_status=not_ready.batch_status,
            attempts=checks,
            started_at=utcnow(),
            error={"code": "batch_not_ready", "detail": str(not_ready), "expires_at": expires_at},
        )
        if is_past(expires_at):
            state.fail(not_ready)
            state.error = {
                "code": "batch_expired_unfinished",
                "detail": f"batch still {not_ready.batch_status!r} after expires_at {expires_at}",
            }
        return state

    def fail(self, exc: BaseException) -> None:
        """Mark the batch ``failed`` because of ``exc`` (its code, detail and upstream problem),
        bounded: the record must always fit the state topic, whatever the upstream sent."""
        self.status = Status.FAILED
        self.finished_at = utcnow()
        if isinstance(exc, ForwarderError):
            self.error = {
                "code": exc.code,
                "detail": str(exc)[:MAX_DETAIL],
                "upstream_status": getattr(exc, "status", None),
                "problem": bounded_problem(getattr(exc, "problem", None)),
            }
        else:
            detail = f"{type(exc).__name__}: {exc}"[:MAX_DETAIL]
            self.error = {"code": "internal_error", "detail": detail}

    @property
    def done(self) -> bool:
        """Forwarded: a new job for this batch is a duplicate (unless it is a replay)."""
        return self.status is Status.FORWARDED

    def encode(self) -> bytes:
        """The JSON record written to the state topic."""
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> BatchState:
        """Read a state-topic record."""
        return msgspec.json.decode(data, type=cls)
