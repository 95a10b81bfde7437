"""The one retry loop (``forwarder.retry``): bounds, waits, classification, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from forwarder.errors import (
    Backoff,
    BatchNotReady,
    ForwarderError,
    KafkaConfigProblem,
    KafkaError,
    Retry,
    UpstreamRejected,
    UpstreamUnavailable,
)
from forwarder.health import Health
from forwarder.retry import Policy, retry

NO_WAIT = Backoff(base=0.0, cap=0.0, jitter=0.0)


class Step:
    """A step that raises the given errors in turn, then returns ``done``."""

    def __init__(self, *errors: ForwarderError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def test_transient_failures_are_retried_up_to_the_attempts() -> None:
    """Three attempts: two transient failures then success; three failures raise the third."""
    step = Step(UpstreamUnavailable("a"), UpstreamUnavailable("b"))
    assert await retry(step, Policy("x", NO_WAIT, attempts=3)) == "done"
    assert step.calls == 3
    step = Step(UpstreamUnavailable("a"), UpstreamUnavailable("b"), UpstreamUnavailable("c"))
    with pytest.raises(UpstreamUnavailable, match="c"):
        await retry(step, Policy("x", NO_WAIT, attempts=3))
    assert step.calls == 3


async def test_permanent_and_unlisted_kinds_are_raised_at_once() -> None:
    """A permanent error, or a kind the policy does not retry, is never tried again."""
    step = Step(UpstreamRejected("gone"))
    with pytest.raises(UpstreamRejected):
        await retry(step, Policy("x", NO_WAIT, attempts=5))
    assert step.calls == 1
    step = Step(BatchNotReady("later"))
    with pytest.raises(BatchNotReady):
        await retry(step, Policy("x", NO_WAIT, attempts=5))
    assert step.calls == 1
    step = Step(KafkaConfigProblem("too large"))
    with pytest.raises(KafkaConfigProblem):
        await retry(step, Policy("x", NO_WAIT, retry_on=frozenset({Retry.BACKOFF})))
    assert step.calls == 1


async def test_config_problems_spend_no_attempt_and_show_in_health() -> None:
    """A configuration problem waits without spending attempts, is held by Health while it lasts
    and cleared by the next success."""
    health = Health()
    seen: list[dict[str, str]] = []

    async def step() -> str:
        seen.append(health.problems)
        if len(seen) <= 4:
            raise KafkaConfigProblem("state topic refuses the record", topic="s")
        return "ok"

    assert (
        await retry(step, Policy("x", NO_WAIT, attempts=1), health=health, component="state_topic")
        == "ok"
    )
    assert len(seen) == 5  # four failures, no attempt spent: attempts=1 would stop a transient one
    assert seen[0] == {} and seen[1] == {"state_topic": "state topic refuses the record"}
    assert health.problems == {}


async def test_waits_follow_the_backoff_and_honour_retry_after() -> None:
    """Each wait is the backoff's delay for that failure, capped, or the server's Retry-After."""
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    errors = [
        UpstreamUnavailable("503", retry_after=7.0),
        UpstreamUnavailable("503"),
        UpstreamUnavailable("503"),
        UpstreamUnavailable("503", retry_after=99.0),
    ]
    policy = Policy("x", Backoff(base=1.0, cap=10.0, jitter=0.0), attempts=10)
    mp = pytest.MonkeyPatch()
    mp.setattr("forwarder.retry.asyncio.sleep", record)
    try:
        assert await retry(Step(*errors), policy) == "done"
    finally:
        mp.undo()
    assert waits == [7.0, 2.0, 4.0, 10.0]  # hint, 2**1, 2**2, hint capped at 10


async def test_before_retry_runs_before_each_wait_and_adds_log_fields() -> None:
    """The hook sees each failure with its number, and its fields reach the log line."""
    calls: list[tuple[str, int]] = []
    lines: list[dict[str, Any]] = []

    class Logger:
        def warning(self, event: str, **fields: Any) -> None:
            lines.append({"event": event, **fields})

        error = warning

        def info(self, event: str, **fields: Any) -> None:
            lines.append({"event": event, **fields})

    async def hook(exc: ForwarderError, n: int) -> dict[str, Any]:
        calls.append((str(exc), n))
        return {"acked_through": n * 10}

    step = Step(KafkaError("down"), KafkaError("still down"))
    await retry(
        step, Policy("step_failed", NO_WAIT, attempts=5), before_retry=hook, logger=Logger()
    )
    assert calls == [("down", 1), ("still down", 2)]
    assert [line["event"] for line in lines] == ["step_failed", "step_failed", "retry_recovered"]
    assert lines[1]["acked_through"] == 20 and lines[1]["kind"] == "backoff"


async def test_cancellation_goes_through_the_wait() -> None:
    """Cancelling a task waiting between tries ends it at once (drain, revocation)."""

    async def never() -> None:
        raise KafkaError("down")

    task = asyncio.create_task(retry(never, Policy("x", Backoff(base=60.0, cap=60.0))))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
