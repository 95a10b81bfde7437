"""Counting what a consumer saw against what a case expected (the fault suites, the scale and
Kubernetes runs, and ``bench/scaling.py``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass
class Tally:
    """What a read_committed consumer saw of the lines one case expected."""

    expected: int  # distinct (batch, custom_id) keys that must be in the results topic
    seen: int  # of those, how many are there at least once
    duplicates: int  # extra copies of expected keys (records - distinct keys)
    unexpected: int  # records whose key no case expected, or whose bytes differ from the line
    lost: int  # expected - seen

    @classmethod
    def of(
        cls,
        records: Iterable[tuple[str, bytes | None, bytes | None]],
        expected: Mapping[tuple[str, bytes], bytes],
    ) -> Tally:
        """Count ``(batch id, key, value)`` records against ``{(batch id, key): line bytes}``."""
        copies: Counter[tuple[str, bytes]] = Counter()
        unexpected = 0
        for batch_id, key, value in records:
            wanted = expected.get((batch_id, key or b""))
            if wanted is None or value != wanted:
                unexpected += 1
            else:
                copies[(batch_id, key or b"")] += 1
        seen = len(copies)
        return cls(
            expected=len(expected),
            seen=seen,
            duplicates=sum(copies.values()) - seen,
            unexpected=unexpected,
            lost=len(expected) - seen,
        )
