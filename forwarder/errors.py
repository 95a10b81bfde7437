"""One error tree for the forwarder, and the retry policy as data.

Every error says what to do about it with :attr:`ForwarderError.retry` (a :class:`Retry`), set once
where the error is made or translated (``kafka.translate``, the Datagrid client, job parsing);
``retry.retry`` is the one loop that acts on it, waiting by a :class:`Backoff` (base, cap, jitter).
The three outcomes that matter to an operator:

- *retriable* (``BACKOFF``): bounded attempts, capped jittered backoff, ``Retry-After`` honoured;
- *permanent for this batch* (``NEVER``): the batch's state is ``failed`` with the error's code;
- *permanent for this pod's configuration* (``CONFIG``): a topic missing, a record the topic can
  never take, an authorization refused. Nothing is failed or dropped: the step waits at the backoff
  cap, the pod is not ready (``/readyz`` names the reason), and it resumes once the cause is mended.

::

    ForwarderError
    ├── ConfigError              bad setting; start-up stops
    ├── InvalidBatchId           refused before any URL is built                           (400)
    ├── BadRequest               malformed API request body                                 (400)
    ├── InvalidWebhook           a correctly signed body that is not a usable event         (400)
    ├── Unauthorized             missing or wrong bearer token                              (401)
    ├── SignatureError           missing, malformed, wrong or stale webhook signature       (401)
    ├── NotFound                 no such resource                                           (404)
    ├── InvalidJob               a jobs-topic record that is no job           (logged, skipped)
    ├── UpstreamError            Datagrid answered badly or not at all
    │   ├── UpstreamUnavailable  429, 408, 5xx, timeouts, broken streams   (retriable)
    │   │   ├── StreamDiverged   a re-stream differs from the lines already in Kafka
    │   │   ├── IncompleteStream fewer result lines than request_counts.total
    │   │   ├── TooManyLines     more result lines than the batch can have
    │   │   └── BatchTimeout     past FORWARDER_BATCH_TIMEOUT_SECONDS             (permanent)
    │   ├── BatchNotReady        batch not terminal yet (409 or its status) (retriable, later)
    │   └── UpstreamRejected     401, 403, 404, 410, 422, other 4xx        (permanent)
    └── KafkaError               broker refused or unreachable (retriable per cause)        (503)
        ├── KafkaConfigProblem   the cluster refuses what this pod is set up to do     (config)
        │   └── TopicMissing     a topic does not exist and may not be created
        ├── ProducerFailed       the producer stopped for good: replace it, retry
        └── Fenced               another process took over our transactional id (exactly-once)

Third-party exceptions (httpx, aiokafka) are translated where they are caught, with ``from exc``.
``http_status`` is what the HTTP layer answers for each (``api.problem_response``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Retry(Enum):
    """What a loop does about an error."""

    NEVER = "never"  # permanent: give up now, say why
    BACKOFF = "backoff"  # transient: try again after a capped, jittered delay
    LATER = "later"  # not ready yet: park durably and check again on a timer
    HAND_OFF = "hand_off"  # another process owns the work now: stop, commit nothing
    #: Permanent for this pod's configuration: never as if transient (no attempt is spent, the
    #: wait is the cap), the pod is not ready and says why; the step resumes once it is mended.
    CONFIG = "config"


#: What the forwarder does about an error of each kind (docs/reliability.md's failure policy).
OUTCOMES: dict[Retry, str] = {
    Retry.BACKOFF: "retried after a capped, jittered backoff (Retry-After honoured), a bounded "
    "number of times; then the batch fails, or a Kafka failure keeps its job for later",
    Retry.NEVER: "permanent: never retried in a loop; a batch's state is `failed` with this code, "
    "a request is answered with its HTTP status, a bad setting stops start-up (exit 2)",
    Retry.CONFIG: "permanent for this pod's configuration: nothing fails or is dropped; the step "
    "waits at the backoff cap, `/readyz` is 503 naming the component, "
    "`forwarder_config_problem` is 1, one error log line per wait; resumes once mended",
    Retry.LATER: "not ready: the batch is parked (state `waiting`) and checked again on a timer",
    Retry.HAND_OFF: "another process owns the work: this one stops, commits nothing",
}


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter: the one shape of every wait between tries."""

    base: float
    cap: float
    #: Fraction of each delay taken away at random, so that many waiters do not retry in step.
    jitter: float = 0.5

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try ``attempt + 1``: the server's hint if it gave a sane one,
        else ``base * 2**(attempt-1)``; always finite and at most ``cap``."""
        if retry_after is not None and math.isfinite(retry_after):
            return min(max(retry_after, 0.0), self.cap)
        ceiling = min(self.cap, self.base * 2.0 ** min(max(attempt - 1, 0), 60))
        return ceiling * random.uniform(1.0 - self.jitter, 1.0)  # noqa: S311 - jitter, not crypto


#: Waits while Kafka itself is failing (jobs, state store, start-up).
KAFKA_BACKOFF = Backoff(base=1.0, cap=30.0)


class ForwarderError(Exception):
    """Base of every error the forwarder raises on purpose."""

    retry: Retry = Retry.NEVER
    #: Short machine-readable code, used in problem details and the batch state record.
    code: str = "forwarder_error"
    #: HTTP status of the problem+json answer when this error ends a request.
    http_status: int = 500

    @property
    def retriable(self) -> bool:
        """True when trying again (now or later) may succeed."""
        return self.retry in (Retry.BACKOFF, Retry.LATER)


class ConfigError(ForwarderError):
    """A setting is missing or invalid; the message names the variable."""

    code = "config_error"


class InvalidJob(ForwarderError):
    """A jobs-topic record that is no job (undecodable, too deep, fields too long, a bad id)."""

    code = "invalid_job"


class InvalidBatchId(ForwarderError):
    """A batch id with characters or a length that may not reach a URL."""

    code = "invalid_batch_id"
    http_status = 400


class BadRequest(ForwarderError):
    """Malformed request body."""

    code = "bad_request"
    http_status = 400


class InvalidWebhook(ForwarderError):
    """A correctly signed webhook body that is not a usable event."""

    code = "invalid_webhook"
    http_status = 400


class Unauthorized(ForwarderError):
    """Missing or wrong bearer token."""

    code = "unauthorized"
    http_status = 401


class SignatureError(ForwarderError):
    """Missing, malformed, wrong or stale webhook signature."""

    code = "bad_signature"
    http_status = 401


class NotFound(ForwarderError):
    """No such resource."""

    code = "not_found"
    http_status = 404


class UpstreamError(ForwarderError):
    """Datagrid answered with an error, or the transport to it failed."""

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    """A transient upstream failure: worth retrying with backoff."""

    retry = Retry.BACKOFF
    code = "upstream_unavailable"


class StreamDiverged(UpstreamUnavailable):
    """A re-stream did not start with the lines already acknowledged: start over from line 1."""


class IncompleteStream(UpstreamUnavailable):
    """The stream ended with fewer result lines than the batch's ``request_counts.total``."""

    code = "incomplete"


class TooManyLines(UpstreamUnavailable):
    """The stream holds more lines than the batch can have."""

    code = "too_many_lines"


class BatchTimeout(UpstreamUnavailable):
    """The batch did not finish within ``FORWARDER_BATCH_TIMEOUT_SECONDS``."""

    code = "batch_timeout"
    retry = Retry.NEVER


class BatchNotReady(UpstreamError):
    """The batch is not terminal yet; poll again until it is or until it expires."""

    retry = Retry.LATER
    code = "batch_not_ready"

    def __init__(self, message: str, *, batch_status: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.batch_status = batch_status


class UpstreamRejected(UpstreamError):
    """A permanent upstream refusal (auth, missing, gone, invalid): never retried in a loop."""

    code = "upstream_rejected"


class KafkaError(ForwarderError):
    """Kafka could not take a record or answer a request."""

    code = "kafka_error"
    http_status = 503

    def __init__(self, message: str, *, retriable: bool = True, topic: str | None = None) -> None:
        super().__init__(message)
        self.retry = Retry.BACKOFF if retriable else Retry.NEVER
        #: The topic the failed request was for, when one was (to say which one is unwritable).
        self.topic = topic


class KafkaConfigProblem(KafkaError):
    """The cluster refuses what this pod is configured to do: a record larger than the topic
    takes, an authorization refused, a topic missing or invalid. Retrying soon cannot help; the
    pod is not ready until someone mends it (``Retry.CONFIG``)."""

    code = "kafka_config"

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        super().__init__(message, retriable=False, topic=topic)
        self.retry = Retry.CONFIG


class TopicMissing(KafkaConfigProblem):
    """A topic does not exist and ``FORWARDER_KAFKA_CREATE_TOPICS=false`` forbids creating it."""

    code = "topic_missing"


class ProducerFailed(KafkaError):
    """The producer stopped for good (aiokafka's sender ends at OUT_OF_ORDER_SEQUENCE_NUMBER,
    which a broker restart that lost the producer's state causes): replace it, then retry."""

    code = "producer_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=True)


class Fenced(KafkaError):
    """Another process took over this transactional id: stop, commit nothing, let it do the work."""

    code = "fenced"

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)
        self.retry = Retry.HAND_OFF
