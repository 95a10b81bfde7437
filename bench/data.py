"""The data every contender forwards, and the records it must leave on the results topic.

The fake Datagrid generates the lines on the fly (``tests/support/fake_datagrid.py``):
``line_bytes``-byte JSON lines (plus ``\\n``) whose ``custom_id`` cycles through ``distinct_ids``
values, served in 64 KiB chunks.  The same spec gives the same ``custom_id`` sequence whatever the
batch id, so the expected records per partition are computed once per spec.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import msgspec

from forwarder.kafka import partition_for
from tests.support.fake_datagrid import generate_lines

#: The chunk size the fake serves the body in.
CHUNK = 65_536


@dataclass(frozen=True)
class Workload:
    """What the fake serves for one batch."""

    lines: int
    line_bytes: int = 300
    distinct_ids: int = 50_000

    def spec(self) -> dict[str, Any]:
        """The fake's ``generate`` spec."""
        return {
            "count": self.lines,
            "line_bytes": self.line_bytes,
            "distinct_ids": self.distinct_ids,
        }


@functools.cache
def expected_counts(work: Workload, partitions: int) -> tuple[int, ...]:
    """Records per partition that Kafka's murmur2 partitioner gives for the served custom_ids."""
    per = [0] * partitions
    distinct = min(work.lines, work.distinct_ids)
    cycles, rest = divmod(work.lines, work.distinct_ids)
    sample = generate_lines("bpred_x", {**work.spec(), "count": distinct})
    for i, line in enumerate(sample):
        custom_id = msgspec.json.decode(line)["custom_id"].encode()
        per[partition_for(custom_id, partitions)] += cycles + (1 if i < rest else 0)
    return tuple(per)
