"""The state map's storage (``forwarder.statemap._Partition``): a partition's states in a few
large buffers, indexed by a hash of the batch id.

The behaviour is checked against a plain dict (the storage the map had before), through every
path that changes it: new ids, ids written again, tombstones, pruning, the growth of the index
and the rewrite of the blob, with a hash that collides on purpose.
"""

from __future__ import annotations

import random
import time
import tracemalloc

import pytest
from aiokafka import ConsumerRecord
from prometheus_client import CollectorRegistry

from forwarder import statemap
from forwarder.kafka import partition_for
from forwarder.observability import Metrics
from forwarder.state import BatchState, Status
from forwarder.statemap import StateMap

PARTITIONS = 3
STATUSES = list(Status)


def _record(batch_id: str, value: bytes | None, written_ms: int) -> ConsumerRecord:  # type: ignore[type-arg]
    """A state-topic record of ``batch_id``, on its murmur2 partition."""
    key = batch_id.encode()
    partition = partition_for(key, PARTITIONS)
    size = len(value) if value is not None else 0
    return ConsumerRecord("state", partition, 0, written_ms, 0, key, value, None, 0, size, ())


def _map() -> tuple[StateMap, CollectorRegistry]:
    metrics = Metrics(process=False)
    states = StateMap(metrics, retention_hours=24)
    states.partition_count = PARTITIONS
    for partition in range(PARTITIONS):
        states.hold(partition)
    return states, metrics.registry


def _check(states: StateMap, model: dict[str, BatchState]) -> None:
    """The map holds exactly what the model does, per partition and through every reader."""
    for batch_id, state in model.items():
        assert states.get(batch_id) == state, batch_id
    assert len(states) == len(model)
    for partition in range(PARTITIONS):
        expected = sum(1 for b in model if partition_for(b.encode(), PARTITIONS) == partition)
        assert states.size(partition) == expected
    waiting = sorted(s.batch_id for s in model.values() if s.status is Status.WAITING)
    assert sorted(s.batch_id for s in states.waiting()) == waiting


@pytest.mark.parametrize("colliding", [False, True], ids=["python-hash", "colliding-hash"])
def test_the_storage_holds_what_a_dict_would_through_merges_rebuilds_and_collisions(
    colliding: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random writes, rewrites, tombstones and prunes of 600 ids, with the blob rewritten
    whenever garbage passes 4 KiB (dozens of times) and the index growing from 2 entries, read
    back every 50 operations as a dict of the same writes reads.  With ``colliding``, ids share
    8 hash values: every lookup has to tell ids apart by the id stored in the record, and an id
    must never be found through another id's entry."""
    monkeypatch.setattr(statemap, "_GARBAGE", 4096)
    monkeypatch.setattr(statemap, "_FIRST_INDEX", 2)
    if colliding:
        monkeypatch.setattr(statemap, "_hash32", lambda key: len(key) % 8)
    rebuilds = []
    rebuild = statemap._Partition._rebuild

    def counted(held: statemap._Partition) -> None:
        rebuilds.append(len(held.offsets))
        rebuild(held)

    monkeypatch.setattr(statemap._Partition, "_rebuild", counted)
    rng = random.Random(23)
    states, registry = _map()
    model: dict[str, BatchState] = {}
    written_at: dict[str, int] = {}
    ids = [f"b{i:0{1 + i % 5}d}" for i in range(600)]  # ids of several lengths
    now_ms = int(time.time() * 1000)
    old_ms = now_ms - 25 * 3_600_000  # older than the retention
    pruned = 0
    for step in range(4000):
        batch_id = rng.choice(ids)
        roll = rng.random()
        state = BatchState(batch_id=batch_id, status=rng.choice(STATUSES), attempts=step)
        if roll < 0.12:  # a tombstone
            states.apply(_record(batch_id, None, now_ms))
            model.pop(batch_id, None)
        elif roll < 0.20:  # a state this process wrote
            states.put(state)
            model[batch_id], written_at[batch_id] = state, now_ms
        elif roll < 0.21:  # retention: finished batches written before it go
            gone = {
                b
                for b, s in model.items()
                if written_at[b] == old_ms and s.status in (Status.FORWARDED, Status.FAILED)
            }
            assert states.prune() == len(gone)
            pruned += len(gone)
            model = {b: s for b, s in model.items() if b not in gone}
        else:  # a record read (some as old as the retention)
            written = old_ms if rng.random() < 0.3 else now_ms
            states.apply(_record(batch_id, state.encode(), written))
            model[batch_id], written_at[batch_id] = state, written
        if step % 50 == 49:
            _check(states, model)
    assert pruned > 0 and len(rebuilds) > 10  # every path was taken
    for batch_id in ids:
        if batch_id not in model:
            assert states.get(batch_id) is None and states.owns(batch_id)
    _check(states, model)
    states.update_gauge()
    assert registry.get_sample_value("forwarder_state_batches") == len(model)


def test_a_restored_partition_is_held_in_a_few_large_allocations() -> None:
    """Six partitions restored together (records interleaved, as a pod that restores every
    partition alone reads them): what the map keeps is a handful of blocks per
    partition, each far above pymalloc's 512-byte small objects, not several objects per state
    (those pinned CPython's arenas after a drop); the blocks hold little more than the records'
    bytes, and dropping four partitions frees four partitions' blocks."""
    partitions, count = 6, 30_000
    metrics = Metrics(process=False)
    states = StateMap(metrics, retention_hours=24)
    states.partition_count = partitions
    for partition in range(partitions):
        states.hold(partition)
    value = BatchState(batch_id="x" * 24, status=Status.FORWARDED, attempts=1).encode()
    tracemalloc.start()
    try:
        recorded = 0
        for i in range(count):  # each record made here and dropped once applied
            key = f"bpred_{i:018d}".encode()
            states.apply(
                ConsumerRecord(
                    "state", i % partitions, i, 0, 0, key, value, None, 0, len(value), ()
                )
            )
            recorded += 16 + len(key) + len(value)  # header, id, JSON
        kept = [s for s in tracemalloc.take_snapshot().statistics("traceback") if s.count]
        blocks = sum(s.count for s in kept)
        held = sum(s.size for s in kept)
        for partition in range(4):
            states.drop(partition)
        after_drop = sum(s.size for s in tracemalloc.take_snapshot().statistics("traceback"))
    finally:
        tracemalloc.stop()
    assert len(states) == count - 4 * (count // partitions)
    assert blocks <= 8 * partitions, [str(s) for s in kept[:20]]
    per_state = held / count
    # Each state: its record, an offset, and 2-4 index entries (the index is 1/4 to 1/2 full).
    assert per_state <= 1.15 * (recorded / count + 8 + 4 * 8), per_state
    assert after_drop <= held * (2 / partitions) * 1.2
