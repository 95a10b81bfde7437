"""Which of a stream attempt's lines Kafka acknowledged: the publisher's bookkeeping, per unit.

A :class:`Unit` is what Kafka acknowledges at once: one record batch of one partition, or one dead
letter. :class:`Acks` follows each unit from the moment it is handed to the producer to its
acknowledgement (or refusal), keeps the bytes in flight under a bound, counts each acknowledged
line once into the attempt's ``publish.Progress``, and says, when the attempt ends, up to which
line everything is in Kafka: what the next attempt may skip.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forwarder.errors import ForwarderError

if TYPE_CHECKING:
    from forwarder.publish import Progress

#: Acknowledged units kept before their lines are counted (memory stays flat past it).
_COUNT_EVERY = 64


@dataclass(slots=True)
class Unit:
    """Records acknowledged together: one record batch of one partition, or one dead letter."""

    first_line: int  # the smallest line number in the unit
    before_first: bytes  # bytes of line first_line - 1: the re-stream boundary if this unit fails
    builder: Any = None  # aiokafka BatchBuilder while the unit is open
    future: asyncio.Future[Any] | None = None
    size: int = 0
    dead: bool = False
    numbers: array[int] = field(default_factory=lambda: array("I"))
    labels: list[str] = field(default_factory=list)


class Acks:
    """The units of one stream attempt between the producer and Kafka's acknowledgement."""

    def __init__(
        self,
        progress: Progress,
        max_in_flight: int,
        *,
        refused: Callable[[Unit, BaseException], ForwarderError],
        not_handed_from: Callable[[], int],
        observe_latency: Callable[[float], None],
    ) -> None:
        self.progress = progress
        self.max_in_flight = max_in_flight
        self._refused = refused  # translates a producer's refusal of a unit (publish.py)
        self._not_handed_from = not_handed_from  # first line not yet handed to the producer
        self._observe = observe_latency
        self.in_flight: deque[Unit] = deque()
        self.in_flight_bytes = 0
        self.acked: list[Unit] = []  # acknowledged, not counted yet (see count)
        self.handing: list[Unit] = []  # being handed to the producer: not yet in flight
        self.failed_from: int | None = None  # first line of the earliest unit Kafka refused
        self.failed_boundary = b""
        self.failure: ForwarderError | None = None

    async def hand_over(self, unit: Unit, send: Awaitable[asyncio.Future[Any]]) -> None:
        """Give ``unit`` to the producer and track its acknowledgement.  Whatever the producer
        raises (aiokafka asserts on a partition that vanished), the unit's lines are not in
        Kafka: record it, so the attempt fails and the stream resumes before them."""
        self.handing.append(unit)
        try:
            future = unit.future = await send
        except Exception as exc:
            raise self.failed(unit, exc) from exc
        finally:
            self.handing.remove(unit)
        self.in_flight.append(unit)
        self.in_flight_bytes += unit.size
        sent, observe = time.perf_counter(), self._observe
        future.add_done_callback(lambda _f: observe(time.perf_counter() - sent))

    def failed(self, unit: Unit, exc: BaseException) -> ForwarderError:
        """Kafka refused (or never got) ``unit``: lines from its first on are not acknowledged."""
        if self.failed_from is None or unit.first_line < self.failed_from:
            self.failed_from = unit.first_line
            self.failed_boundary = unit.before_first
        error = self._refused(unit, exc)
        if self.failure is None:
            self.failure = error
        return error

    async def settle(self) -> None:
        """Release what Kafka already acknowledged (memory stays flat), then wait while more than
        the bound is in flight; raise the first refusal, if any."""
        in_flight = self.in_flight
        while in_flight and in_flight[0].future is not None and in_flight[0].future.done():
            await self._ack_oldest()
        while self.in_flight_bytes > self.max_in_flight:
            await self._ack_oldest()
        if self.failure is not None:
            raise self.failure

    async def wait_all(self) -> None:
        """Wait for every unit in flight to be acknowledged or refused."""
        while self.in_flight:
            await self._ack_oldest()

    def close(self, line_no: int, processed_through: int, last_line: bytes) -> None:
        """The attempt is over (everything handed over and answered): count what is in Kafka,
        move the prefix the next attempt may skip, and raise the first refusal, if any."""
        self.count(self.failed_from or line_no + 1, final=True)
        progress = self.progress
        if self.failed_from is not None:
            # Everything before the earliest refused line is in Kafka (or blank).
            if self.failed_from - 1 > progress.acked_through:
                progress.acked_through = self.failed_from - 1
                progress.boundary = self.failed_boundary
        elif processed_through > progress.acked_through:
            progress.acked_through = processed_through
            progress.boundary = last_line
        if self.failure is not None:
            raise self.failure

    async def _ack_oldest(self) -> None:
        unit = self.in_flight.popleft()
        self.in_flight_bytes -= unit.size
        assert unit.future is not None
        try:
            await unit.future
        except Exception as exc:
            self.failed(unit, exc)
            return
        self.acked.append(unit)
        if len(self.acked) >= _COUNT_EVERY:
            self.count(self._unsettled_from(), final=False)

    def _unsettled_from(self) -> int:
        """The first line a failure may still send again (the first of any unit not acked)."""
        pending = [unit.first_line for unit in (*self.handing, *self.in_flight)]
        if self.failed_from is not None:
            pending.append(self.failed_from)
        return min([*pending, self._not_handed_from()])

    def count(self, limit: int, *, final: bool) -> None:
        """Count each acknowledged line before ``limit`` once: lines at or past the earliest
        refused one are published again by the next attempt, which counts them then.  Before the
        end (``final`` false), units holding lines past ``limit`` wait, so memory stays flat."""
        progress = self.progress
        waiting = []
        for unit in self.acked:
            counter = progress.dead_letters if unit.dead else progress.lines
            if unit.numbers[-1] < limit:
                counter.update(unit.labels)
            elif not final:
                waiting.append(unit)
            else:
                counter.update(
                    label
                    for number, label in zip(unit.numbers, unit.labels, strict=True)
                    if number < limit
                )
        self.acked = waiting
