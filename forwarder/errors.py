"""One error tree for the forwarder; retry policy reads :attr:`ForwarderError.retriable`.

::

    ForwarderError
    ├── ConfigError              bad setting; start-up stops
    ├── InvalidBatchId           refused before any URL is built
    ├── UpstreamError            Datagrid answered badly or not at all
    │   ├── UpstreamUnavailable  429, 408, 5xx, timeouts, broken streams   (retriable)
    │   ├── BatchNotReady        batch not terminal yet (409 or its status) (retriable, later)
    │   └── UpstreamRejected     401, 403, 404, 410, 422, other 4xx        (permanent)
    └── KafkaError               the broker refused or could not be reached (retriable per cause)
        ├── TopicMissing         a topic does not exist and may not be created
        └── Fenced               another process took over our transactional id (exactly-once)

Third-party exceptions (httpx, aiokafka) are translated where they are caught, with ``from exc``.
"""

from __future__ import annotations

from typing import Any


class ForwarderError(Exception):
    """Base of every error the forwarder raises on purpose."""

    retriable: bool = False
    #: Short machine-readable code, used in problem details and the batch state record.
    code: str = "forwarder_error"


class ConfigError(ForwarderError):
    """A setting is missing or invalid; the message names the variable."""

    code = "config_error"


class InvalidBatchId(ForwarderError):
    """A batch id with characters or a length that may not reach a URL."""

    code = "invalid_batch_id"


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

    retriable = True
    code = "upstream_unavailable"


class BatchNotReady(UpstreamError):
    """The batch is not terminal yet; poll again until it is or until it expires."""

    retriable = True
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

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class TopicMissing(KafkaError):
    """A topic does not exist and ``FORWARDER_KAFKA_CREATE_TOPICS=false`` forbids creating it."""

    code = "topic_missing"

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


class Fenced(KafkaError):
    """Another process took over this transactional id: stop, commit nothing, let it do the work."""

    code = "fenced"

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)
