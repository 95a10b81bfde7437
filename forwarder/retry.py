"""The one retry loop: every task that tries again does it here, driven by the error's class.

:func:`retry` runs a step until it succeeds; a :class:`Policy` (data, like arq's ``Retry``) says
how long to wait and how often, and :attr:`ForwarderError.retry` (set once, where the error was
translated) says what a failure means:

- ``Retry.BACKOFF`` (transient): wait ``backoff.delay(n, retry_after)`` and try again, at most
  ``attempts`` times (``None``: for as long as the task runs, for loops that must not give up,
  such as following a topic);
- ``Retry.CONFIG`` (this pod's configuration): never spends an attempt; waits the backoff
  (growing to its cap), logs at error once per wait, and reports the problem to
  :class:`~forwarder.health.Health` under its component until the step succeeds again;
- anything else (permanent for the batch, not ready yet, handed off), or a kind the policy does
  not retry: raised to the caller at once.

Cancellation goes straight through (the wait is a plain ``asyncio.sleep``).  Anchors: arq's
worker, whose one ``except`` dispatches on the exception's kind; aiokafka's sender, whose handlers
only classify.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from forwarder.errors import Backoff, ForwarderError, Retry
from forwarder.health import Health

T = TypeVar("T")

log = structlog.get_logger("forwarder.retry")

#: Retried by default: transient failures and this pod's configuration problems.
TRANSIENT_OR_CONFIG = frozenset({Retry.BACKOFF, Retry.CONFIG})


@dataclass(frozen=True, slots=True)
class Policy:
    """How one step is retried."""

    #: Log event of each failure (``<event>`` at warning, or error for a configuration problem).
    event: str
    backoff: Backoff
    #: Transient failures allowed before the last one is raised; None: no bound (until cancelled).
    attempts: int | None = None
    retry_on: frozenset[Retry] = TRANSIENT_OR_CONFIG
    #: Transient failures are expected (metadata still spreading): logged at debug, not warning.
    quiet: bool = False


#: Where a configuration problem shows in :class:`Health`: a component, or the error's component.
Component = str | Callable[[ForwarderError], str | None] | None
#: Runs before each wait: may act (replace a failed client, count a metric) and return more
#: fields for the failure's log line.
BeforeRetry = Callable[[ForwarderError, int], Awaitable[Mapping[str, Any] | None]]


async def retry(
    step: Callable[[], Awaitable[T]],
    policy: Policy,
    *,
    health: Health | None = None,
    component: Component = None,
    before_retry: BeforeRetry | None = None,
    logger: Any = log,
) -> T:
    """Run ``step`` until it returns, retrying the failures ``policy`` retries.

    Raises the last error once ``policy.attempts`` transient failures are spent, and any error
    whose kind the policy does not retry.  After failures, a success logs ``retry_recovered``
    and clears the configuration problems it had reported.
    """
    failures = transient = 0
    failed_in: set[str] = set()
    while True:
        try:
            result = await step()
        except ForwarderError as exc:
            if exc.retry not in policy.retry_on:
                raise
            failures += 1
            config = exc.retry is Retry.CONFIG
            if not config:
                transient += 1
                if policy.attempts is not None and transient >= policy.attempts:
                    raise
            more = await before_retry(exc, failures) if before_retry is not None else None
            delay = policy.backoff.delay(failures, getattr(exc, "retry_after", None))
            where = component(exc) if callable(component) else component
            if config and health is not None and where is not None:
                health.fail(where, str(exc))
                failed_in.add(where)
            emit = logger.error if config else logger.debug if policy.quiet else logger.warning
            emit(
                policy.event,
                error=str(exc),
                code=exc.code,
                kind=exc.retry.value,
                failures=failures,
                retry_in=round(delay, 3),
                **(more or {}),
            )
            await asyncio.sleep(delay)
            continue
        if failures and not (policy.quiet and not failed_in):
            logger.info("retry_recovered", after=policy.event, failures=failures)
            for where in failed_in:
                assert health is not None  # only ever added with a health
                health.clear(where)
        return result
