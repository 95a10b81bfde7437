"""A pod's memory against the states it holds (``tests/test_scale.py`` and ``bench/scaling.py``).

Issue 23's target: after any rebalance, each pod's RSS is at most an empty pod's RSS plus 1.25
times the memory of the states it holds, where the memory of a state is measured in the same run
on one pod that holds every state: ``(its RSS - an empty pod's RSS) / states``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from forwarder.kafka import partition_for

#: How far above its share a pod may sit (the issue's 1.25x).
SLACK = 1.25


def vm_rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` now (``VmRSS``, KiB); 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def per_state_bytes(full_rss_mb: float, empty_rss_mb: float, states: int) -> float:
    """The memory of one state: a pod holding ``states`` states above an empty pod, per state."""
    return (full_rss_mb - empty_rss_mb) * 1e6 / states


def rss_bound_mb(empty_rss_mb: float, state_bytes: float, held: int) -> float:
    """The most RSS (MB) a pod holding ``held`` states may have."""
    return empty_rss_mb + SLACK * state_bytes * held / 1e6


def states_per_partition(ids: Iterable[str], partitions: int) -> Counter[int]:
    """How many of ``ids`` fall in each partition (murmur2, as the state topic is keyed)."""
    return Counter(partition_for(batch_id.encode(), partitions) for batch_id in ids)
