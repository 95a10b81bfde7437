"""Kafka access in one small module: every client is built here, and every aiokafka error is
translated here.

:func:`kafka_errors` is the one translation: aiokafka errors become
:class:`forwarder.errors.KafkaError` with aiokafka's own ``retriable`` flag (``ProducerFenced``
becomes :class:`forwarder.errors.Fenced`).  The record batches of the hot path are built in
``publish.py`` on a producer made here.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
)
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.helpers import create_ssl_context

from forwarder.config import Settings
from forwarder.errors import (
    ConfigError,
    Fenced,
    ForwarderError,
    KafkaError,
    ProducerFailed,
    TopicMissing,
)
from forwarder.oauth import token_provider

_c_murmur2: Callable[[bytes, int], int] | None
try:  # Kafka's murmur2 in C: the same function, about ten times faster than the one below.
    from murmurhash2 import murmurhash2 as _c_murmur2
except ImportError:  # pragma: no cover - a platform without the wheel uses the Python version
    _c_murmur2 = None

#: Broker default ``message.max.bytes`` (and topic ``max.message.bytes``), used when unreadable.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
_UNKNOWN_TOPIC = 3  # Kafka's UNKNOWN_TOPIC_OR_PARTITION
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


def translate(exc: BaseException, what: str) -> ForwarderError:
    """An aiokafka error as our :class:`KafkaError`, keeping its ``retriable`` flag; a connection
    that failed because the login or the TLS handshake did is a :class:`ConfigError` naming the
    settings to check (it can never work as configured)."""
    if isinstance(exc, ForwarderError):
        return exc
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
        "client_id": "datagrid-forwarder",
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


def topic_specs(settings: Settings) -> dict[str, dict[str, str]]:
    """The forwarder's topics and the configs it creates them with."""
    return {
        settings.results_topic: {},
        settings.dead_letter_topic: {},
        settings.jobs_topic: {},
        # Compacted: the latest state per batch id is the memory of what was forwarded; deleted
        # past the retention, so the topic does not grow for ever (a waiting batch's record is
        # rewritten at every check, so it stays young).
        settings.state_topic: {
            "cleanup.policy": "compact,delete",
            "retention.ms": str(int(settings.state_retention_hours * 3_600_000)),
            "min.compaction.lag.ms": "60000",
        },
    }


async def prepare_topics(settings: Settings) -> TopicLimits:
    """Create missing topics (or refuse, naming them) and read the line topics' size limits."""
    admin = make_admin(settings)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        specs = topic_specs(settings)
        missing = [name for name in specs if name not in existing]
        if missing and not settings.kafka_create_topics:
            raise TopicMissing(
                f"topic(s) {', '.join(missing)} do not exist and "
                "FORWARDER_KAFKA_CREATE_TOPICS=false; create them or allow creation"
            )
        if missing:
            replication = settings.kafka_replication_factor
            if replication == -1:
                # aiokafka cannot ask for the broker's default; 3 is the usual production choice.
                brokers = (await admin.describe_cluster())["brokers"]
                replication = min(3, len(brokers))
            partitions = dict.fromkeys(missing, settings.kafka_topic_partitions)
            # The state topic is co-partitioned with the jobs topic: one created alone takes the
            # other's partition count.
            pair = (settings.jobs_topic, settings.state_topic)
            for topic, other in (pair, pair[::-1]):
                if topic in missing and other not in missing:
                    partitions[topic] = len(await _partition_numbers(admin, other))
            new = [
                NewTopic(
                    name,
                    num_partitions=partitions[name],
                    replication_factor=replication,
                    topic_configs=specs[name],
                )
                for name in missing
            ]
            response = await admin.create_topics(new, timeout_ms=30_000)
            _check_created(response)
        policy = None
        with contextlib.suppress(KafkaError):  # DescribeConfigs on the state topic is optional
            policy = await _topic_config(admin, settings.state_topic, "cleanup.policy")
        if settings.state_topic in existing and policy is not None and "delete" not in policy:
            log.warning(
                "state_topic_unbounded",
                topic=settings.state_topic,
                cleanup_policy=policy,
                hint="set cleanup.policy=compact,delete and retention.ms, or it grows for ever",
            )
        return TopicLimits(
            results=await _max_message_bytes(admin, settings.results_topic),
            dead_letters=await _max_message_bytes(admin, settings.dead_letter_topic),
        )
    except AIOKafkaError as exc:
        raise translate(exc, "preparing topics") from exc
    finally:
        await admin.close()


def _check_created(response: Any) -> None:
    # error code 36 = TOPIC_ALREADY_EXISTS: another pod won the race, which is fine.
    for topic, code, *rest in response.topic_errors:
        if code not in (0, 36):
            message = rest[0] if rest else ""
            raise KafkaError(f"creating topic {topic}: error {code} {message}", retriable=False)


async def _topic_config(admin: AIOKafkaAdminClient, topic: str, name: str) -> str | None:
    """A topic's config value; refused (DescribeConfigs not granted) is an error, never a guess."""
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    for response in responses:
        for resource in response.resources:
            error_code, message = resource[0], resource[1]
            if error_code == _UNKNOWN_TOPIC:  # just created: its metadata is still spreading
                raise KafkaError(f"topic {topic} is not known to every broker yet")
            if error_code:
                raise KafkaError(
                    f"reading the configs of topic {topic} failed (error {error_code}"
                    f"{': ' + message if message else ''}): the forwarder needs DescribeConfigs on "
                    "it to size its records (see docs/security.md)",
                    retriable=False,
                )
            for entry in resource[4]:
                if entry[0] == name:
                    return str(entry[1])
    return None


async def _max_message_bytes(admin: AIOKafkaAdminClient, topic: str) -> int:
    attempt = 0
    while True:
        attempt += 1
        try:
            value = await _topic_config(admin, topic, "max.message.bytes")
        except KafkaError as exc:
            if not exc.retriable or attempt >= 20:
                raise
            await asyncio.sleep(0.25)  # a topic created a moment ago: give it 5 s
            continue
        return int(value) if value is not None else DEFAULT_MAX_MESSAGE_BYTES


async def topic_partitions(source: Settings | dict[str, Any], topic: str) -> list[int]:
    """Partition numbers of ``topic`` (empty if it does not exist); ``source`` is the settings or
    a client's options."""
    options = connection_options(source) if isinstance(source, Settings) else source
    admin = AIOKafkaAdminClient(**options)
    try:
        with kafka_errors(f"describing {topic}"):
            await admin.start()
            return await _partition_numbers(admin, topic)
    finally:
        await admin.close()


async def _partition_numbers(admin: AIOKafkaAdminClient, topic: str) -> list[int]:
    described = await admin.describe_topics([topic])
    for entry in described:
        if entry["topic"] == topic and entry["error_code"] == 0:
            return sorted(p["partition"] for p in entry["partitions"])
    return []


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    """An admin client (topic checks and creation)."""
    return AIOKafkaAdminClient(**connection_options(settings), request_timeout_ms=30_000)


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
    return AIOKafkaProducer(**connection_options(settings), acks="all", enable_idempotence=True)


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
        "request_timeout_ms": 30_000,
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
