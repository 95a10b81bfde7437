"""Production Kafka platforms (issue 22) against real brokers: compression as the broker stores it,
the configs of topics the forwarder creates, start-up warnings for weak existing topics, and
secrets read from files by ``forwarder forward``."""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from structlog.testing import capture_logs

from forwarder.config import Settings
from forwarder.topics import min_insync_replicas, prepare_topics, topic_specs
from tests.conftest import API_KEY, REPO, rig, settings_for
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import forwarder_env, run_forwarder

MakeSettings = Callable[..., Settings]


def result_line(batch: str, n: int) -> str:
    """A result line whose text compresses (the codec must have something to do)."""
    text = "the quick brown fox jumps over the lazy dog " * 8
    return (
        f'{{"object":"batch_prediction.result","batch_id":"{batch}","custom_id":"req-{n}",'
        f'"status":"succeeded","output":{{"seq":{n},"text":"{text}"}},"error":null}}'
    )


def batch_codecs(segment: Path) -> list[int]:
    """The compression codec (attributes bits 0-2) of every record batch in a log segment.

    A v2 record batch: baseOffset int64, batchLength int32 (bytes after this field),
    partitionLeaderEpoch int32, magic int8, crc uint32, attributes int16, ...
    """
    data = segment.read_bytes()
    codecs, at = [], 0
    while at + 23 <= len(data):
        (length,) = struct.unpack_from(">i", data, at + 8)
        if length <= 0:  # the zero-filled tail of a preallocated segment
            break
        magic = data[at + 16]
        assert magic == 2, f"record batch at byte {at} of {segment} has magic {magic}"
        (attributes,) = struct.unpack_from(">h", data, at + 21)
        codecs.append(attributes & 0x07)
        at += 12 + length
    return codecs


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private broker whose log segment files this module reads (never skipped)."""
    broker = rig.Broker.on_free_ports(tmp_path_factory.mktemp("kafka-segments"))
    try:
        broker.start(wait=90)
    except Exception as exc:
        pytest.fail(f"could not start the local Kafka broker: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.parametrize(("codec", "number"), [("zstd", 4), ("none", 0)])
def test_forward_writes_record_batches_compressed_with_the_chosen_codec(
    own_broker: Any, fake_datagrid: FakeDatagrid, codec: str, number: int
) -> None:
    """With FORWARDER_KAFKA_COMPRESSION_TYPE, the broker's own results segments hold batches of
    that codec (zstd: 4), and the records read back are the lines."""
    settings = settings_for(own_broker.bootstrap, fake_datagrid, kafka_replication_factor=1)
    batch = f"bpred_{uuid.uuid4().hex[:12]}"
    lines = [result_line(batch, n) for n in range(1, 201)]
    fake_datagrid.configure(batch, lines=lines)
    env = forwarder_env(settings)
    env["FORWARDER_KAFKA_COMPRESSION_TYPE"] = codec
    done = run_forwarder(env, "forward", batch)
    assert done.returncode == 0, done.stdout + done.stderr
    segments = sorted(own_broker.log_dirs.glob(f"{settings.results_topic}-*/*.log"))
    assert segments, f"no log segment of {settings.results_topic} in {own_broker.log_dirs}"
    codecs = [c for segment in segments for c in batch_codecs(segment)]
    assert codecs and set(codecs) == {number}, codecs
    records = asyncio.run(read_topic(own_broker.bootstrap, settings.results_topic))
    assert sorted(r.value.decode() for r in records if r.value) == sorted(lines)


async def _configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
        (resource,) = response.resources
        return {entry[0]: entry[1] for entry in resource[4]}
    finally:
        await admin.close()


async def test_created_topics_get_min_insync_replicas_and_retention(
    make_settings: MakeSettings,
) -> None:
    """Topics the forwarder creates carry min.insync.replicas=min(2, replication) and the
    configured retention of results and dead letters."""
    settings = make_settings(
        kafka_replication_factor=1,
        results_retention_hours=48,
        dead_letter_retention_hours=-1,
    )
    await prepare_topics(settings)
    bootstrap = settings.kafka_bootstrap_servers
    results = await _configs(bootstrap, settings.results_topic)
    dead = await _configs(bootstrap, settings.dead_letter_topic)
    state = await _configs(bootstrap, settings.state_topic)
    assert results["retention.ms"] == str(48 * 3_600_000)
    assert dead["retention.ms"] == "-1"
    assert state["retention.ms"] == str(int(settings.state_retention_hours * 3_600_000))
    for configs in (results, dead, state):
        assert configs["min.insync.replicas"] == "1"  # one broker: min(2, 1)


async def test_start_warns_about_weak_configs_of_existing_topics(
    make_settings: MakeSettings,
) -> None:
    """An existing compacted results topic and a dead-letter topic with a retention shorter
    than the state retention each give a topic_config_weak warning at start."""
    settings = make_settings(kafka_replication_factor=1)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        compacted = {"cleanup.policy": "compact", "retention.ms": "-1"}
        weak = [
            NewTopic(settings.results_topic, 3, 1, topic_configs=compacted),
            NewTopic(settings.dead_letter_topic, 3, 1, topic_configs={"retention.ms": "3600000"}),
        ]
        await admin.create_topics(weak, timeout_ms=30_000)
        # Existing means listed: until the metadata shows them, start-up would take them for
        # missing (and its create would find them made, by "another pod").
        for _ in range(100):
            listed = set(await admin.list_topics())
            if {settings.results_topic, settings.dead_letter_topic} <= listed:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the weak topics never appeared in the metadata")
    finally:
        await admin.close()
    with capture_logs() as logs:
        await prepare_topics(settings)
    warned = {
        (event["topic"], event["config"], event["value"])
        for event in logs
        if event["event"] == "topic_config_weak"
    }
    assert warned == {
        (settings.results_topic, "cleanup.policy", "compact"),
        (settings.dead_letter_topic, "retention.ms", "3600000"),
    }
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "topic_config_weak")


def test_forward_reads_the_api_key_from_a_file(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str, tmp_path: Path
) -> None:
    """`forwarder forward` with DATAGRID_API_KEY_FILE (key plus newline) and no DATAGRID_API_KEY
    forwards the batch, and never prints the key."""
    settings = make_settings()
    lines = [result_line(batch_id, n) for n in (1, 2, 3)]
    fake_datagrid.configure(batch_id, lines=lines)
    key_file = tmp_path / "datagrid-api-key"
    key_file.write_text(API_KEY + "\n")
    env = forwarder_env(settings)
    del env["DATAGRID_API_KEY"]
    env["DATAGRID_API_KEY_FILE"] = str(key_file)
    done = run_forwarder(env, "forward", batch_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert API_KEY not in done.stdout + done.stderr
    records = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    assert sorted(r.value.decode() for r in records if r.value) == sorted(lines)


def test_forward_refuses_a_key_set_both_ways_naming_both_variables(
    make_settings: MakeSettings, batch_id: str, tmp_path: Path
) -> None:
    """DATAGRID_API_KEY and DATAGRID_API_KEY_FILE together stop `forward` with exit 2, naming
    both, echoing neither value."""
    settings = make_settings()
    key_file = tmp_path / "datagrid-api-key"
    key_file.write_text("dg_from_file_0000\n")
    env = forwarder_env(settings)
    env["DATAGRID_API_KEY_FILE"] = str(key_file)
    done = run_forwarder(env, "forward", batch_id)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "DATAGRID_API_KEY and DATAGRID_API_KEY_FILE" in done.stderr
    assert API_KEY not in done.stdout + done.stderr
    assert "dg_from_file_0000" not in done.stdout + done.stderr


def test_asyncapi_topic_configuration_is_what_the_forwarder_creates() -> None:
    """Each channel's documented retention and min.insync.replicas are what start-up creates
    with the default settings on a cluster of three or more brokers."""
    document = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text())
    settings = Settings()  # every default: Settings reads no environment itself
    specs = topic_specs(settings)
    for channel in document["channels"].values():
        documented = channel["bindings"]["kafka"]["topicConfiguration"]
        created = specs[channel["address"]]
        assert documented["min.insync.replicas"] == min_insync_replicas(3), channel["address"]
        if "retention.ms" in created:
            assert str(documented["retention.ms"]) == created["retention.ms"], channel["address"]
        else:
            assert "retention.ms" not in documented, channel["address"]
