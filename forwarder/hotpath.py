"""The publisher's per-line work, one call per chunk: numbering, skipping, blank lines, the routing
head, headers, the partition and the append to the partition's open record batch.

:meth:`Lines.run` is synchronous and goes through a chunk until a line needs something only the
async :class:`forwarder.publish.Publisher` can do (a dead letter, a full record batch to hand
over, an error to raise); it then stops with the line's index and says why in :attr:`Lines.stop`,
and the publisher resumes after that line.

Wheel builds compile this module with mypyc (``hatch_build.py``); this same file, imported when
no compiled module sits beside it (an editable install, a platform without a compiler), is the
pure-Python fallback, and ``tests/unit/test_hotpath.py`` proves both write the same records and
dead letters. Hence the rules here: it imports only the standard library (mypyc type-checks
every import, and the build environment has nothing else), stays mypy-strict with concrete types
(``dict``, ``int``, ``bytes``: what mypyc turns into C), and takes what lives elsewhere (the
msgspec decoder, murmur2, the producer's record batches) as callables bound once per attempt.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

#: What a blank line may hold (the same bytes as ``forwarder.ndjson.is_blank``).
WHITESPACE: Final = b" \t\r\n\f\v"

# Why :meth:`Lines.run` stopped at a line (``Lines.stop``), and so what the publisher does.
DONE: Final = 0  # every line of the chunk is handled
TOO_MANY_LINES: Final = 1  # past the batch's line bound: a runaway stream
DIVERGED: Final = 2  # a re-streamed line differs from what the last attempt published there
PAST_TOTAL: Final = 3  # more result lines than the batch's total
OVERSIZED: Final = 4  # longer than any topic takes: dead letter (too_large)
REFUSED: Final = 5  # not a routable result line: ``ndjson.classify`` says why (dead letter)
TOO_LARGE: Final = 6  # its record would exceed the results topic's limit: dead letter
FULL: Final = 7  # its partition's record batch is full: hand it over, then append the record


class Oversize(Protocol):
    """A line too long to keep (``forwarder.ndjson.Oversized``): its first bytes."""

    @property
    def prefix(self) -> bytes: ...


class Head(Protocol):
    """A line's routing head as decoded (``forwarder.ndjson.LineHead``)."""

    @property
    def custom_id(self) -> object: ...
    @property
    def status(self) -> object: ...
    @property
    def batch_id(self) -> object: ...


class Unit(Protocol):
    """An open record batch of one partition (``forwarder.acks.Unit``)."""

    builder: Any  # aiokafka's BatchBuilder
    numbers: array[int]
    labels: list[str]


#: Header name and value, as aiokafka's record encoder takes them.
Header = tuple[str, bytes]


class Hooks:
    """What the per-line loop calls outside this module, bound once per attempt."""

    def __init__(
        self,
        decode_head: Callable[[bytes], Head],
        status_of: Callable[[object], tuple[bytes, str]],
        heads_for: Callable[[bytes], tuple[Header, ...]],
        open_unit: Callable[[int, int, bytes], Unit],
        murmur2: Callable[[bytes, int], int],
    ) -> None:
        #: msgspec's typed decoder of the head (raises on anything that is not one).
        self.decode_head = decode_head
        #: ``datagrid-status`` header value and metric label of a status not cached yet.
        self.status_of = status_of
        #: A status's fixed result headers, when not cached yet.
        self.heads_for = heads_for
        #: Opens a partition's record batch: (partition, first line, bytes of the line before).
        self.open_unit = open_unit
        #: murmur2(key, seed), Kafka's partitioner hash.
        self.murmur2 = murmur2


class Lines:
    """One stream attempt's line loop, and where it stands between chunks."""

    def __init__(self, batch_id: str, hooks: Hooks, unset: object, seed: int) -> None:
        self.batch_id = batch_id
        self.hooks = hooks
        self.unset = unset  # msgspec.UNSET: a head without batch_id
        self.seed = seed  # murmur2's seed
        # Bounds of the attempt (``configure``).
        self.skip_through = 0
        self.boundary = b""
        self.first_new = 0
        self.expected = -1  # the batch's result lines; -1: unknown
        self.max_lines = 0
        # How a result record is made (``configure``).
        self.limit = 0
        self.fixed_size = 0
        self.ce_id = b""
        self.open_units: Sequence[Unit | None] = ()
        self.statuses: dict[str, tuple[bytes, str]] = {}
        self.heads: dict[bytes, tuple[Header, ...]] = {}
        # Where the attempt stands: the last line read, the last fully handled and its bytes,
        # and the blank lines counted.
        self.line_no = 0
        self.processed = 0
        self.last = b""
        self.blank = 0
        # Why the last run stopped and, for TOO_LARGE and FULL, what it had computed.
        self.stop = DONE
        self.size = 0
        self.status: object = None
        self.key = b""
        self.headers: list[Header] = []
        self.partition = 0
        self.label = ""

    def run(self, lines: Sequence[bytes | Oversize], start: int) -> int:  # noqa: C901 - the per-line path, flat on purpose
        """Handle ``lines`` from ``start`` on; return the index of the line it stopped at (its
        number counted, ``stop`` saying why), or ``len(lines)`` with ``stop`` DONE."""
        skip_through, boundary, first_new = self.skip_through, self.boundary, self.first_new
        expected, max_lines = self.expected, self.max_lines
        batch_id, unset = self.batch_id, self.unset
        limit, fixed_size, ce_id = self.limit, self.fixed_size, self.ce_id
        partitions = len(self.open_units)
        open_units, statuses, heads = self.open_units, self.statuses, self.heads
        hooks = self.hooks
        decode_head, status_of, heads_for = hooks.decode_head, hooks.status_of, hooks.heads_for
        open_unit, murmur2, seed = hooks.open_unit, hooks.murmur2, self.seed
        n, last, blank, processed = self.line_no, self.last, self.blank, self.processed
        stop = DONE
        end = len(lines)
        i = start
        while i < end:
            item = lines[i]
            n += 1
            if n > max_lines:
                stop = TOO_MANY_LINES
                break
            if n <= skip_through:  # already in Kafka: check the re-stream matches, skip it
                last = item if isinstance(item, bytes) else item.prefix
                if n == skip_through and last != boundary:
                    stop = DIVERGED
                    break
                processed = n
                i += 1
                continue
            new = n > first_new
            past_total = new and expected >= 0 and n - 1 - blank >= expected
            if not isinstance(item, bytes):
                stop = PAST_TOTAL if past_total else OVERSIZED
                break
            line: bytes = item
            if not line or (line[0] in WHITESPACE and not line.strip(WHITESPACE)):
                if new:
                    blank += 1
                last, processed = line, n
                i += 1
                continue
            if past_total:  # refused before it reaches Kafka
                stop = PAST_TOTAL
                break
            # The routing head; any doubt stops here and ndjson.classify says why (its reasons,
            # checked in this order: JSON, UTF-8, custom_id, batch_id).
            try:
                head = decode_head(line)
            except Exception:
                stop = REFUSED
                break
            if not line.isascii():
                try:
                    line.decode()
                except UnicodeDecodeError:
                    stop = REFUSED
                    break
            custom_id = head.custom_id
            if not isinstance(custom_id, str) or not custom_id:
                stop = REFUSED
                break
            line_batch = head.batch_id
            if line_batch is not unset and line_batch != batch_id:
                stop = REFUSED
                break
            key = custom_id.encode()
            status = head.status
            known = statuses.get(status) if isinstance(status, str) else None
            status_bytes, label = known if known is not None else status_of(status)
            size = len(line) + len(key) + len(status_bytes) + fixed_size
            if size > limit:
                self.size, self.status = size, status
                stop = TOO_LARGE
                break
            fixed = heads.get(status_bytes)
            if fixed is None:
                fixed = heads_for(status_bytes)
            # A list: aiokafka's C encoder takes no tuple.
            headers = [*fixed, ("datagrid-line", b"%d" % n)]
            if ce_id:
                headers.append(("ce_id", b"%s%d" % (ce_id, n)))
            partition = (murmur2(key, seed) & 0x7FFFFFFF) % partitions
            unit = open_units[partition]
            if unit is None:
                unit = open_unit(partition, n, last)
            if unit.builder.append(key=key, value=line, timestamp=None, headers=headers) is None:
                self.key, self.headers, self.partition, self.label = key, headers, partition, label
                stop = FULL
                break
            unit.numbers.append(n)
            unit.labels.append(label)
            last, processed = line, n
            i += 1
        self.line_no, self.last, self.blank, self.processed = n, last, blank, processed
        self.stop = stop
        return i
