"""The state map: the latest state of each batch of the state partitions this pod holds.

Pure bookkeeping, no Kafka: ``store.StateStore`` follows the state topic into it and writes what
this process records.  States are held encoded (about half the memory of decoded ones) and decoded
when read; ``forwarder_state_batches`` is their number.

Each partition's states live in a few large buffers (:class:`_Partition`), not in a dict of
small objects: CPython keeps small objects in 256 KiB arenas that go back to the system only when
every object in them is freed, and the partitions restored together interleave their objects in
the same arenas, so dropping a partition after a rebalance used to free its states without
freeing the memory (a pod that had restored every partition alone kept about two thirds of it
after giving four of six away).  Large buffers come from ``malloc`` (``mmap`` or the heap that
``malloc_trim`` gives back) and go back when the partition is dropped.
"""

from __future__ import annotations

import struct
import time
from array import array
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
import structlog
from aiokafka import ConsumerRecord

from forwarder.kafka import partition_for
from forwarder.observability import Metrics
from forwarder.state import BatchState, Status

# The store's events: a filter on the logger name keeps finding them.
log = structlog.get_logger("forwarder.store")

#: How the status of a waiting or a forwarding batch reads in its record (msgspec writes no spaces).
_WAITING = b'"status":"waiting"'
_UNFINISHED = b'"status":"forwarding"'

#: A record in a partition's blob: its timestamp in ms, the lengths of the batch id and of the
#: JSON, then the batch id and the JSON themselves.
_HEADER = struct.Struct("<qII")
_LOW = 0xFFFFFFFF  # an index entry: the id's 32-bit hash above, its slot + 1 in these bits
#: The index (open addressing, linear probing) doubles when it is half full: a lookup of an id
#: not held probes about two entries.
_FIRST_INDEX = 8
#: The blob is rewritten without its dead records once they are half of it (and at least this).
_GARBAGE = 1 << 20


def _hash32(key: bytes) -> int:
    """32 bits of the hash of a batch id (Python's: per process, which is all an index in memory
    needs; a test replaces it with a colliding one)."""
    return hash(key) & _LOW


class _Partition:
    """One state partition's states, in three large buffers that are freed as a whole.

    * ``blob``: the records, appended (:data:`_HEADER`, batch id, JSON); a batch written again
      gets a new record, and the old one is garbage until :meth:`_rebuild` rewrites the blob.
    * ``offsets``: by slot (one per batch id, in the order they came), where its latest record
      starts; -1 once the batch is forgotten.
    * ``index``: a hash table of ``hash32(id) << 32 | slot + 1`` entries (0: empty), probed
      linearly from ``hash32(id)``; every slot has one entry, a forgotten one's too, until the
      next rebuild.  Two ids may share a hash: an entry is the id's only if the id stored in its
      record is.
    """

    __slots__ = ("blob", "garbage", "index", "live", "offsets")

    def __init__(self) -> None:
        self.blob = bytearray()
        self.offsets = array("q")
        self.index = array("Q", [0]) * _FIRST_INDEX
        self.live = 0  # batches held
        self.garbage = 0  # bytes of the blob no slot points to

    # --- reading ---------------------------------------------------------------------------
    def probe(self, key: bytes, hashed: int) -> int:
        """The slot of batch id ``key`` (whose :func:`_hash32` is ``hashed``) if it is held, else
        ``~i`` where ``i`` is the free index entry where it would go."""
        index, offsets, blob = self.index, self.offsets, self.blob
        mask = len(index) - 1
        i = hashed & mask
        while entry := index[i]:
            if entry >> 32 == hashed:
                slot = (entry & _LOW) - 1
                at = offsets[slot]
                if (
                    at >= 0
                    and blob.startswith(key, at + _HEADER.size)
                    and _HEADER.unpack_from(blob, at)[1] == len(key)
                ):
                    return slot
            i = (i + 1) & mask
        return ~i

    def read(self, slot: int) -> tuple[int, bytes]:
        """The timestamp and JSON of ``slot``'s record."""
        at = self.offsets[slot]
        written, id_length, length = _HEADER.unpack_from(self.blob, at)
        start = at + _HEADER.size + id_length
        return written, bytes(self.blob[start : start + length])

    def records(self) -> Iterator[_Record]:
        """Each held batch's record, read where it lies (:meth:`StateMap.waiting` and
        :meth:`StateMap.prune` look at every one).  The blob must not change meanwhile."""
        blob, unpack = self.blob, _HEADER.unpack_from
        for slot, at in enumerate(self.offsets):
            if at >= 0:
                written, id_length, length = unpack(blob, at)
                start = at + _HEADER.size + id_length
                yield _Record(slot, at, blob[at + _HEADER.size : start], written, start, length)

    def _size(self, slot: int) -> int:
        _, id_length, length = _HEADER.unpack_from(self.blob, self.offsets[slot])
        return int(_HEADER.size + id_length + length)

    # --- writing ---------------------------------------------------------------------------
    def write(self, key: bytes, written: int, value: bytes) -> None:
        """Make ``value`` (written at ``written`` ms) the latest state of batch id ``key``."""
        hashed = _hash32(key)
        slot = self.probe(key, hashed)
        blob = self.blob
        at = len(blob)
        blob += _HEADER.pack(written, len(key), len(value))
        blob += key
        blob += value
        if slot >= 0:
            self.garbage += self._size(slot)
            self.offsets[slot] = at
            if self.garbage > _GARBAGE and self.garbage > len(blob) // 2:
                self._rebuild()
        else:
            offsets = self.offsets
            self.index[~slot] = (hashed << 32) | (len(offsets) + 1)
            offsets.append(at)
            self.live += 1
            if 2 * len(offsets) > len(self.index):
                self._reindex(2 * len(self.index), self.index)

    def forget(self, key: bytes) -> None:
        """Forget batch id ``key`` (nothing if it is not held)."""
        slot = self.probe(key, _hash32(key))
        if slot >= 0:
            self.kill(slot)
            self.tidy()

    def kill(self, slot: int) -> None:
        """Forget ``slot``; its index entry stays until the next rebuild."""
        self.garbage += self._size(slot)
        self.offsets[slot] = -1
        self.live -= 1

    def tidy(self) -> None:
        """Rewrite the blob when half of it is garbage."""
        if self.garbage > _GARBAGE and self.garbage > len(self.blob) // 2:
            self._rebuild()

    def _reindex(self, size: int, entries: Iterable[int]) -> None:
        """A new index of ``size`` entries (a power of two) holding ``entries``."""
        index, mask = array("Q", [0]) * size, size - 1
        for entry in entries:
            if entry:
                i = (entry >> 32) & mask
                while index[i]:
                    i = (i + 1) & mask
                index[i] = entry
        self.index = index

    def _rebuild(self) -> None:
        """Copy the live records into a new blob and renumber their slots: the garbage and the
        forgotten slots' index entries go."""
        blob, offsets, entries = bytearray(), array("q"), array("Q")
        old = self.blob
        for record in self.records():
            offsets.append(len(blob))
            entries.append((_hash32(bytes(record.key)) << 32) | len(offsets))
            blob += old[record.at : record.start + record.length]
        self.blob, self.offsets, self.garbage = blob, offsets, 0
        size = _FIRST_INDEX
        while size < 2 * len(offsets) + 1:
            size *= 2
        self._reindex(size, entries)


class _Record(NamedTuple):
    """A held record as :meth:`_Partition.records` finds it: its JSON is
    ``blob[start : start + length]``."""

    slot: int
    at: int
    key: bytearray
    written: int
    start: int
    length: int

    def has(self, blob: bytearray, marker: bytes) -> bool:
        """True when the JSON contains ``marker`` (read in place)."""
        return blob.find(marker, self.start, self.start + self.length) >= 0

    def value(self, blob: bytearray) -> bytes:
        """The JSON, copied."""
        return bytes(blob[self.start : self.start + self.length])


class StateMap:
    """Batch id -> latest state, by state partition, for the partitions held.

    A partition is held from :meth:`hold` to :meth:`drop`; a batch of a partition not held is not
    this pod's (:meth:`owns` is False, :meth:`get` None).
    """

    def __init__(self, metrics: Metrics, retention_hours: float) -> None:
        self._metrics = metrics
        self._states: dict[int, _Partition] = {}  # by state partition
        self.partition_count = 0  # of the state topic, once known
        self._retention = retention_hours * 3600.0
        self.pruned_at = time.monotonic()

    # --- partitions ------------------------------------------------------------------------
    def partition_of(self, batch_id: str) -> int:
        """The state (and jobs) partition of ``batch_id``."""
        return partition_for(batch_id.encode(), self.partition_count)

    @property
    def partitions(self) -> list[int]:
        """The partitions held."""
        return sorted(self._states)

    def holds(self, partition: int) -> bool:
        """True when ``partition`` is held."""
        return partition in self._states

    def hold(self, partition: int) -> None:
        """Hold ``partition``, empty (its states are restored into it)."""
        self._states[partition] = _Partition()

    def drop(self, partition: int) -> None:
        """Forget ``partition`` and its states (their buffers are freed whole)."""
        del self._states[partition]

    def size(self, partition: int) -> int:
        """How many batches of ``partition`` are held."""
        held = self._states.get(partition)
        return held.live if held is not None else 0

    # --- batches ---------------------------------------------------------------------------
    def _held(self, batch_id: str) -> _Partition | None:
        """The states of ``batch_id``'s partition, if it is held."""
        return self._states.get(self.partition_of(batch_id)) if self.partition_count else None

    def owns(self, batch_id: str) -> bool:
        """True when ``batch_id``'s partition is held."""
        return self._held(batch_id) is not None

    def get(self, batch_id: str) -> BatchState | None:
        """The latest state of ``batch_id`` if its partition is held (None: unknown or not ours)."""
        held = self._held(batch_id)
        key = batch_id.encode()
        slot = held.probe(key, _hash32(key)) if held is not None else -1
        if held is None or slot < 0:
            return None
        return decode_state(held.read(slot)[1], batch_id)

    def put(self, state: BatchState) -> None:
        """Remember a state this process just wrote (the topic will echo it later)."""
        held = self._held(state.batch_id)
        if held is not None:
            held.write(state.batch_id.encode(), int(time.time() * 1000), state.encode())
            self.update_gauge()

    def apply(self, record: ConsumerRecord[Any, Any]) -> None:
        """A state-topic record read: the batch's latest state, or a tombstone (forget it)."""
        held = self._states.get(record.partition)
        if held is None or record.key is None:
            return
        if record.value is None:  # tombstone: forget the batch
            held.forget(record.key)
        else:
            held.write(record.key, record.timestamp, record.value)

    def waiting(self) -> list[BatchState]:
        """Held batches parked until Datagrid finishes them."""
        found = []
        for held in self._states.values():
            for record in held.records():
                if record.has(held.blob, _WAITING):  # a cheap filter; the decoded status decides
                    batch_id = record.key.decode("utf-8", "replace")
                    state = decode_state(record.value(held.blob), batch_id)
                    if state is not None and state.status is Status.WAITING:
                        found.append(state)
        return found

    def __len__(self) -> int:
        return sum(held.live for held in self._states.values())

    def update_gauge(self) -> None:
        """Set ``forwarder_state_batches`` to the number of batches held."""
        self._metrics.state_batches.set(len(self))

    def prune(self, now: datetime | None = None) -> int:
        """Forget finished batches whose state was written longer than the retention ago (as the
        broker's ``retention.ms`` counts); waiting and forwarding ones stay.  Returns how many
        were forgotten."""
        self.pruned_at = time.monotonic()
        cutoff = ((now or datetime.now(UTC)).timestamp() - self._retention) * 1000
        forgotten = 0
        for held in self._states.values():
            blob = held.blob
            old = [
                record.slot
                for record in held.records()
                if record.written < cutoff
                and not record.has(blob, _UNFINISHED)
                and not record.has(blob, _WAITING)
            ]
            for slot in old:
                held.kill(slot)
            held.tidy()
            forgotten += len(old)
        self.update_gauge()
        return forgotten


def decode_state(value: bytes, batch_id: str) -> BatchState | None:
    """A state record decoded; None (and a warning) when it cannot be read."""
    try:
        return BatchState.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("state_record_unreadable", batch_id=batch_id)
        return None
