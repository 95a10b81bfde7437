"""The forwarder's topics: the configs it creates them with, the check at start (create what is
missing, or refuse naming it; read the line topics' size limits; warn about configs that weaken
the guarantees), and partition look-ups. Every Kafka client comes from ``kafka.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError as AIOKafkaError

from forwarder.config import Settings
from forwarder.errors import Backoff, KafkaError, Retry, TopicMissing
from forwarder.kafka import TopicLimits, connection_options, kafka_errors, make_admin, translate
from forwarder.retry import Policy, retry

log = structlog.get_logger("forwarder.kafka")

#: Broker default ``message.max.bytes`` (and topic ``max.message.bytes``), used when unreadable.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
_UNKNOWN_TOPIC = 3  # Kafka's UNKNOWN_TOPIC_OR_PARTITION


def _retention_ms(hours: float) -> str:
    """Kafka's ``retention.ms`` for a number of hours (-1 is Kafka's "for ever" too)."""
    return "-1" if hours == -1 else str(int(hours * 3_600_000))


def topic_specs(settings: Settings) -> dict[str, dict[str, str]]:
    """The forwarder's topics and the configs it creates them with (``min.insync.replicas`` is
    added at creation, when the replication factor is known: :func:`min_insync_replicas`)."""
    # The line topics say `delete` themselves: a cluster whose default is `compact` would keep
    # only the last line per custom_id.
    return {
        settings.results_topic: {
            "cleanup.policy": "delete",
            "retention.ms": _retention_ms(settings.results_retention_hours),
        },
        settings.dead_letter_topic: {
            "cleanup.policy": "delete",
            "retention.ms": _retention_ms(settings.dead_letter_retention_hours),
        },
        settings.jobs_topic: {},
        # Compacted: the latest state per batch id is the memory of what was forwarded; deleted
        # past the retention, so the topic does not grow for ever (a waiting batch's record is
        # rewritten at every check, so it stays young).
        settings.state_topic: {
            "cleanup.policy": "compact,delete",
            "retention.ms": _retention_ms(settings.state_retention_hours),
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
                    topic_configs={
                        **specs[name],
                        "min.insync.replicas": str(min_insync_replicas(replication)),
                    },
                )
                for name in missing
            ]
            response = await admin.create_topics(new, timeout_ms=30_000)
            _check_created(response)
        # One DescribeConfigs for every topic: the line topics' size limits are needed (retried
        # while a topic created a moment ago is not known to every broker yet), the rest advice.
        needed = (settings.results_topic, settings.dead_letter_topic)
        configs = await retry(lambda: _topic_configs(admin, list(specs), needed), _NEW_TOPIC)
        policy = configs.get(settings.state_topic, {}).get("cleanup.policy")
        if settings.state_topic in existing and policy is not None and "delete" not in policy:
            log.warning(
                "state_topic_unbounded",
                topic=settings.state_topic,
                cleanup_policy=policy,
                hint="set cleanup.policy=compact,delete and retention.ms, or it grows for ever",
            )
        limits = TopicLimits(
            results=_max_message_bytes(configs[settings.results_topic]),
            dead_letters=_max_message_bytes(configs[settings.dead_letter_topic]),
        )
        await _warn_weak_topics(admin, settings, {t: configs[t] for t in existing & configs.keys()})
        return limits
    except AIOKafkaError as exc:
        raise translate(exc, "preparing topics") from exc
    finally:
        await admin.close()


def min_insync_replicas(replication: int) -> int:
    """``min.insync.replicas`` of a topic the forwarder creates: with ``acks=all``, a write is
    acknowledged once on two replicas (one on a single-broker cluster), so losing one broker
    loses no acknowledged record."""
    return min(2, replication)


@dataclass(frozen=True, slots=True)
class TopicWarning:
    """A topic config that weakens what the forwarder promises, with what to do about it."""

    topic: str
    config: str
    value: str
    problem: str


def topic_config_warnings(
    settings: Settings,
    configs: dict[str, dict[str, str]],
    replication: dict[str, int],
) -> list[TopicWarning]:
    """The configs of existing topics that weaken the forwarder's guarantees (pure: no I/O).

    ``configs`` maps a topic name to its effective configs (DescribeConfigs: name to value,
    broker defaults included) and ``replication`` a topic name to its replication factor; topics
    missing from ``configs`` are not judged.  Reported, for the results, dead-letter, jobs and
    state topics:

    - ``min.insync.replicas`` 1 on a replicated topic: ``acks=all`` then waits for the leader
      alone, and losing it loses acknowledged records;
    - ``cleanup.policy`` with ``compact`` on the results or dead-letter topic: only the latest
      record per key (``custom_id``) would be kept;
    - ``retention.ms`` of the results or dead-letter topic shorter than the state retention
      (``FORWARDER_STATE_RETENTION_HOURS``): records are deleted while the forwarder still
      remembers their batch as forwarded, so it would not forward them again.

    Used at start (a ``topic_config_weak`` warning per item) and by ``forwarder check``.
    """
    line_topics = {settings.results_topic, settings.dead_letter_topic}
    warnings: list[TopicWarning] = []
    for topic in (*sorted(line_topics), settings.jobs_topic, settings.state_topic):
        config = configs.get(topic)
        if config is None:
            continue
        isr = config.get("min.insync.replicas")
        if isr is not None and int(isr) < 2 and replication.get(topic, 1) > 1:
            warnings.append(
                TopicWarning(
                    topic,
                    "min.insync.replicas",
                    isr,
                    f"with acks=all and replication {replication[topic]}, a write acknowledged by "
                    "the leader alone is lost with it: set min.insync.replicas=2",
                )
            )
        if topic not in line_topics:
            continue
        policy = config.get("cleanup.policy", "delete")
        if "compact" in policy:
            warnings.append(
                TopicWarning(
                    topic,
                    "cleanup.policy",
                    policy,
                    "compaction keeps only the latest record per custom_id: set "
                    "cleanup.policy=delete",
                )
            )
        retention = config.get("retention.ms")
        state_ms = settings.state_retention_hours * 3_600_000
        if retention is not None and 0 <= int(retention) < state_ms:
            warnings.append(
                TopicWarning(
                    topic,
                    "retention.ms",
                    retention,
                    f"records are deleted before the batch's state ({state_ms:.0f} ms, "
                    "FORWARDER_STATE_RETENTION_HOURS), and a forwarded batch is not forwarded "
                    "again: raise retention.ms or lower the state retention",
                )
            )
    return warnings


async def _warn_weak_topics(
    admin: AIOKafkaAdminClient, settings: Settings, configs: dict[str, dict[str, str]]
) -> None:
    """Log a ``topic_config_weak`` warning per config of an existing topic that weakens the
    guarantees (:func:`topic_config_warnings`); topics whose configs were unreadable are left
    out."""
    if not configs:
        return
    replication = {}
    # Advice only: a principal without Describe on the jobs or state topic still starts.
    with contextlib.suppress(KafkaError, AIOKafkaError):
        for entry in await admin.describe_topics(list(configs)):
            if entry["error_code"] == 0 and entry["partitions"]:
                replication[entry["topic"]] = len(entry["partitions"][0]["replicas"])
    for warning in topic_config_warnings(settings, configs, replication):
        log.warning(
            "topic_config_weak",
            topic=warning.topic,
            config=warning.config,
            value=warning.value,
            problem=warning.problem,
        )


async def _topic_configs(
    admin: AIOKafkaAdminClient, topics: list[str], needed: Collection[str]
) -> dict[str, dict[str, str]]:
    """Every effective config of each topic, in one DescribeConfigs. A topic whose configs
    cannot be read is left out, unless it is ``needed``: then the refusal is an error, never a
    guess (retriable while the topic is new to the broker that answered)."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
    configs: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            error_code, message, _type, name, entries = resource[:5]
            if not error_code:
                configs[name] = {e[0]: str(e[1]) for e in entries if e[1] is not None}
            elif name in needed and error_code == _UNKNOWN_TOPIC:
                raise KafkaError(f"topic {name} is not known to every broker yet")
            elif name in needed:
                raise KafkaError(
                    f"reading the configs of topic {name} failed (error {error_code}"
                    f"{': ' + message if message else ''}): the forwarder needs DescribeConfigs "
                    "on it to size its records (see docs/security.md)",
                    retriable=False,
                )
    missing = [topic for topic in needed if topic not in configs]
    if missing:  # no answer at all for it: as unknown as a new topic
        raise KafkaError(f"topic {missing[0]} is not known to every broker yet")
    return configs


def _check_created(response: Any) -> None:
    # error code 36 = TOPIC_ALREADY_EXISTS: another pod won the race, which is fine.
    for topic, code, *rest in response.topic_errors:
        if code not in (0, 36):
            message = rest[0] if rest else ""
            raise KafkaError(f"creating topic {topic}: error {code} {message}", retriable=False)


#: A topic created a moment ago is not known to every broker yet: ask again for up to 5 s.
_NEW_TOPIC = Policy(
    "topic_config_unavailable",
    Backoff(base=0.25, cap=0.25, jitter=0.0),
    attempts=20,
    retry_on=frozenset({Retry.BACKOFF}),
    quiet=True,
)


def _max_message_bytes(configs: dict[str, str]) -> int:
    value = configs.get("max.message.bytes")
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
