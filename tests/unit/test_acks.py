"""Acknowledgement bookkeeping (``forwarder.acks``): counted once, and what the next try skips."""

from __future__ import annotations

import asyncio

import pytest

from forwarder.acks import Acks, Unit
from forwarder.errors import ForwarderError, KafkaError
from forwarder.publish import Progress


def unit(first: int, last: int, *, dead: bool = False) -> Unit:
    made = Unit(first, f"line {first - 1}".encode(), size=10, dead=dead)
    for n in range(first, last + 1):
        made.numbers.append(n)
        made.labels.append("invalid_json" if dead else "succeeded")
    return made


async def sent(outcome: BaseException | None) -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
    return future


def acks_for(progress: Progress) -> Acks:
    def refused(unit: Unit, exc: BaseException) -> ForwarderError:
        return KafkaError(f"refused from {unit.first_line}: {exc}")

    return Acks(
        progress,
        1_000,
        refused=refused,
        not_handed_from=lambda: 10**9,
        observe_latency=lambda _s: None,
    )


async def test_all_acknowledged_lines_are_counted_once_and_skippable() -> None:
    """Every unit acknowledged: each line counted once, the whole prefix skippable next time."""
    progress = Progress()
    acks = acks_for(progress)
    for first, last, dead in ((1, 3, False), (4, 4, True), (5, 9, False)):
        await acks.hand_over(unit(first, last, dead=dead), sent(None))
    await acks.wait_all()
    acks.close(line_no=9, processed_through=9, last_line=b"line 9")
    assert progress.lines == {"succeeded": 8} and progress.dead_letters == {"invalid_json": 1}
    assert progress.acked_through == 9 and progress.boundary == b"line 9"


async def test_a_refused_unit_stops_the_prefix_before_it() -> None:
    """Lines from the earliest refused unit on are neither counted nor skippable: the next
    attempt sends them again and counts them then; the refusal is raised."""
    progress = Progress()
    acks = acks_for(progress)
    await acks.hand_over(unit(1, 3), sent(None))
    await acks.hand_over(unit(4, 6), sent(OSError("broker gone")))
    await acks.hand_over(unit(7, 9), sent(None))
    await acks.wait_all()
    with pytest.raises(KafkaError, match="refused from 4"):
        acks.close(line_no=9, processed_through=9, last_line=b"line 9")
    assert progress.lines == {"succeeded": 3}
    assert progress.acked_through == 3 and progress.boundary == b"line 3"


async def test_a_producer_that_raises_on_hand_over_records_the_unit() -> None:
    """A send that raises (a partition that vanished) is a refusal of that unit's lines."""
    progress = Progress()
    acks = acks_for(progress)

    async def broken() -> asyncio.Future[None]:
        raise AssertionError("partition 5 unknown")

    with pytest.raises(KafkaError):
        await acks.hand_over(unit(2, 4), broken())
    assert acks.failed_from == 2 and not acks.handing and not acks.in_flight
