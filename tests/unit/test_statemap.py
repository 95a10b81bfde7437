"""The state map (``forwarder.statemap``): the states a pod holds, without Kafka."""

from __future__ import annotations

import time

from aiokafka import ConsumerRecord
from prometheus_client import CollectorRegistry

from forwarder.kafka import partition_for
from forwarder.observability import Metrics
from forwarder.state import BatchState, Status
from forwarder.statemap import StateMap


def _record(
    batch_id: str, value: bytes | None, written_ms: int, partition: int = 0
) -> ConsumerRecord:  # type: ignore[type-arg]
    size = len(value) if value is not None else 0
    return ConsumerRecord(
        "state", partition, 0, written_ms, 0, batch_id.encode(), value, None, 0, size, ()
    )


def _map(partitions: int = 1) -> tuple[StateMap, CollectorRegistry]:
    metrics = Metrics(process=False)
    states = StateMap(metrics, retention_hours=24)
    states.partition_count = partitions
    return states, metrics.registry


def test_the_state_map_prunes_by_age_but_keeps_unfinished_batches() -> None:
    """Retention drops forwarded and failed states written before it; waiting and forwarding ones
    are kept whatever their age (the age is the record's, as the broker's retention.ms counts)."""
    states, registry = _map()
    states.hold(0)
    now_ms = int(time.time() * 1000)
    old, recent = now_ms - 25 * 3_600_000, now_ms - 3_600_000
    cases = [
        ("old_done", Status.FORWARDED, old),
        ("old_failed", Status.FAILED, old),
        ("old_waiting", Status.WAITING, old),
        ("old_forwarding", Status.FORWARDING, old),
        ("recent_done", Status.FORWARDED, recent),
    ]
    for batch_id, status, written in cases:
        states.apply(
            _record(batch_id, BatchState(batch_id=batch_id, status=status).encode(), written)
        )
    states.put(BatchState(batch_id="just_written", status=Status.FORWARDED))
    assert states.prune() == 2
    ids = [batch_id for batch_id, _, _ in cases] + ["just_written"]
    kept = {batch_id for batch_id in ids if states.get(batch_id) is not None}
    assert kept == {"old_waiting", "old_forwarding", "recent_done", "just_written"}
    assert [s.batch_id for s in states.waiting()] == ["old_waiting"]
    assert registry.get_sample_value("forwarder_state_batches") == 4


def test_batches_of_partitions_not_held_are_not_ours() -> None:
    """A batch whose partition is not held is neither owned nor readable, and put() ignores it;
    dropping a partition forgets its states."""
    states, _ = _map(partitions=4)
    mine = next(f"b{i}" for i in range(100) if partition_for(f"b{i}".encode(), 4) == 2)
    other = next(f"b{i}" for i in range(100) if partition_for(f"b{i}".encode(), 4) != 2)
    states.hold(2)
    for batch_id in (mine, other):
        states.put(BatchState(batch_id=batch_id, status=Status.FORWARDED))
    assert states.owns(mine) and not states.owns(other)
    assert states.get(other) is None and len(states) == 1 and states.size(2) == 1
    states.drop(2)
    assert states.partitions == [] and states.get(mine) is None and len(states) == 0


def test_a_tombstone_forgets_and_an_unreadable_record_reads_as_unknown() -> None:
    """A record with no value forgets the batch; one that does not decode reads as None, and a
    record of a partition not held is ignored."""
    states, _ = _map()
    states.hold(0)
    value = BatchState(batch_id="b1", status=Status.FORWARDED).encode()
    states.apply(_record("b1", value, 1))
    assert states.get("b1") is not None
    states.apply(_record("b1", None, 2))
    assert states.get("b1") is None and len(states) == 0
    states.apply(_record("b2", b'{"status": 42}', 3))
    assert states.owns("b2") and states.get("b2") is None
    states.apply(_record("b3", value, 4, partition=1))
    assert len(states) == 1  # b2 only
