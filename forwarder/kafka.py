"""Kafka access in one small module: every client is built here, and every aiokafka error is
translated here.

:func:`kafka_errors` is the one translation: aiokafka errors become
:class:`forwarder.errors.KafkaError` with aiokafka's own ``retriable`` flag (``ProducerFenced``
becomes :class:`forwarder.errors.Fenced`).  The record batches of the hot path are built in
``publish.py`` on a producer made here.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    InvalidConfigurationError,
    InvalidRequiredAcksError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    PolicyViolationError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedCodecError,
    UnsupportedForMessageFormatError,
)
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.helpers import create_ssl_context

from forwarder.config import Settings
from forwarder.errors import (
    ConfigError,
    Fenced,
    ForwarderError,
    KafkaConfigProblem,
    KafkaError,
    ProducerFailed,
    Retry,
    TopicMissing,
)
from forwarder.oauth import token_provider

_c_murmur2: Callable[[bytes, int], int] | None
try:  # Kafka's murmur2 in C: the same function, about ten times faster than the one below.
    from murmurhash2 import murmurhash2 as _c_murmur2
except ImportError:  # pragma: no cover - a platform without the wheel uses the Python version
    _c_murmur2 = None

#: Room kept for the record batch header, record overhead and headers when sizing a line.
RECORD_OVERHEAD_BYTES = 512


@dataclass(frozen=True, slots=True)
class TopicLimits:
    """Per-topic ``max.message.bytes`` of the two topics that carry result lines."""

    results: int
    dead_letters: int


class _RecentKafkaLog(logging.Handler):
    """The aiokafka log lines of the last minute: a failed login or TLS handshake is only logged
    there, while the error raised says no more than "Unable to bootstrap"."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[tuple[float, str]] = deque(maxlen=50)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic(), record.getMessage()))

    def login_problem(self) -> str | None:
        """What a recent line says went wrong with the login, naming the settings to check."""
        recent = [line for at, line in self.lines if time.monotonic() - at < 60]
        for markers, advice in _LOGIN_PROBLEMS:
            for line in reversed(recent):
                if any(marker in line for marker in markers):
                    return f"{advice} ({line[:300]})"
        return None


_LOGIN_PROBLEMS = [
    (  # raised by forwarder.oauth; first, since it is a SaslAuthenticationFailed too
        ("refused the OAUTHBEARER token",),
        "Kafka refused the login token: check FORWARDER_KAFKA_OAUTH_TOKEN_URL, "
        "FORWARDER_KAFKA_OAUTH_SCOPE and the issuer and audience the brokers expect",
    ),
    (
        ("SaslAuthenticationFailed", "Authentication failed", "SASL authentication"),
        "Kafka refused the login: check FORWARDER_KAFKA_SASL_USERNAME, "
        "FORWARDER_KAFKA_SASL_PASSWORD and FORWARDER_KAFKA_SASL_MECHANISM",
    ),
    (
        ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed"),
        "the brokers' certificate is not trusted, or does not name the broker's host: check "
        "FORWARDER_KAFKA_SSL_CAFILE and FORWARDER_KAFKA_BOOTSTRAP_SERVERS",
    ),
    (
        ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "unexpected eof while reading"),
        "TLS does not match the broker's listener: check FORWARDER_KAFKA_SECURITY_PROTOCOL",
    ),
]
_recent_kafka_log = _RecentKafkaLog()
logging.getLogger("aiokafka").addHandler(_recent_kafka_log)


#: aiokafka errors that no retry can mend: the cluster refuses what this pod is configured to do.
#: They become :class:`KafkaConfigProblem` (``Retry.CONFIG``): the pod is not ready and says why,
#: and the step waits at the backoff cap, never as if the failure were transient.
CONFIG_PROBLEMS: dict[type[AIOKafkaError], str] = {
    MessageSizeTooLargeError: "a record is larger than the topic's max.message.bytes",
    RecordTooLargeError: "a record is larger than the producer may send",
    RecordListTooLargeError: "a record batch is larger than the topic's max.message.bytes",
    TopicAuthorizationFailedError: "an ACL refuses this principal the topic (docs/security.md)",
    GroupAuthorizationFailedError: "an ACL refuses this principal the consumer group",
    ClusterAuthorizationFailedError: "an ACL refuses this principal a cluster operation",
    TransactionalIdAuthorizationFailed: "an ACL refuses this principal its transactional id",
    InvalidTopicError: "the topic name is invalid",
    PolicyViolationError: "a broker policy refuses the request",
    InvalidConfigurationError: "the broker refuses a configuration",
    InvalidRequiredAcksError: "the broker refuses acks=all",
    UnsupportedCodecError: "the compression codec is not supported",
    UnsupportedForMessageFormatError: "the topic's message format is too old",
}


def translate(exc: BaseException, what: str) -> ForwarderError:
    """An aiokafka error as our :class:`KafkaError`, classified once (see :data:`CONFIG_PROBLEMS`
    and ``errors.Retry``), else keeping aiokafka's ``retriable`` flag; a connection that failed
    because the login or the TLS handshake did is a :class:`ConfigError` naming the settings to
    check (it can never work as configured)."""
    if isinstance(exc, ForwarderError):
        return exc
    for kind, meaning in CONFIG_PROBLEMS.items():
        if isinstance(exc, kind):
            return KafkaConfigProblem(f"{what}: {type(exc).__name__}: {meaning}")
    if isinstance(exc, ProducerFenced):
        return Fenced(f"{what}: another process took over this transactional id")
    if isinstance(exc, OutOfOrderSequenceNumber):
        return ProducerFailed(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, KafkaConnectionError) and (problem := _recent_kafka_log.login_problem()):
        return ConfigError(f"{what}: {problem}")
    # A record that timed out waiting for the broker (an outage longer than the request timeout)
    # is worth sending again once the broker is back, whatever aiokafka's flag says.
    retriable = bool(getattr(exc, "retriable", True)) or isinstance(exc, KafkaTimeoutError)
    return KafkaError(f"{what}: {type(exc).__name__}: {exc}", retriable=retriable)


def translate_send(
    exc: BaseException, what: str, producer: AIOKafkaProducer, topic: str
) -> ForwarderError:
    """:func:`translate` for a record sent to ``topic``: a send that timed out waiting for the
    topic's metadata because the topic does not exist (deleted, never created) is
    :class:`TopicMissing`, not a transient timeout to retry every few seconds for ever."""
    error = translate(exc, what)
    if error.retry is Retry.BACKOFF and topic_absent(producer, topic):
        error = TopicMissing(f"{what}: topic {topic} does not exist (deleted, or never created)")
    if isinstance(error, KafkaError) and error.topic is None:
        error.topic = topic
    return error


def topic_absent(producer: AIOKafkaProducer, topic: str) -> bool:
    """True when the producer's last metadata knows ``topic`` as missing (not merely unfetched)."""
    cluster = producer.client.cluster
    if topic in cluster.unauthorized_topics:
        return False  # refused, not missing: the authorization error says so itself
    return cluster.brokers() != set() and topic not in cluster.topics()


@contextmanager
def kafka_errors(what: str) -> Iterator[None]:
    """Translate aiokafka errors raised inside the block into our :class:`KafkaError` tree."""
    try:
        yield
    except AIOKafkaError as exc:
        raise translate(exc, what) from exc


log = structlog.get_logger("forwarder.kafka")

_MURMUR_SEED = 0x9747B28C


def py_murmur2(data: bytes) -> int:
    """Kafka's murmur2 (Java ``Utils.murmur2``) as an unsigned 32-bit integer, in Python: the
    fallback without the ``murmurhash2`` wheel (one ``struct.unpack_from`` for all words)."""
    length = len(data)
    m = 0x5BD1E995
    h = 0x9747B28C ^ length
    words = length >> 2
    if words:
        for k in struct.unpack_from(f"<{words}I", data):
            k = (k * m) & 0xFFFFFFFF
            h = ((h * m) ^ ((k ^ (k >> 24)) * m)) & 0xFFFFFFFF
    tail = words << 2
    rest = length - tail
    if rest:
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


#: murmur2(data, seed): the compiled one when the wheel is installed, else the Python one.
_hash: Callable[[bytes, int], int] = _c_murmur2 or (lambda data, _seed: py_murmur2(data))


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 as an unsigned 32-bit integer (compiled when the wheel is installed)."""
    return int(_hash(data, _MURMUR_SEED))


def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner for a keyed record: ``toPositive(murmur2(key)) % partitions``
    (one call of the hash per line: this runs for every result line)."""
    return (_hash(key, _MURMUR_SEED) & 0x7FFFFFFF) % partitions


def connection_options(settings: Settings) -> dict[str, Any]:
    """Bootstrap servers and security options shared by every Kafka client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
        "security_protocol": settings.kafka_security_protocol,
        "client_id": settings.kafka_client_id or settings.consumer_group,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        if settings.kafka_sasl_mechanism in ("OAUTHBEARER", "AWS_MSK_IAM"):
            # MSK's IAM login is OAUTHBEARER with a token AWS's signer makes.
            options["sasl_mechanism"] = "OAUTHBEARER"
            options["sasl_oauth_token_provider"] = token_provider(settings)
        else:
            options["sasl_mechanism"] = settings.kafka_sasl_mechanism
            options["sasl_plain_username"] = settings.kafka_sasl_username
            assert settings.kafka_sasl_password is not None  # checked by Settings
            options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    """An admin client (topic checks and creation)."""
    return AIOKafkaAdminClient(
        **connection_options(settings), request_timeout_ms=settings.kafka_request_timeout_ms
    )


def make_reader(settings: Settings) -> AIOKafkaConsumer:
    """A group-less ``read_committed`` consumer for assigned partitions (the state store)."""
    return AIOKafkaConsumer(
        **connection_options(settings),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )


def make_job_writer(settings: Settings) -> AIOKafkaProducer:
    """A small idempotent ``acks=all`` producer for jobs (the ``enqueue`` command)."""
    return AIOKafkaProducer(
        **connection_options(settings),
        acks="all",
        enable_idempotence=True,
        compression_type=_codec(settings),
        request_timeout_ms=settings.kafka_request_timeout_ms,
    )


def _codec(settings: Settings) -> str | None:
    """aiokafka's ``compression_type`` (``None`` for no compression)."""
    codec = settings.kafka_compression_type
    return None if codec == "none" else codec


def make_producer(
    settings: Settings,
    limits: TopicLimits,
    *,
    transactional_id: str | None = None,
) -> AIOKafkaProducer:
    """An idempotent ``acks=all`` producer sized for the topics' limits (transactional if asked)."""
    largest = max(limits.results, limits.dead_letters)
    options: dict[str, Any] = {
        **connection_options(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": settings.kafka_linger_ms,
        # A batch above the topic's limit would be refused whole, sinking its neighbours.
        "max_batch_size": min(settings.kafka_batch_bytes, limits.results - RECORD_OVERHEAD_BYTES),
        "max_request_size": largest + RECORD_OVERHEAD_BYTES,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "compression_type": _codec(settings),
    }
    if transactional_id:
        options["transactional_id"] = transactional_id
        # aiokafka's default (60 s) would let the broker abort a slow batch's transaction.
        options["transaction_timeout_ms"] = settings.kafka_transaction_timeout_ms
    return AIOKafkaProducer(**options)


def make_jobs_consumer(settings: Settings, **overrides: Any) -> AIOKafkaConsumer:
    """The workers' consumer: manual commits, read_committed, cooperative with other pods."""
    options: dict[str, Any] = {
        **connection_options(settings),
        "group_id": settings.consumer_group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_records": settings.concurrency * 4,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": max(settings.kafka_session_timeout_ms // 3, 1000),
        # Static membership: a pod restarted within the session timeout keeps its partitions.
        "group_instance_id": settings.kafka_group_instance_id,
        **overrides,
    }
    return AIOKafkaConsumer(settings.jobs_topic, **options)
