"""``forwarder check``: what a platform team runs in its first minute, before ``serve``.

One line per check, ``ok|FAIL|warn  <check>  <detail>``: the settings and their files, the Kafka
login, each topic (it exists, or could be created), the ACLs docs/security.md lists (probed
without writing a record: Describe through the metadata, DescribeConfigs on the line topics, the
group's coordinator, an idempotent or transactional producer id), the topics' configs against what
start-up needs, and the Datagrid key (one authenticated GET).

It only reads: a missing topic is probed with a ``validate_only`` CreateTopics request, never
created. Every network step is bounded by ``--timeout``, so an unreachable broker or Datagrid is a
FAIL line within seconds, not a hang. Secrets never reach a line (each detail is redacted too).

The checks are data, in ``checks.py``: :data:`~forwarder.checks.KAFKA_CHECKS` and
:data:`~forwarder.checks.OTHER_CHECKS` are lists of small async functions; this module runs them
and prints the report.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict

from forwarder.checks import (
    DEFAULT_TIMEOUT,
    KAFKA_CHECKS,
    OTHER_CHECKS,
    Check,
    CheckFailed,
    Probe,
    Result,
    Status,
    kafka_login,
)
from forwarder.config import Settings
from forwarder.environment import load_settings
from forwarder.errors import ConfigError, ForwarderError
from forwarder.observability import Redactor, configure_logging

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# --- running -------------------------------------------------------------------------------------


def check_settings() -> tuple[Settings | None, list[Result]]:
    """The settings load (unknown variables refused), their files parse, the key is set."""
    try:
        settings = load_settings()
        settings.check_files()
        settings.require_api_key()
    except ConfigError as exc:
        return None, [Result(Status.FAIL, "settings", str(exc))]
    results = [
        Result(Status.OK, "settings", f"valid; delivery {settings.delivery.value}, files readable")
    ]
    if not settings.webhook_secrets:
        results.append(
            Result(
                Status.WARN,
                "settings",
                "FORWARDER_WEBHOOK_SECRETS is not set: `forwarder serve` refuses to start "
                "without it (`forward` and `enqueue` do not need it)",
            )
        )
    return settings, results


async def _run(check: Check, probe: Probe, name: str) -> list[Result]:
    try:
        return await check(probe)
    except CheckFailed as exc:
        return [Result(Status.FAIL, name, str(exc))]
    except ForwarderError as exc:  # a setting only a check finds (say, the key's characters)
        return [Result(Status.FAIL, name, str(exc))]


async def run_checks(settings: Settings, step_seconds: float = DEFAULT_TIMEOUT) -> list[Result]:
    """Every check against ``settings``' Kafka and Datagrid, in order, each network step bounded
    by ``step_seconds``."""
    probe = Probe(settings, step_seconds)
    results = await _run(kafka_login, probe, "kafka")
    try:
        if probe.admin is None:
            results[-1] = Result(
                Status.FAIL,
                "kafka",
                results[-1].detail + " (the topic, ACL and config checks did not run)",
            )
        else:
            for check in KAFKA_CHECKS:
                results += await _run(check, probe, _name(check))
    finally:
        if probe.admin is not None:
            await probe.admin.close()
    for check in OTHER_CHECKS:
        results += await _run(check, probe, _name(check))
    return results


def _name(check: Check) -> str:
    """The line name of a check that failed before it could say more: its function's name."""
    return getattr(check, "__name__", "check").replace("_", " ")


def report(results: list[Result], output: str, redactor: Redactor | None = None) -> str:
    """The text (one aligned line per check) or JSON report, secrets redacted."""
    scrub = redactor or Redactor([])
    if output == "json":
        return json.dumps(
            {
                "ok": all(r.status is not Status.FAIL for r in results),
                "checks": [scrub.scrub(asdict(r)) for r in results],
            },
            indent=2,
        )
    width = max((len(r.check) for r in results), default=0)
    return "\n".join(
        scrub(f"{r.status.label:<4}  {r.check:<{width}}  {r.detail}").rstrip() for r in results
    )


def main(output: str = "text", timeout: float = DEFAULT_TIMEOUT) -> int:
    """``forwarder check``: print the report; 0 when nothing failed, 1 when a check failed, 2
    when a setting is bad (as the other commands)."""
    settings, results = check_settings()
    if settings is None:
        print(report(results, output))
        return EXIT_USAGE
    redactor = Redactor.for_settings(settings)
    # stdout carries the report only; the Kafka library's own complaints go to stderr.
    configure_logging(settings.log_format, settings.log_level, stream=sys.stderr, redactor=redactor)
    results += asyncio.run(run_checks(settings, timeout))
    print(report(results, output, redactor))
    return EXIT_FAILED if any(r.status is Status.FAIL for r in results) else EXIT_OK
