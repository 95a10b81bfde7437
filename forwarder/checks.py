"""The checks ``forwarder check`` runs, as data, and what they share.

Each check is a small async function of a :class:`Probe` (the settings, the open admin client,
what earlier checks learnt) returning :class:`Result` lines: :data:`KAFKA_CHECKS` need the Kafka
login, :data:`OTHER_CHECKS` do not, and :data:`TOPIC_CONFIG_RULES` are pure functions over the
existing topics' configs. Running them and printing the report is ``check.py``'s.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import for_code

from forwarder.config import Delivery, Settings
from forwarder.datagrid import DatagridClient
from forwarder.errors import Backoff, ForwarderError, Retry
from forwarder.kafka import (
    RECORD_OVERHEAD_BYTES,
    TopicLimits,
    connection_options,
    kafka_errors,
    make_job_writer,
    make_producer,
    translate,
)
from forwarder.observability import Metrics
from forwarder.retry import Policy, retry
from forwarder.topics import DEFAULT_MAX_MESSAGE_BYTES, topic_config_warnings, topic_specs

DEFAULT_TIMEOUT = 10.0
_T = TypeVar("_T")


class Status(StrEnum):
    """The outcome of one check."""

    OK = "ok"
    WARN = "warn"  # works, but not as well as it could (said why)
    FAIL = "fail"  # start-up or the work would fail

    @property
    def label(self) -> str:
        """How the text output shows it (a failure stands out)."""
        return "FAIL" if self is Status.FAIL else self.value


@dataclass(frozen=True, slots=True)
class Result:
    """One line of the report."""

    status: Status
    check: str
    detail: str


class CheckFailed(Exception):
    """A check's step failed; the message is its FAIL line's detail."""


@dataclass
class Probe:
    """What the checks share: the settings, the open admin client and what it learnt."""

    settings: Settings
    timeout: float
    admin: AIOKafkaAdminClient | None = None
    brokers: int = 0
    #: Topics that exist and this principal may describe, by name: their partition count.
    partitions: dict[str, int] = field(default_factory=dict)
    #: The same topics' replication factors.
    replication: dict[str, int] = field(default_factory=dict)
    #: Existing topics' configs, or the refusal to read them.
    configs: dict[str, dict[str, str] | str] = field(default_factory=dict)

    async def step(self, awaitable: Awaitable[_T], what: str) -> _T:
        """``awaitable`` within the timeout; aiokafka's errors translated (login problems named)."""
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except TimeoutError:
            raise CheckFailed(f"{what}: no answer within {self.timeout:g} s") from None
        except AIOKafkaError as exc:
            raise CheckFailed(str(translate(exc, what))) from exc
        except ForwarderError as exc:
            raise CheckFailed(str(exc)) from exc


Check = Callable[[Probe], Awaitable[list[Result]]]
#: A rule over the configs of the existing topics whose configs could be read.
TopicConfigRule = Callable[[Settings, dict[str, dict[str, str]]], list[Result]]


# --- Kafka ---------------------------------------------------------------------------------------


async def kafka_login(probe: Probe) -> list[Result]:
    """Reach the brokers and log in; the other Kafka checks use this connection."""
    settings = probe.settings
    admin = AIOKafkaAdminClient(
        **connection_options(settings), request_timeout_ms=int(probe.timeout * 1000)
    )
    try:
        await probe.step(admin.start(), f"connecting to {settings.kafka_bootstrap_servers}")
        cluster = await probe.step(admin.describe_cluster(), "describing the cluster")
    except CheckFailed:
        await admin.close()
        raise
    probe.admin = admin
    probe.brokers = len(cluster["brokers"])
    who: str = settings.kafka_security_protocol
    if settings.kafka_security_protocol.startswith("SASL"):
        who += f" {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username}"
    elif settings.kafka_ssl_certfile:
        who += " with a client certificate"
    return [
        Result(
            Status.OK,
            "kafka",
            f"{settings.kafka_bootstrap_servers} ({who}): {probe.brokers} broker(s)",
        )
    ]


async def topics(probe: Probe) -> list[Result]:
    """Each topic exists (and may be described), or could be created at start."""
    assert probe.admin is not None
    settings = probe.settings
    specs = topic_specs(settings)
    # list_topics names only what this principal may describe, and never creates anything
    # (describing a missing topic by name could, where the broker auto-creates topics).
    visible = set(await probe.step(probe.admin.list_topics(), "listing topics"))
    existing = [name for name in specs if name in visible]
    if existing:
        described = await probe.step(probe.admin.describe_topics(existing), "describing topics")
        for entry in described:
            if entry["error_code"] == 0:
                probe.partitions[entry["topic"]] = len(entry["partitions"])
                replicas = [len(p["replicas"]) for p in entry["partitions"]]
                probe.replication[entry["topic"]] = min(replicas, default=1)
    results = []
    missing = [name for name in specs if name not in probe.partitions]
    for name in probe.partitions:
        count = probe.partitions[name]
        results.append(Result(Status.OK, f"topic {name}", f"exists: {count} partitions"))
    if missing and not settings.kafka_create_topics:
        for name in missing:
            results.append(
                Result(
                    Status.FAIL,
                    f"topic {name}",
                    "missing and FORWARDER_KAFKA_CREATE_TOPICS=false: create it, or allow "
                    "creation (a topic this principal may not Describe looks missing too: see "
                    "docs/security.md)",
                )
            )
    elif missing:
        results += await _would_create(probe, missing, specs)
    return results


async def _would_create(
    probe: Probe, missing: list[str], specs: dict[str, dict[str, str]]
) -> list[Result]:
    """Ask the controller whether it would create ``missing`` as start-up would (validate_only:
    authorisation, replication and configs are checked, nothing is created)."""
    assert probe.admin is not None
    settings = probe.settings
    replication = settings.kafka_replication_factor
    if replication == -1:
        replication = min(3, probe.brokers)
    partitions = dict.fromkeys(missing, settings.kafka_topic_partitions)
    # As prepare_topics does: the state and jobs topics are co-partitioned.
    pair = (settings.jobs_topic, settings.state_topic)
    for topic, other in (pair, pair[::-1]):
        if topic in missing and other in probe.partitions:
            partitions[topic] = probe.partitions[other]
    new = [NewTopic(n, partitions[n], replication, topic_configs=specs[n]) for n in missing]
    response = await probe.step(
        probe.admin.create_topics(new, validate_only=True), "validating topic creation"
    )
    results = []
    for topic, code, *rest in response.topic_errors:
        if code == 0:
            detail = (
                f"missing: would be created at start ({partitions[topic]} partitions, "
                f"replication {replication})"
            )
            results.append(Result(Status.OK, f"topic {topic}", detail))
            continue
        message = rest[0] if rest and rest[0] else ""
        reason = f"{for_code(code).__name__}{': ' + message if message else ''}"
        hint = ""
        if code == 29:  # TOPIC_AUTHORIZATION_FAILED
            hint = ": grant Create on it, or create it beforehand (docs/security.md)"
        elif code == 36:  # TOPIC_ALREADY_EXISTS, but not listed: no Describe on it
            hint = ": it exists but this principal may not Describe it (docs/security.md)"
        results.append(
            Result(
                Status.FAIL,
                f"topic {topic}",
                f"missing, and could not be created ({reason}){hint}",
            )
        )
    return results


async def partitions_match(probe: Probe) -> list[Result]:
    """The state topic has as many partitions as the jobs topic (start-up refuses otherwise)."""
    settings = probe.settings
    jobs = probe.partitions.get(settings.jobs_topic)
    state = probe.partitions.get(settings.state_topic)
    if jobs is None or state is None:
        return []  # a missing one is created with the other's count
    if jobs == state:
        return [Result(Status.OK, "partitions", f"jobs and state topics both have {jobs}")]
    return [
        Result(
            Status.FAIL,
            "partitions",
            f"state topic {settings.state_topic} has {state} partitions and jobs topic "
            f"{settings.jobs_topic} has {jobs}: they must be equal (start-up refuses)",
        )
    ]


async def topic_configs(probe: Probe) -> list[Result]:
    """Read the existing topics' configs (DescribeConfigs, granted on the line topics), then
    hold them to :data:`TOPIC_CONFIG_RULES`."""
    assert probe.admin is not None
    settings = probe.settings
    if not probe.partitions:
        return []
    resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in probe.partitions]
    responses = await probe.step(probe.admin.describe_configs(resources), "reading topic configs")
    for response in responses:
        for error_code, message, _type, name, entries, *_ in response.resources:
            if error_code:
                probe.configs[name] = f"{for_code(error_code).__name__}" + (
                    f": {message}" if message else ""
                )
            else:
                probe.configs[name] = {str(e[0]): str(e[1]) for e in entries}
    results = []
    # DescribeConfigs is needed on the line topics only (docs/security.md).
    for topic in (settings.results_topic, settings.dead_letter_topic):
        read = probe.configs.get(topic)
        if isinstance(read, str):
            results.append(
                Result(
                    Status.FAIL,
                    f"acl DescribeConfigs {topic}",
                    f"refused ({read}): the forwarder reads max.message.bytes to size its "
                    "records; grant DescribeConfigs (docs/security.md)",
                )
            )
        elif read is not None:
            results.append(Result(Status.OK, f"acl DescribeConfigs {topic}", "granted"))
    readable = {t: c for t, c in probe.configs.items() if isinstance(c, dict)}
    for rule in TOPIC_CONFIG_RULES:
        results += rule(settings, readable)
    # What weakens the delivery guarantees (the same judgement start-up logs as warnings).
    for weak in topic_config_warnings(settings, readable, probe.replication):
        detail = f"{weak.config}={weak.value}: {weak.problem}"
        results.append(Result(Status.WARN, f"topic config {weak.topic}", detail))
    return results


def state_topic_cleanup(settings: Settings, configs: dict[str, dict[str, str]]) -> list[Result]:
    """The state topic is compacted (the latest state per batch) and deleted past retention."""
    topic = settings.state_topic
    check = f"config {topic} cleanup.policy"
    if topic not in configs:
        return []
    policy = configs[topic].get("cleanup.policy", "delete")
    kinds = {p.strip() for p in policy.split(",")}
    if "compact" not in kinds:
        return [
            Result(
                Status.WARN,
                check,
                f"{policy}: not compacted, so the state topic keeps every state ever written "
                "until retention.ms (set cleanup.policy=compact,delete)",
            )
        ]
    if "delete" not in kinds:
        return [
            Result(
                Status.WARN,
                check,
                f"{policy}: never deleted, so the state topic grows for ever "
                "(set cleanup.policy=compact,delete and retention.ms)",
            )
        ]
    return [Result(Status.OK, check, policy)]


def line_topic_sizes(settings: Settings, configs: dict[str, dict[str, str]]) -> list[Result]:
    """The line topics' max.message.bytes leave room for a record (the producer's batches are
    sized under it)."""
    results = []
    for topic in (settings.results_topic, settings.dead_letter_topic):
        if topic not in configs:
            continue
        check = f"config {topic} max.message.bytes"
        raw = configs[topic].get("max.message.bytes", str(DEFAULT_MAX_MESSAGE_BYTES))
        try:
            value = int(raw)
        except ValueError:
            results.append(Result(Status.FAIL, check, f"{raw!r} is not a number"))
            continue
        if value <= RECORD_OVERHEAD_BYTES:
            results.append(
                Result(
                    Status.FAIL,
                    check,
                    f"{value}: no larger than a record's overhead "
                    f"({RECORD_OVERHEAD_BYTES} bytes), so no line fits",
                )
            )
        else:
            results.append(Result(Status.OK, check, str(value)))
    return results


#: Rules over the topics' configs, in order; more (min.insync.replicas, retention) go here.
TOPIC_CONFIG_RULES: list[TopicConfigRule] = [state_topic_cleanup, line_topic_sizes]


#: Asked again while the cluster makes its offsets topic (bounded by the probe's own timeout).
_COORDINATOR = Policy(
    "coordinator_unavailable",
    Backoff(base=0.25, cap=0.25, jitter=0.0),
    retry_on=frozenset({Retry.BACKOFF}),
    quiet=True,
)


async def group_acl(probe: Probe) -> list[Result]:
    """The consumer group may be described (its coordinator found): Kafka grants that with Read."""
    assert probe.admin is not None
    group = probe.settings.consumer_group
    admin = probe.admin

    async def coordinator() -> int:
        with kafka_errors(f"finding group {group}'s coordinator"):
            return int(await admin.find_coordinator(group))

    async def find() -> int:
        # A new cluster makes its offsets topic on the first ask: retriable, not a refusal.
        return await retry(coordinator, _COORDINATOR)

    check = f"acl group {group}"
    try:
        await probe.step(find(), f"finding group {group}'s coordinator")
    except CheckFailed as exc:
        return [Result(Status.FAIL, check, f"{exc} (grant Read on it: docs/security.md)")]
    granted = "Describe granted (implied by Read; Read itself is used when a worker joins)"
    return [Result(Status.OK, check, granted)]


async def producer_acl(probe: Probe) -> list[Result]:
    """The producer id start-up asks for: idempotent, or transactional in exactly-once mode
    (Write on the ``<group>-`` transactional ids). No record is written."""
    settings = probe.settings
    producer: AIOKafkaProducer
    if settings.delivery is Delivery.EXACTLY_ONCE:
        transactional_id = f"{settings.consumer_group}-check-{uuid.uuid4().hex[:12]}"
        limits = TopicLimits(DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_BYTES)
        producer = make_producer(settings, limits, transactional_id=transactional_id)
        check = f"acl transactional-id {settings.consumer_group}-"
        granted = f"a transactional producer id granted ({transactional_id})"
    else:
        producer = make_job_writer(settings)
        check = "acl idempotent producer"
        granted = "an idempotent producer id granted"
    try:
        await probe.step(producer.start(), "getting a producer id")
    except CheckFailed as exc:
        return [Result(Status.FAIL, check, str(exc))]
    finally:
        await producer.stop()
    return [Result(Status.OK, check, granted)]


#: The Kafka checks, in order, run on the connection kafka_login opens (skipped without it).
KAFKA_CHECKS: list[Check] = [topics, partitions_match, topic_configs, group_acl, producer_acl]


# --- Datagrid ------------------------------------------------------------------------------------


async def datagrid(probe: Probe) -> list[Result]:
    """One authenticated GET (a one-item page of the batch list): the URL answers, the key is
    accepted."""
    settings = probe.settings
    client = DatagridClient(settings, Metrics(process=False))
    try:
        await probe.step(client.list_batches(limit=1), "listing batches")
    except CheckFailed as exc:
        status = getattr(exc.__cause__, "status", None)
        hint = _DATAGRID_HINTS.get(status, "") if isinstance(status, int) else ""
        return [Result(Status.FAIL, "datagrid", f"{settings.datagrid_base_url}: {exc}{hint}")]
    finally:
        await client.aclose()
    return [
        Result(
            Status.OK,
            "datagrid",
            f"{settings.datagrid_base_url}: the key is accepted (GET batch-predictions)",
        )
    ]


#: What to look at when Datagrid answers the list request with these statuses.
_DATAGRID_HINTS = {
    401: " (check DATAGRID_API_KEY)",
    403: " (check DATAGRID_API_KEY and FORWARDER_DATAGRID_TEAMSPACE)",
    404: " (check FORWARDER_DATAGRID_BASE_URL: up to and including /v1)",
}

#: Checks that need no Kafka connection.
OTHER_CHECKS: list[Check] = [datagrid]
