"""The state topic is co-partitioned with the jobs topic: each pod holds its own partitions' state.

Real ``forwarder serve`` processes on the real broker and the fake Datagrid.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from forwarder.config import Settings
from forwarder.kafka import partition_for
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.service_helpers import Forwarder, forwarder_env, run_forwarder, wait_until


def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            await admin.close()

    asyncio.run(create())


def _write_unkeyed_jobs(settings: Settings, partitions: dict[str, int]) -> None:
    async def write() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            for batch, partition in partitions.items():
                await producer.send_and_wait(
                    settings.jobs_topic, batch.encode(), partition=partition
                )
        finally:
            await producer.stop()

    asyncio.run(write())


def _gauge(fwd: Forwarder, name: str) -> float:
    text = fwd.http.get("/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_state_topic_with_another_partition_count_stops_start_up(
    make_settings: Callable[..., Settings], kafka_bootstrap: str
) -> None:
    """A state topic not partitioned like the jobs topic: exit 2, naming both topics and counts."""
    settings = make_settings(kafka_topic_partitions=3)
    _create_topic(kafka_bootstrap, settings.jobs_topic, 3)
    _create_topic(kafka_bootstrap, settings.state_topic, 1)
    done = run_forwarder(forwarder_env(settings), "serve", timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert f"state topic {settings.state_topic} has 1 partitions" in output
    assert f"jobs topic {settings.jobs_topic} has 3" in output


def test_created_state_topic_takes_the_existing_jobs_topic_partition_count(
    make_settings: Callable[..., Settings], kafka_bootstrap: str, tmp_path: Path
) -> None:
    """An existing 5-partition jobs topic: the forwarder creates the state topic with 5 too."""
    settings = make_settings(kafka_topic_partitions=2)
    _create_topic(kafka_bootstrap, settings.jobs_topic, 5)
    fwd = Forwarder(settings, tmp_path).start()
    try:
        fwd.wait_ready()
        restored = fwd.events("state_partitions")
        assert restored and restored[-1]["partitions"] == [0, 1, 2, 3, 4]
    finally:
        fwd.stop()


def test_two_pods_hold_their_own_partitions_and_answer_for_all(
    make_settings: Callable[..., Settings], fake_datagrid: FakeDatagrid, tmp_path: Path
) -> None:
    """Two pods in one group split the state; each answers GET for every batch; re-queued
    batches, and unkeyed jobs in the wrong partition, are duplicates, never forwarded again."""
    settings = make_settings(kafka_topic_partitions=4, consumer_group=f"g-{uuid.uuid4().hex[:8]}")
    batches = [f"bpred_{uuid.uuid4().hex[:12]}" for _ in range(12)]
    for batch in batches:
        fake_datagrid.configure(batch, generate={"count": 5, "distinct_ids": 5})
    pods = [Forwarder(settings, tmp_path, name=f"pod{i}").start() for i in range(2)]
    try:
        for pod in pods:
            pod.wait_ready()

        def split() -> bool:  # both pods in the group, two partitions each
            return all(
                pod.events("state_partitions")
                and len(pod.events("state_partitions")[-1]["partitions"]) == 2
                for pod in pods
            )

        wait_until(split, 90, "the group to settle on two pods")
        for index, batch in enumerate(batches):
            assert pods[index % 2].queue(batch).status_code == 202
        for pod in pods:
            for batch in batches:
                wait_until(
                    lambda p=pod, b=batch: (p.state(b) or {}).get("status") == "forwarded",
                    60,
                    f"{batch} forwarded, as seen from {pod.log_path.name}",
                )
        held = [_gauge(pod, "forwarder_state_batches") for pod in pods]
        assert sum(held) == len(batches), held
        assert all(0 < n < len(batches) for n in held), held
        for batch in batches:  # asked again, of either pod: forwarded once all the same
            assert pods[1].queue(batch).status_code == 202
        wait_until(
            lambda: sum(len(p.events("batch_duplicate")) for p in pods) == len(batches),
            60,
            "every re-queued batch counted as a duplicate",
        )
        # Another producer's jobs: bare ids, unkeyed, each in a partition not its batch's. They
        # are moved to their batch's partition and deduped there, never forwarded again.
        _write_unkeyed_jobs(settings, {b: (partition_for(b.encode(), 4) + 1) % 4 for b in batches})
        wait_until(
            lambda: sum(len(p.events("batch_duplicate")) for p in pods) == 2 * len(batches),
            60,
            "every unkeyed job counted as a duplicate",
        )
        assert sum(len(p.events("job_rerouted")) for p in pods) == len(batches)
        assert sum(len(p.events("batch_forwarded")) for p in pods) == len(batches)
    finally:
        for pod in pods:
            pod.stop()
