"""Metrics and logs, configured in one place.

Metric names in the first block are fixed by the product contract (docs/reference.md).
Collectors are created on an injected :class:`CollectorRegistry`; label values come from closed
sets only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

if TYPE_CHECKING:
    from forwarder.config import Settings

LINE_STATUSES = ("succeeded", "errored", "canceled", "expired")
DEAD_LETTER_REASONS = (
    "invalid_json",
    "not_an_object",
    "missing_custom_id",
    "batch_id_mismatch",
    "too_large",
)

_DELAY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WEBHOOK_OUTCOMES = (
    "accepted",
    "ignored",
    "duplicate",
    "bad_signature",
    "invalid",
    "unavailable",  # refused 503: Kafka unreachable (Datagrid retries; a lost retry loses a batch)
    "too_large",  # refused 413
)

#: ``forwarder_batches_total`` outcomes; ``foreign``: a job queued by another deployment, skipped.
BATCH_OUTCOMES = ("forwarded", "failed", "duplicate", "invalid", "foreign")
#: Components whose configuration problems ``/readyz`` reports (``health.Health``).
HEALTH_COMPONENTS = ("results_topic", "dead_letter_topic", "state_topic", "jobs_topic")
#: Datagrid statuses counted by their own label (those its docs name); any other status is
#: counted by its class (``4xx``, ``5xx``...), so a hostile upstream cannot grow the series.
UPSTREAM_CODES = frozenset(
    {"200", "400", "401", "403", "404", "408", "409", "410", "413", "422", "429"}
    | {"500", "502", "503", "504", "error"}
)


def upstream_code_label(code: str) -> str:
    """The ``code`` label of ``forwarder_upstream_requests_total``: a closed set."""
    if code in UPSTREAM_CODES:
        return code
    return f"{code[0]}xx" if len(code) == 3 and code.isdigit() and code[0] in "12345" else "other"


def line_status_label(status: object) -> str:
    """The metric label for a line's ``status``: one of the known four, else ``other``."""
    return status if isinstance(status, str) and status in LINE_STATUSES else "other"


class Metrics:
    """Every collector of the service, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        # --- contract metrics (names fixed) ---
        self.lines_forwarded = Counter(
            "forwarder_lines_forwarded",
            "Lines acknowledged by Kafka on the results topic, by the line's status.",
            ["status"],
            registry=r,
        )
        self.dead_letters = Counter(
            "forwarder_dead_letters",
            "Lines sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.batches = Counter(
            "forwarder_batches",
            "Batches finished, by outcome (forwarded, failed, duplicate).",
            ["outcome"],
            registry=r,
        )
        self.webhooks = Counter(
            "forwarder_webhooks",
            "Webhook deliveries, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "forwarder_upstream_requests",
            "Datagrid responses by HTTP status code, or 'error' for transport failures.",
            ["code"],
            registry=r,
        )
        self.jobs_lag = Gauge(
            "forwarder_jobs_lag",
            "Jobs-topic consumer lag in messages, per assigned partition.",
            ["partition"],
            registry=r,
        )
        self.forward_delay = Histogram(
            "forwarder_forward_delay_seconds",
            "Seconds from the batch's terminal time to its last line acknowledged.",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "forwarder_batch_duration_seconds",
            "One batch's stream-and-publish time in seconds.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        # --- operational metrics ---
        self.blank_lines = Counter(
            "forwarder_blank_lines",
            "Empty or whitespace-only lines skipped.",
            registry=r,
        )
        self.jobs_lag_seconds = Gauge(
            "forwarder_jobs_lag_seconds",
            "Age in seconds of the oldest job not yet finished (0 when idle).",
            registry=r,
        )
        self.batches_in_flight = Gauge(
            "forwarder_batches_in_flight",
            "Batches being forwarded now.",
            registry=r,
        )
        self.batches_waiting = Gauge(
            "forwarder_batches_waiting",
            "Batches waiting for Datagrid to finish them (not terminal yet).",
            registry=r,
        )
        self.upstream_latency = Histogram(
            "forwarder_upstream_request_duration_seconds",
            "Seconds until Datagrid's response headers arrived.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.produce_latency = Histogram(
            "forwarder_produce_duration_seconds",
            "Seconds from handing a record to the producer to its acknowledgement (sampled).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "forwarder_retries",
            "Batch attempts retried, by the kind of failure.",
            ["reason"],
            registry=r,
        )
        self.stream_restarts = Counter(
            "forwarder_stream_restarts",
            "Results streams restarted after breaking midway.",
            registry=r,
        )
        self.ready = Gauge(
            "forwarder_ready",
            "1 when /readyz answers ready.",
            registry=r,
        )
        self.state_batches = Gauge(
            "forwarder_state_batches",
            "Batch states held in memory by this process.",
            registry=r,
        )
        self.http_requests = Counter(
            "forwarder_http_requests",
            "HTTP requests served, by route template, method and status code.",
            ["route", "method", "code"],
            registry=r,
        )
        self.http_duration = Histogram(
            "forwarder_http_request_duration_seconds",
            "HTTP request time in seconds, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.build_info = Gauge(
            "forwarder_build_info",
            "Always 1; the labels say which build runs.",
            ["version", "revision"],
            registry=r,
        )
        self.reconcile_runs = Counter(
            "forwarder_reconcile_runs",
            "Reconciler passes over Datagrid's batch list, by outcome (ok, failed).",
            ["outcome"],
            registry=r,
        )
        self.reconcile_batches = Counter(
            "forwarder_reconcile_batches",
            "Terminal batches the reconciler found never forwarded, and queued.",
            registry=r,
        )
        self.config_problems = Gauge(
            "forwarder_config_problem",
            "1 while a step fails for a reason of this pod's configuration (a topic missing or "
            "refusing records, an authorization refused), by component; the pod is not ready.",
            ["component"],
            registry=r,
        )
        self.job_commits = Counter(
            "forwarder_job_commits",
            "Jobs-topic offset commits, by how: in a batch's transaction (exactly-once) or by the "
            "consumer.",
            ["via"],
            registry=r,
        )
        self.internal_errors = Counter(
            "forwarder_internal_errors",
            "Exceptions no code handled (a task that died, a bug): always worth a look.",
            ["where"],
            registry=r,
        )
        self.ratelimit_wait = Counter(
            "forwarder_upstream_ratelimit_wait_seconds",
            "Seconds spent waiting on the client-side Datagrid rate limiter.",
            registry=r,
        )

        # Closed label sets start at 0: dashboards show 0 rather than nothing, and increase()
        # sees the first failure after a restart.
        closed: list[tuple[Any, str, Iterable[str]]] = [
            (self.lines_forwarded, "status", LINE_STATUSES),
            (self.dead_letters, "reason", DEAD_LETTER_REASONS),
            (self.batches, "outcome", BATCH_OUTCOMES),
            (self.config_problems, "component", HEALTH_COMPONENTS),
            (self.internal_errors, "where", ("task", "job")),
            (self.job_commits, "via", ("transaction", "consumer")),
            (self.webhooks, "outcome", WEBHOOK_OUTCOMES),
            (self.reconcile_runs, "outcome", ("ok", "failed")),
            (self.retries, "reason", ("stream_broken", "upstream_unavailable", "kafka_error")),
        ]
        for collector, label, values in closed:
            for value in values:
                collector.labels(**{label: value})

    def on_upstream_response(self, code: str, seconds: float) -> None:
        """Hook for the Datagrid client: count the response and time it."""
        self.upstream_requests.labels(code=upstream_code_label(code)).inc()
        self.upstream_latency.observe(seconds)


class Redactor:
    """Replaces every configured secret in text (or in the strings of a JSON-like value) with
    ``[redacted]``: the second line of defence, after secrets are kept out of messages at all."""

    MASK = "[redacted]"

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    @classmethod
    def for_settings(cls, settings: Settings) -> Redactor:
        """A redactor of ``settings``' secrets."""
        return cls(settings.secret_values())

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, self.MASK)
        return text

    def scrub(self, value: Any) -> Any:
        """``value`` with every secret replaced in its strings (dicts and lists walked)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {key: self.scrub(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(item) for item in value]
        return value

    def processor(self, _logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        """structlog processor: scrub every field of a log event."""
        if not self._secrets:
            return event
        return {key: self.scrub(item) for key, item in event.items()}


def configure_logging(
    log_format: str = "json",
    level: str = "INFO",
    stream: TextIO | None = None,
    redactor: Redactor | None = None,
) -> None:
    """Configure structlog and stdlib logging once: one JSON object per line on stdout.

    Third-party loggers (uvicorn, aiokafka, httpx) go through the same renderer; noisy ones are
    clamped to WARNING.  ``console`` colours only a terminal.  Every configured secret is scrubbed
    from every event (``redactor``).
    """
    out = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(out))
    else:
        renderer = structlog.processors.JSONRenderer()
    # Tracebacks become text before the redactor runs, so that they are scrubbed too.
    shared.append(structlog.processors.format_exc_info)
    if redactor is not None:
        shared.append(redactor.processor)
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("aiokafka", "kafka", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
