"""The state map: the latest state of each batch of the state partitions this pod holds.

Pure bookkeeping, no Kafka: ``store.StateStore`` follows the state topic into it and writes what
this process records.  States are held encoded (about half the memory of decoded ones) and decoded
when read; ``forwarder_state_batches`` is their number.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

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


class StateMap:
    """Batch id -> latest state, by state partition, for the partitions held.

    A partition is held from :meth:`hold` to :meth:`drop`; a batch of a partition not held is not
    this pod's (:meth:`owns` is False, :meth:`get` None).
    """

    def __init__(self, metrics: Metrics, retention_hours: float) -> None:
        self._metrics = metrics
        # By state partition: batch id -> (record timestamp in ms, the record's JSON).
        self._states: dict[int, dict[str, tuple[int, bytes]]] = {}
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
        self._states[partition] = {}

    def drop(self, partition: int) -> None:
        """Forget ``partition`` and its states."""
        del self._states[partition]

    def size(self, partition: int) -> int:
        """How many batches of ``partition`` are held."""
        return len(self._states.get(partition, ()))

    # --- batches ---------------------------------------------------------------------------
    def _held(self, batch_id: str) -> dict[str, tuple[int, bytes]] | None:
        """The states of ``batch_id``'s partition, if it is held."""
        return self._states.get(self.partition_of(batch_id)) if self.partition_count else None

    def owns(self, batch_id: str) -> bool:
        """True when ``batch_id``'s partition is held."""
        return self._held(batch_id) is not None

    def get(self, batch_id: str) -> BatchState | None:
        """The latest state of ``batch_id`` if its partition is held (None: unknown or not ours)."""
        held = self._held(batch_id)
        entry = held.get(batch_id) if held is not None else None
        return decode_state(entry[1], batch_id) if entry is not None else None

    def put(self, state: BatchState) -> None:
        """Remember a state this process just wrote (the topic will echo it later)."""
        held = self._held(state.batch_id)
        if held is not None:
            held[state.batch_id] = (int(time.time() * 1000), state.encode())
            self.update_gauge()

    def apply(self, record: ConsumerRecord[Any, Any]) -> None:
        """A state-topic record read: the batch's latest state, or a tombstone (forget it)."""
        held = self._states.get(record.partition)
        if held is None or record.key is None:
            return
        batch_id = record.key.decode("utf-8", "replace")
        if record.value is None:  # tombstone: forget the batch
            held.pop(batch_id, None)
        else:
            held[batch_id] = (record.timestamp, record.value)

    def waiting(self) -> list[BatchState]:
        """Held batches parked until Datagrid finishes them."""
        found = []
        for held in self._states.values():
            for batch_id, (_, value) in held.items():
                if _WAITING in value:  # a cheap filter; the decoded status decides
                    state = decode_state(value, batch_id)
                    if state is not None and state.status is Status.WAITING:
                        found.append(state)
        return found

    def __len__(self) -> int:
        return sum(len(held) for held in self._states.values())

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
            old = [
                batch_id
                for batch_id, (written, value) in held.items()
                if written < cutoff and _UNFINISHED not in value and _WAITING not in value
            ]
            for batch_id in old:
                del held[batch_id]
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
