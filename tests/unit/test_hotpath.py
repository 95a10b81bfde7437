"""The compiled hot path and its pure-Python source publish byte-identical records.

``forwarder.hotpath`` is compiled with mypyc in wheel builds and imported from source elsewhere
(``hatch_build.py``). Here both run the real ``Publisher`` on the suite's NDJSON corpus (the hostile
lines of ``tests/test_bad_input.py``, the framing cases of ``tests/test_ndjson.py``, generated
lines of every status, and lines that hit each way out of the loop), chunked at awkward places,
into real aiokafka record batches, and every record (topic, partition, key, value, headers), dead
letters included, every error and the progress must be the same. The compiled module is built
here (``tests/support/hotpath.py``) unless installed; without a compiler the comparison is
skipped, except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import asyncio
import os
import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import forwarder.publish
from forwarder import hotpath
from forwarder.ndjson import UNSET, LineHead, LineSplitter, Oversized, classify, decode_head
from forwarder.observability import Metrics
from forwarder.publish import Batch, Progress, PublishConfig, Publisher
from tests.support.fake_datagrid import generate_lines
from tests.support.hotpath import (
    NoCompiler,
    RecordingProducer,
    Sent,
    compiled_hotpath,
    is_compiled,
    pure_hotpath,
)
from tests.test_bad_input import BAD_STREAM
from tests.test_ndjson import STREAM, chunked

BATCH = "bpred_hotpath"
#: Record limits small enough that the corpus reaches every exit: a results record over 4,000
#: bytes is too large; a line over 8,512 bytes is not even kept (Oversized).
RESULTS_LIMIT, DEAD_LETTER_LIMIT = 4_000, 8_000

CORPUS: list[bytes] = [
    *(line for line, _ in BAD_STREAM),
    *STREAM.split(b"\n"),
    *generate_lines(
        BATCH,
        {"count": 400, "line_bytes": 240, "statuses": ["succeeded", "errored", "expired"]},
    ),
    b'{"custom_id":"other-batch","batch_id":"bpred_other"}',
    b'{"custom_id":"null-batch","batch_id":null}',
    b'{"custom_id":"same-batch","batch_id":"' + BATCH.encode() + b'","status":"succeeded"}',
    b'{"custom_id":"deep","a":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"[" * 100_000,
    b'{"custom_id":"huge-int","n":' + b"9" * 5000 + b"}",
    b'{"custom_id":"caf\xc3\xa9 \xe2\x80\xa8","status":"succeeded"}',  # UTF-8 key, raw U+2028
    b'{"custom_id":"long-status","status":"' + b"s" * 300 + b'"}',  # not a cached status
    b'{"custom_id":"list-status","status":["a"]}',
    b'{"custom_id":"too-large-record","status":"succeeded","pad":"' + b"x" * 5000 + b'"}',
    b'{"custom_id":"almost-oversized","pad":"' + b"y" * 8400 + b'"}',
    b"\r",
    b"",
    b"\xef\xbb\xbf",
    b'{"custom_id":"after-bom","status":"errored"}',
]


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    """The mypyc build of the hot path (built here if the package is not installed from one)."""
    try:
        module = compiled_hotpath()
    except NoCompiler as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must test the compiled hot path: {exc}")
        pytest.skip(str(exc))
    assert is_compiled(module), module.__file__
    return module


@dataclass
class Outcome:
    """Everything one publishing run leaves behind."""

    sent: list[Sent]
    error: tuple[str, str] | None
    progress: Progress
    position: tuple[int, int, bytes]  # line_no, processed_through, last_line
    batches: int  # record batches handed over


def chunks(lines: list[bytes], seed: int) -> Iterator[list[bytes | Oversized]]:
    """The lines as a body cut at random places, through the splitter (so Oversized appears)."""
    body = b"".join(line + b"\n" for line in lines)
    cuts = random.Random(seed).sample(range(len(body)), 60)
    splitter = LineSplitter(max(RESULTS_LIMIT, DEAD_LETTER_LIMIT) + 512)
    for piece in chunked(body, cuts):
        if split := splitter.feed(piece):
            yield split
    if tail := splitter.close():
        yield tail


def publish(
    module: ModuleType,
    lines: list[bytes],
    *,
    batch: Batch | None = None,
    progress: Progress | None = None,
    cloudevents: bool = True,
    seed: int = 1,
) -> Outcome:
    """Publish ``lines`` with ``module`` as the hot path on a recording producer."""
    config = PublishConfig(
        results_topic="results",
        dead_letter_topic="dead",
        results_limit=RESULTS_LIMIT,
        dead_letter_limit=DEAD_LETTER_LIMIT,
        max_in_flight=1 << 20,
        linger=60.0,
        metrics=Metrics(CollectorRegistry(), process=False),
        cloudevents=cloudevents,
    )
    batch = batch or Batch(BATCH, "evt_1", time="2026-12-07T00:00:00Z")
    progress = progress or Progress()
    producer = RecordingProducer(batch_size=2048)  # small: full record batches are common

    async def run() -> Outcome:
        publisher = Publisher(config, producer, batch, progress, 6)  # type: ignore[arg-type]
        error = None
        try:
            for split in chunks(lines, seed):
                await publisher.publish(split)
        except Exception as exc:
            error = (type(exc).__name__, str(exc))
        await publisher.drain()
        position = (publisher.line_no, publisher.processed_through, publisher.last_line)
        return Outcome(producer.sent, error, progress, position, producer.batches)

    saved = forwarder.publish.hotpath
    forwarder.publish.hotpath = module
    try:
        return asyncio.run(run())
    finally:
        forwarder.publish.hotpath = saved


def assert_same(pure: Outcome, compiled: Outcome) -> None:
    """Byte-identical records in the same order, the same error and the same progress."""
    assert len(compiled.sent) == len(pure.sent)
    for number, (want, got) in enumerate(zip(pure.sent, compiled.sent, strict=True)):
        assert got == want, f"record {number}"
    assert compiled.error == pure.error
    assert compiled.progress == pure.progress
    assert compiled.position == pure.position


SCENARIOS: dict[str, dict[str, Any]] = {
    "whole corpus": {},
    "cloudevents off": {"cloudevents": False},
    "other chunking": {"seed": 7},
    # More result lines than the batch's total: refused past it.
    "past the total": {"batch": Batch(BATCH, None, expected_lines=300, time="t")},
    # A runaway stream: more lines of any kind than the bound.
    "too many lines": {"batch": Batch(BATCH, None, max_lines=200, time="t")},
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_compiled_and_pure_publish_the_same_records(compiled: ModuleType, scenario: str) -> None:
    """Records and dead letters, byte for byte, and how the run ended."""
    options = SCENARIOS[scenario]
    pure = publish(pure_hotpath(), CORPUS, **options)
    assert pure.sent, "the corpus publishes records"
    assert_same(pure, publish(compiled, CORPUS, **options))


def test_every_way_out_of_the_loop_is_taken() -> None:
    """The corpus reaches each stop of the hot path (else the comparison proves less)."""
    outcome = publish(pure_hotpath(), CORPUS)
    dead = [dict(s.headers) for s in outcome.sent if s.topic == "dead"]
    reasons = {headers["forwarder-error"] for headers in dead}
    assert reasons == {
        b"invalid_json",
        b"not_an_object",
        b"missing_custom_id",
        b"batch_id_mismatch",
        b"too_large",
    }
    details = [headers["forwarder-error-detail"] for headers in dead]
    assert any(b"exceeds the limit" in detail for detail in details)  # an Oversized line
    assert any(b"max.message.bytes" in detail for detail in details)  # a record too large
    assert outcome.progress.blank_lines >= 3 and outcome.error is None
    results = [s for s in outcome.sent if s.topic == "results"]
    assert len({s.partition for s in results}) == 6
    assert outcome.batches > 3 * 6, "full record batches are handed over mid-chunk"


@pytest.mark.parametrize("diverge", [False, True], ids=["resumed", "diverged"])
def test_a_second_attempt_skips_or_diverges_the_same(compiled: ModuleType, diverge: bool) -> None:
    """After an attempt that got through line 250, the next skips what is in Kafka (or finds a
    different line there and starts over) the same way in both builds."""
    outcomes = []
    for module in (pure_hotpath(), compiled):
        first = publish(module, CORPUS)
        progress = first.progress
        progress.acked_through = 250
        progress.boundary = b"something else" if diverge else _line(250)
        outcomes.append(publish(module, CORPUS, progress=progress, seed=3))
    assert_same(*outcomes)
    assert (outcomes[0].error is not None) == diverge


def _line(number: int) -> bytes:
    """Line ``number`` of the corpus as the splitter gives it (an Oversized one's prefix)."""
    lines = [line for split in chunks(CORPUS, 1) for line in split]
    line = lines[number - 1]
    return line.prefix if isinstance(line, Oversized) else line


@pytest.mark.parametrize("build", ["pure", "compiled"])
def test_the_hot_path_accepts_exactly_what_classify_accepts(
    build: str, request: pytest.FixtureRequest
) -> None:
    """A line goes to the results topic iff ``classify`` gives its head: the hot path's own check
    and classify's reasons (the dead letters' detail) can never disagree."""
    module = pure_hotpath() if build == "pure" else request.getfixturevalue("compiled")
    for line in [*CORPUS, b"{}", b'{"custom_id":"a"} ', b'{"custom_id":"\\u00e9"}']:
        if not line.strip(hotpath.WHITESPACE):
            continue  # blank: never classified
        stop = _stop_for(module, line)
        accepted = isinstance(classify(line, BATCH), LineHead)
        assert (stop != module.REFUSED) == accepted, line[:80]


class _Unit:
    def __init__(self) -> None:
        self.builder = RecordingProducer().create_batch()
        self.numbers = array("I")
        self.labels: list[str] = []


def _stop_for(module: ModuleType, line: bytes) -> int:
    """Why ``module``'s loop stops at a single ``line`` (DONE: it was appended)."""
    hooks = module.Hooks(
        decode_head,
        lambda status: (b"", "other"),
        lambda status: (),
        lambda partition, n, before: _Unit(),
        lambda key, seed: 0,
    )
    lines = module.Lines(BATCH, hooks, UNSET, 0)
    lines.max_lines, lines.limit, lines.open_units = 10, 1 << 20, [None]
    lines.run([line], 0)
    return int(lines.stop)
