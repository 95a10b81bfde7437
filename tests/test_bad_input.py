"""Bad input is refused or dead-lettered, never crashes anything, never reaches a URL.

Pure properties (framing, classification, webhook signatures) run in-process; everything else goes
through the real pipeline: the real broker, the fake Datagrid over HTTP, and one real
``forwarder serve`` process shared by this module (and the real ``forwarder`` command line).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from hypothesis import example, given, settings
from hypothesis import strategies as st

from forwarder.api import PROBLEM_BASE
from forwarder.config import Settings
from forwarder.core import open_core
from forwarder.errors import SignatureError
from forwarder.ndjson import LineHead, Oversized, classify
from forwarder.observability import Metrics
from forwarder.topics import topic_partitions
from forwarder.webhooks import sign, verify_signature
from tests.conftest import API_KEY, REPO, settings_for
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.kafka_helpers import Record, read_topic
from tests.support.service_helpers import (
    API_TOKEN,
    Forwarder,
    event_body,
    wait_until,
)
from tests.test_ndjson import chunked, split_all

TOLERANCE = 300
MAX_BODY = 8192  # FORWARDER_WEBHOOK_MAX_BODY_BYTES of this module's service

# Batch ids that must never reach a URL. Each is refused by every way in.
BAD_IDS: dict[str, str] = {
    "slash": "a/b",
    "dotdot": "..",
    "traversal": "../etc/passwd",
    "query": "a?b=1",
    "percent": "a%2Fb",
    "hash": "a#b",
    "space": "a b",
    "leading-space": " bpred_1",
    "dot": "bpred.1",
    "unicode": "bpred_\u00e9",
    "arabic-digits": "\u0663\u0663",
    "fullwidth": "\uff41\uff42",
    "empty": "",
    "129-chars": "x" * 129,
    "trailing-newline": "bpred_1\n",
    "crlf": "bpred_1\r\nX-Injected: 1",
    "tab": "bpred\t1",
}


def new_batch_id() -> str:
    return f"bpred_{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------------------------
# Framing: any chunking gives the same lines, also past the size cap (pure)
# ------------------------------------------------------------------------------------------------


def expected_lines(contents: list[bytes], max_line: int) -> list[bytes | Oversized]:
    """What the splitter must return for these line contents, however the stream is cut."""
    return [
        Oversized(line[:max_line], len(line)) if len(line) > max_line else line for line in contents
    ]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").rstrip(b"\r")), max_size=12
    ),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
    st.integers(min_value=1, max_value=16),
    st.lists(st.integers(min_value=0, max_value=1_000), max_size=20),
)
@example([b"x" * 10], b"\r\n", True, 10, [5])  # exactly the cap, CRLF, cut inside the line
@example([b"y" * 12], b"\r\n", True, 10, [3])  # over the cap, CRLF, cut inside the line
@example([b"x" * 10], b"\r\n", False, 10, [])  # exactly the cap, final line ends with a lone CR
def test_any_chunking_gives_the_same_lines_also_past_the_cap(
    contents: list[bytes], ending: bytes, trailing: bool, max_line: int, cuts: list[int]
) -> None:
    """However a stream is cut, each line (or its Oversized prefix and true size) is the same."""
    if not contents:
        return
    if not trailing and ending == b"\n" and not contents[-1]:
        trailing = True  # an empty last line needs its terminator to exist at all
    data = ending.join(contents) + (ending if trailing else b"")
    if not trailing and ending == b"\r\n":
        data += b"\r"  # a final CR with no LF is still a terminator, not content
    want = expected_lines(contents, max_line)
    assert split_all([data], max_line) == want
    assert split_all(chunked(data, cuts), max_line) == want


# ------------------------------------------------------------------------------------------------
# Classification: the reason always agrees with a strict JSON oracle (pure)
# ------------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False


def oracle(line: bytes, batch_id: str) -> str | None:
    """The contract's dead-letter reason for a line, from Python's strict JSON parser (None: valid).

    A string with an unpaired surrogate cannot become UTF-8, so such a document is not usable JSON.
    """
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "invalid_json"
    if _has_lone_surrogate(value):
        return "invalid_json"
    if not isinstance(value, dict):
        return "not_an_object"
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_custom_id"
    if "batch_id" in value and value["batch_id"] != batch_id:
        return "batch_id_mismatch"
    return None


def reason_of(line: bytes, batch_id: str) -> str | None:
    result = classify(line, batch_id)
    return None if isinstance(result, LineHead) else result[0]


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_objects = st.builds(
    lambda head, rest: {**rest, **head},
    st.fixed_dictionaries(
        {},
        optional={
            "custom_id": st.text(max_size=5) | _values,
            "batch_id": st.sampled_from(["bpred_1", "bpred_2"]) | _values,
            "status": st.sampled_from(["succeeded", "errored"]) | _values,
        },
    ),
    st.dictionaries(st.text(max_size=4), _values, max_size=2),
)
_documents = st.builds(
    lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode(),
    _objects | _values,
    st.booleans(),
)


def _mutate(doc: bytes, where: int, how: str, byte: bytes) -> bytes:
    i = where % (len(doc) + 1)
    if how == "truncate":
        return doc[:i]
    if how == "insert":
        return doc[:i] + byte + doc[i:]
    return doc[:i] + doc[i + 1 :]


_lines = st.one_of(
    _documents,
    st.builds(
        _mutate,
        _documents,
        st.integers(min_value=0, max_value=200),
        st.sampled_from(["truncate", "insert", "delete"]),
        st.binary(min_size=1, max_size=1),
    ),
    st.binary(max_size=60),
)


@settings(max_examples=1500, deadline=None)
@given(_lines)
@example(b"[1,2")  # truncated array: not JSON at all
@example(b"[" * 100_000)  # 100k unclosed brackets
@example(b'"ok" trailing')
@example(b'{"custom_id":"\\ud800"}')  # lone surrogate, escaped
@example(b'{"custom_id":"a\\u0000b"}')  # escaped NUL: valid
@example(b'{"custom_id":"a","batch_id":[1e400]}')  # a number past double range is still JSON
@example(b'{"custom_id":"a","note":"\xff"}')  # invalid UTF-8 in a field nobody decodes
def test_classification_agrees_with_a_strict_json_oracle(line: bytes) -> None:
    """invalid_json / not_an_object / missing_custom_id / batch_id_mismatch / valid, exactly as
    the contract defines them (checked against Python's strict parser)."""
    assert reason_of(line, "bpred_1") == oracle(line, "bpred_1"), line[:200]


# ------------------------------------------------------------------------------------------------
# Webhook signatures: any change to a signed request is refused (pure)
# ------------------------------------------------------------------------------------------------

_secrets = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00,"),  # like values from the env
    min_size=1,
    max_size=40,
).map(lambda s: s.encode())
_timestamps = st.integers(min_value=1_000_000_000, max_value=4_000_000_000)
_skews = st.integers(min_value=-TOLERANCE, max_value=TOLERANCE)


def _verify(header: str, body: bytes, secrets: list[bytes], now: float) -> int:
    return verify_signature(header, body, secrets, now=now, tolerance=TOLERANCE)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), _secrets, _timestamps, _skews)
def test_an_unchanged_signed_request_verifies(
    body: bytes, secret: bytes, t: int, skew: int
) -> None:
    """What Datagrid signs verifies, within the tolerance either way."""
    header = f"t={t},v1={sign(secret, t, body)}"
    assert _verify(header, body, [b"whsec_other", secret], t + skew) == t


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=300), _secrets, _timestamps, st.data())
def test_flipping_any_bit_of_the_body_is_refused(
    body: bytes, secret: bytes, t: int, data: st.DataObject
) -> None:
    """Any single bit flipped anywhere in the body makes the signature fail."""
    header = f"t={t},v1={sign(secret, t, body)}"
    index = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    altered = bytearray(body)
    altered[index] ^= 1 << bit
    with pytest.raises(SignatureError):
        _verify(header, bytes(altered), [secret], t)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), _secrets, _timestamps, st.data())
def test_changing_any_byte_or_the_length_of_the_body_is_refused(
    body: bytes, secret: bytes, t: int, data: st.DataObject
) -> None:
    """A replaced, inserted or removed byte anywhere in the body makes the signature fail."""
    header = f"t={t},v1={sign(secret, t, body)}"
    altered = data.draw(
        st.binary(max_size=301).filter(lambda b: b != body)
        | st.builds(
            _mutate,
            st.just(body),
            st.integers(0, 300),
            st.sampled_from(["truncate", "insert", "delete"]),
            st.binary(min_size=1, max_size=1),
        ).filter(lambda b: b != body)
    )
    with pytest.raises(SignatureError):
        _verify(header, altered, [secret], t)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), _secrets, _timestamps, _skews, st.data())
def test_changing_the_timestamp_is_refused(
    body: bytes, secret: bytes, t: int, skew: int, data: st.DataObject
) -> None:
    """Another ``t`` (even one still within the tolerance) does not match the signature."""
    other = data.draw(_timestamps.filter(lambda x: x != t))
    header = f"t={other},v1={sign(secret, t, body)}"
    with pytest.raises(SignatureError):
        _verify(header, body, [secret], other + skew)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), _secrets, _timestamps, st.data())
def test_changing_any_hex_digit_of_v1_is_refused(
    body: bytes, secret: bytes, t: int, data: st.DataObject
) -> None:
    """Any one hex digit of ``v1`` changed to another value (either case) fails."""
    v1 = sign(secret, t, body)
    index = data.draw(st.integers(min_value=0, max_value=len(v1) - 1))
    digit = data.draw(
        st.sampled_from("0123456789abcdefABCDEF").filter(lambda d: d.lower() != v1[index])
    )
    forged = v1[:index] + digit + v1[index + 1 :]
    with pytest.raises(SignatureError):
        _verify(f"t={t},v1={forged}", body, [secret], t)
    truncated = v1[:index]
    with pytest.raises(SignatureError):
        _verify(f"t={t},v1={truncated or '0'}", body, [secret], t)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), _secrets, st.lists(_secrets, min_size=1, max_size=3), _timestamps)
def test_a_signature_made_with_another_secret_is_refused(
    body: bytes, secret: bytes, configured: list[bytes], t: int
) -> None:
    """A request signed with a secret that is not configured fails against every configured one."""
    if secret in configured:
        return
    header = f"t={t},v1={sign(secret, t, body)}"
    with pytest.raises(SignatureError):
        _verify(header, body, configured, t)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), _secrets, _timestamps, st.integers(min_value=1, max_value=10**6))
def test_a_stale_or_future_signature_is_refused(
    body: bytes, secret: bytes, t: int, beyond: int
) -> None:
    """A correct signature outside the tolerance (past or future) fails."""
    header = f"t={t},v1={sign(secret, t, body)}"
    for now in (t + TOLERANCE + beyond, t - TOLERANCE - beyond):
        with pytest.raises(SignatureError):
            _verify(header, body, [secret], now)


# ------------------------------------------------------------------------------------------------
# End to end: any chunk size served by the fake gives the same records in Kafka
# ------------------------------------------------------------------------------------------------

# (line, expected): "blank", ("results", key, status) or ("dlq", reason)
CHUNK_STREAM: list[tuple[bytes, Any]] = [
    (
        '{"custom_id":"a","status":"succeeded","t":"caf\u00e9 \u2028 \u0085 \U0001f600"}'.encode(),
        ("results", b"a", b"succeeded"),
    ),
    (b"", "blank"),
    (b"  \t", "blank"),
    (b'{"custom_id":"b","status":"errored","error":{"status":422}}', ("results", b"b", b"errored")),
    (b'{"custom_id": "broken"', ("dlq", "invalid_json")),
    (b"\xff\xfe\xfd\xc3", ("dlq", "invalid_json")),
    (b"[1,2,3]", ("dlq", "not_an_object")),
    (b'{"custom_id":7}', ("dlq", "missing_custom_id")),
    (b'{"custom_id":"c","batch_id":"bpred_someone_else"}', ("dlq", "batch_id_mismatch")),
    (
        '{"custom_id":"\u2603\u00e9","status":"canceled"}'.encode(),
        ("results", "\u2603\u00e9".encode(), b"canceled"),
    ),
    (b'{"custom_id":"d","status":"expired","s":"\\r\\n\\u2028"}', ("results", b"d", b"expired")),
]


async def _forward_and_read(
    settings_: Settings, batch: str
) -> tuple[Any, list[Record], list[Record]]:
    async with open_core(settings_, Metrics(process=False)) as core:
        state = await core.pipeline.forward(batch)
    bootstrap = settings_.kafka_bootstrap_servers
    results = await read_topic(bootstrap, settings_.results_topic)
    dead = await read_topic(bootstrap, settings_.dead_letter_topic)
    mine = batch.encode()
    return (
        state,
        [r for r in results if r.headers["datagrid-batch-id"] == mine],
        [r for r in dead if r.headers["datagrid-batch-id"] == mine],
    )


@pytest.fixture(scope="module")
def chunk_settings(kafka_bootstrap: str, fake_datagrid: FakeDatagrid) -> Settings:
    """Topics shared by every example of the chunking test (records are told apart by batch)."""
    return settings_for(kafka_bootstrap, fake_datagrid)


@settings(max_examples=4, deadline=None)
@given(
    chunk_size=st.integers(min_value=1, max_value=400) | st.sampled_from([2, 3, 7, 65536]),
    ending=st.sampled_from(["\n", "\r\n"]),
    trailing=st.booleans(),
)
@example(chunk_size=1, ending="\r\n", trailing=False)
def test_any_chunk_size_gives_the_same_records_in_kafka(
    chunk_settings: Settings,
    fake_datagrid: FakeDatagrid,
    chunk_size: int,
    ending: str,
    trailing: bool,
) -> None:
    """Served in chunks of any size, a stream gives byte-identical records, keys, headers and
    dead letters in the real broker."""
    batch = new_batch_id()
    fake_datagrid.configure(
        batch,
        lines=[line for line, _ in CHUNK_STREAM],
        chunk_size=chunk_size,
        line_ending=ending,
        trailing_newline=trailing,
    )
    state, results, dead = asyncio.run(_forward_and_read(chunk_settings, batch))
    assert state.status == "forwarded"
    got_results = {int(r.headers["datagrid-line"]): r for r in results}
    got_dead = {int(r.headers["datagrid-line"]): r for r in dead}
    want_results = {
        n: e for n, (_, e) in enumerate(CHUNK_STREAM, 1) if e != "blank" and e[0] == "results"
    }
    want_dead = {n: e for n, (_, e) in enumerate(CHUNK_STREAM, 1) if e != "blank" and e[0] == "dlq"}
    assert sorted(got_results) == sorted(want_results)
    assert sorted(got_dead) == sorted(want_dead)
    for n, (_, key, status) in want_results.items():
        record = got_results[n]
        assert record.value == CHUNK_STREAM[n - 1][0] and record.key == key
        ours = {k: v for k, v in record.headers.items() if not k.startswith("ce_")}
        assert ours == {
            "datagrid-batch-id": batch.encode(),
            "datagrid-status": status,
            "datagrid-line": str(n).encode(),
            "content-type": b"application/json",
        }
        assert record.headers["ce_id"] == f"{batch}:{n}".encode()  # the rest: the record audit
    for n, (_, reason) in want_dead.items():
        record = got_dead[n]
        assert record.value == CHUNK_STREAM[n - 1][0] and record.key == batch.encode()
        assert record.headers["forwarder-error"] == reason.encode()
    assert state.blank_lines == 2


# ------------------------------------------------------------------------------------------------
# One real `forwarder serve` for the rest of the module
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(
    kafka_bootstrap: str, fake_datagrid: FakeDatagrid, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Forwarder, Settings]]:
    """A ready ``forwarder serve`` with its own topics and a small webhook body limit."""
    # concurrency 16: the worker takes at most `concurrency` jobs per 0.5 s poll when its slots
    # are all busy, and the bad-jobs test writes ~60 jobs at once.
    settings_ = settings_for(
        kafka_bootstrap, fake_datagrid, webhook_max_body_bytes=MAX_BODY, concurrency=16
    )
    fwd = Forwarder(settings_, tmp_path_factory.mktemp("bad-input"), name="bad").start()
    try:
        fwd.wait_ready(60)
        yield fwd, settings_
    finally:
        fwd.stop()


def topic(settings_: Settings, name: str) -> list[Record]:
    return asyncio.run(read_topic(settings_.kafka_bootstrap_servers, name))


def forwarded(fwd: Forwarder, batch: str, timeout: float = 30) -> dict[str, Any]:
    """The batch's state once it is forwarded or failed."""
    state: dict[str, Any] = wait_until(
        lambda: (s := fwd.state(batch)) and s.get("status") in ("forwarded", "failed") and s,
        timeout,
        f"{batch} finished",
    )
    return state


def sentinel_then_only_sentinel_requests(fwd: Forwarder, fake: FakeDatagrid) -> None:
    """Queue a good batch, wait for it, and check it is all the fake was asked about since the
    log was cleared: whatever was refused before never became an upstream request."""
    good = new_batch_id()
    fake.configure(good, lines=['{"custom_id":"s"}'])
    assert fwd.queue(good).status_code == 202
    assert forwarded(fwd, good)["status"] == "forwarded"
    paths = {r["path"] for r in fake.requests()}
    assert paths <= {f"/v1/batch-predictions/{good}", f"/v1/batch-predictions/{good}/results"}, (
        paths
    )


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """``response`` is RFC 9457 problem details with this status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"].startswith(PROBLEM_BASE)
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# ------------------------------------------------------------------------------------------------
# Bad lines through the worker: dead-lettered with the right reason, neighbours arrive
# ------------------------------------------------------------------------------------------------

_RANDOM = b"\xff" + random.Random(6).randbytes(400).replace(b"\n", b"")
HUGE_VALID = b'{"custom_id":"huge","status":"succeeded","pad":"' + b"x" * 1_200_000 + b'"}'
HUGE_GARBAGE = b"\x00\xfe{[" * 400_000  # 1.6 MB, no newline

# (line, expected): ("results", key) or ("dlq", reason) or "blank"
BAD_STREAM: list[tuple[bytes, Any]] = [
    (b'{"custom_id":"ok-first","status":"succeeded"}', ("results", b"ok-first")),
    (_RANDOM, ("dlq", "invalid_json")),
    (b'{"custom_id":"\xc3\x28"}', ("dlq", "invalid_json")),  # invalid UTF-8 in a string
    (b'{"custom_id":"\xed\xa0\x80"}', ("dlq", "invalid_json")),  # UTF-8-encoded surrogate
    (b'{"custom_id":"fine","note":"caf\xc3"}', ("dlq", "invalid_json")),  # bad UTF-8, unread field
    (b'{"custom_id":"fine","o":{"\x80":1}}', ("dlq", "invalid_json")),  # bad UTF-8 in a nested key
    (b'{"custom_id":"nul\x00"}', ("dlq", "invalid_json")),  # raw NUL inside a string
    (b"\x00" * 16, ("dlq", "invalid_json")),
    (b'{"custom_id":"\\ud800"}', ("dlq", "invalid_json")),  # lone high surrogate, escaped
    (b'{"custom_id":"ok","note":"\\udc00"}', ("dlq", "invalid_json")),  # lone low surrogate
    (b'\xef\xbb\xbf{"custom_id":"bom"}', ("dlq", "invalid_json")),
    (b'{"custom_id":"nan","v":NaN}', ("dlq", "invalid_json")),
    (b"[1,2", ("dlq", "invalid_json")),  # truncated array
    (b'{"custom_id":"x"}{"custom_id":"y"}', ("dlq", "invalid_json")),  # two documents on a line
    (b'{"custom_id":42}', ("dlq", "missing_custom_id")),
    (b'{"custom_id":4.2e1,"status":"succeeded"}', ("dlq", "missing_custom_id")),
    (b'{"custom_id":null}', ("dlq", "missing_custom_id")),
    (b'{"custom_id":["a"]}', ("dlq", "missing_custom_id")),
    (b'{"custom_id":""}', ("dlq", "missing_custom_id")),
    (b'{"status":"succeeded"}', ("dlq", "missing_custom_id")),
    (b"42", ("dlq", "not_an_object")),
    (b'"just a string"', ("dlq", "not_an_object")),
    (b"null", ("dlq", "not_an_object")),
    (b'[{"custom_id":"in-array"}]', ("dlq", "not_an_object")),
    (b'{"custom_id":"x","batch_id":7}', ("dlq", "batch_id_mismatch")),
    (HUGE_VALID, ("dlq", "too_large")),
    (HUGE_GARBAGE, ("dlq", "too_large")),
    (b'{"custom_id":"nul\\u0000id","status":"succeeded"}', ("results", b"nul\x00id")),
    (b'{"custom_id":"odd-status","status":5}', ("results", b"odd-status")),
    (
        b'{"custom_id":"big-number","n":1e400,"m":-123456789012345678901234567890}',
        ("results", b"big-number"),
    ),
    (b"\x0c\x0b \t", "blank"),
    (b'{"custom_id":"ok-last","status":"errored"}', ("results", b"ok-last")),
]


@pytest.fixture(scope="module")
def bad_batch(
    service: tuple[Forwarder, Settings], fake_datagrid: FakeDatagrid
) -> tuple[str, dict[str, Any], dict[int, Record], dict[int, Record]]:
    """BAD_STREAM forwarded by the service's worker: (batch id, state, results, dead letters)."""
    fwd, settings_ = service
    batch = new_batch_id()
    fake_datagrid.configure(batch, lines=[line for line, _ in BAD_STREAM])
    assert fwd.queue(batch).status_code == 202
    state = forwarded(fwd, batch, timeout=60)
    mine = batch.encode()
    results = {
        int(r.headers["datagrid-line"]): r
        for r in topic(settings_, settings_.results_topic)
        if r.headers["datagrid-batch-id"] == mine
    }
    dead = {
        int(r.headers["datagrid-line"]): r
        for r in topic(settings_, settings_.dead_letter_topic)
        if r.headers["datagrid-batch-id"] == mine
    }
    return batch, state, results, dead


def test_bad_lines_leave_the_worker_running(
    service: tuple[Forwarder, Settings], bad_batch: Any, fake_datagrid: FakeDatagrid
) -> None:
    """A batch full of hostile lines is forwarded (every line accounted for), nothing crashes,
    and the same process then forwards the next batch."""
    fwd, _ = service
    _batch, state, _results, _dead = bad_batch
    assert state["status"] == "forwarded", state
    assert state["blank_lines"] == 1
    assert sum(state["lines"].values()) + sum(state["dead_letters"].values()) + 1 == len(BAD_STREAM)
    assert fwd.process is not None and fwd.process.poll() is None
    assert not fwd.events("batch_internal_error") and not fwd.events("request_crashed")
    fake_datagrid.clear_requests()
    sentinel_then_only_sentinel_requests(fwd, fake_datagrid)


def test_valid_neighbours_of_bad_lines_arrive_byte_identical(bad_batch: Any) -> None:
    """Exactly the valid lines among the hostile ones reach the results topic, bytes unchanged."""
    _batch, _state, results, _dead = bad_batch
    want = {n: e[1] for n, (_, e) in enumerate(BAD_STREAM, 1) if e != "blank" and e[0] == "results"}
    assert {n: r.key for n, r in results.items()} == want
    for n in want:
        assert results[n].value == BAD_STREAM[n - 1][0]
    odd = next(n for n, (line, _) in enumerate(BAD_STREAM, 1) if b"odd-status" in line)
    assert results[odd].headers["datagrid-status"] == b""  # a non-string status is not made up


def test_each_bad_line_is_dead_lettered_with_its_reason_and_raw_bytes(bad_batch: Any) -> None:
    """Each bad line's dead letter carries the contract reason and the line's exact bytes
    (too_large lines: a prefix that says it was truncated)."""
    batch, state, _, dead = bad_batch
    want = {n: e[1] for n, (_, e) in enumerate(BAD_STREAM, 1) if e != "blank" and e[0] == "dlq"}
    got = {n: r.headers["forwarder-error"].decode() for n, r in dead.items()}
    assert got == want
    for n, record in dead.items():
        raw = BAD_STREAM[n - 1][0]
        assert record.key == batch.encode()
        assert record.headers["datagrid-line"] == str(n).encode()
        assert record.headers["forwarder-error-detail"]
        if want[n] == "too_large":
            assert record.value and raw.startswith(record.value) and len(record.value) > 1_000_000
            assert str(len(raw)).encode() in record.headers["forwarder-error-detail"]
            assert b"truncated" in record.headers["forwarder-error-detail"]
        else:
            assert record.value == raw, n
    reasons: dict[str, int] = {}
    for reason in want.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    assert state["dead_letters"] == reasons


def test_dead_letter_metrics_count_each_reason(
    service: tuple[Forwarder, Settings], bad_batch: Any
) -> None:
    """/metrics counts the dead letters by reason, only from the closed set of reasons."""
    fwd, _ = service
    _, state, _, _ = bad_batch
    text = fwd.http.get("/metrics").text
    for reason, n in state["dead_letters"].items():
        assert f'forwarder_dead_letters_total{{reason="{reason}"}} {float(n)}' in text
    labels = {
        line.split('reason="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("forwarder_dead_letters_total{")
    }
    assert labels <= {
        "invalid_json",
        "not_an_object",
        "missing_custom_id",
        "batch_id_mismatch",
        "too_large",
    }


# Deeply nested lines go through the client's transport seam rather than the fake Datagrid: the
# fake counts line statuses with Python's json.loads, which raises RecursionError on them.
DEEP_STREAM: list[tuple[bytes, Any]] = [
    (b'{"custom_id":"before","status":"succeeded"}', ("results", b"before")),
    (b"[" * 100_000, ("dlq", "invalid_json")),  # 100k unclosed brackets: not JSON at all
    (b"[" * 100_000 + b"]" * 100_000, ("dlq", {"invalid_json", "not_an_object"})),  # too deep
    (b'{"a":' * 100_000, ("dlq", "invalid_json")),
    (b'{"custom_id":"deep","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", ("dlq", "invalid_json")),
    (b'{"custom_id":"deep-open","x":' + b"{" * 50_000, ("dlq", "invalid_json")),
    (
        b'{"custom_id":"after","status":"succeeded","x":' + b"[" * 200 + b"]" * 200 + b"}",
        ("results", b"after"),
    ),
]


def _upstream(batch: str, body: bytes) -> httpx.MockTransport:
    """Datagrid, in-process: a completed batch whose results are ``body``."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(f"/batch-predictions/{batch}"):
            return httpx.Response(200, json={"id": batch, "status": "completed"})
        if request.url.path.endswith(f"/batch-predictions/{batch}/results"):
            return httpx.Response(200, content=body)
        return httpx.Response(404, json={"status": 404})

    return httpx.MockTransport(answer)


async def test_deeply_nested_lines_are_dead_lettered_without_crashing(
    make_settings: Any, batch_id: str
) -> None:
    """100k-deep arrays and objects are dead-lettered (invalid_json) with their raw bytes; the
    pipeline neither crashes nor drops the valid lines around them."""
    settings_ = make_settings()
    body = b"\n".join(line for line, _ in DEEP_STREAM) + b"\n"
    metrics = Metrics(process=False)
    async with open_core(settings_, metrics, transport=_upstream(batch_id, body)) as core:
        state = await core.pipeline.forward(batch_id)
    assert state.status == "forwarded"
    bootstrap = settings_.kafka_bootstrap_servers
    results = await read_topic(bootstrap, settings_.results_topic)
    dead = await read_topic(bootstrap, settings_.dead_letter_topic)
    assert {int(r.headers["datagrid-line"]): r.value for r in results} == {
        n: line for n, (line, e) in enumerate(DEEP_STREAM, 1) if e[0] == "results"
    }
    got = {int(r.headers["datagrid-line"]): r for r in dead}
    want = {n: e[1] for n, (_, e) in enumerate(DEEP_STREAM, 1) if e[0] == "dlq"}
    assert sorted(got) == sorted(want)
    for n, reason in want.items():
        allowed = reason if isinstance(reason, set) else {reason}
        assert got[n].headers["forwarder-error"].decode() in allowed, n
        assert got[n].value == DEEP_STREAM[n - 1][0]


# ------------------------------------------------------------------------------------------------
# Malformed and oversized HTTP bodies: problem+json
# ------------------------------------------------------------------------------------------------


def test_oversized_webhook_body_is_413_problem(service: tuple[Forwarder, Settings]) -> None:
    """A webhook body over FORWARDER_WEBHOOK_MAX_BODY_BYTES is 413 problem+json, signed or not."""
    fwd, _ = service
    body = b'{"id":"evt_big","event_type":"batch_prediction.completed","pad":"' + b"x" * MAX_BODY
    body += b'"}'
    assert_problem(fwd.webhook(body), 413)
    unsigned = fwd.http.post("/webhooks/datagrid", content=body)
    assert_problem(unsigned, 413)
    at_limit = event_body(new_batch_id(), "evt_at_limit", "knowledge.completed")
    pad = MAX_BODY - (len(at_limit) - 1 + len(b',"pad":""}'))
    at_limit = at_limit[:-1] + b',"pad":"' + b"y" * pad + b'"}'
    assert len(at_limit) == MAX_BODY
    assert fwd.webhook(at_limit).status_code == 200  # the limit itself is allowed


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{", id="truncated"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"batch_id=bpred_1", id="form-encoded"),
        pytest.param(b'{"batch_id":"bpred_1"}{}', id="trailing-document"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"bpred_1"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"batch_id":5}', id="id-number"),
        pytest.param(b'{"batch_id":null}', id="id-null"),
        pytest.param(b'{"batch_id":["bpred_1"]}', id="id-array"),
        pytest.param(b'{"batch_id":"bpred_1","replay":"yes"}', id="replay-string"),
        pytest.param(b'{"batch_id":"bpred_1","replay":1}', id="replay-int"),
        pytest.param(b'{"batch_id":"bpred_1","replay":null}', id="replay-null"),
        pytest.param(b'{"replay":true}', id="missing-id"),
        pytest.param(b'{"batch_id":"bpred_1","priority":1}', id="unknown-field"),
        pytest.param(b'{"batch_id":"bpred_1","Batch_Id":"x"}', id="unknown-field-case"),
    ],
)
def test_malformed_api_body_is_400_problem(
    service: tuple[Forwarder, Settings], body: bytes
) -> None:
    """Malformed JSON, wrong types and unknown fields to POST /v1/batches are 400 problem+json."""
    fwd, _ = service
    response = fwd.http.post(
        "/v1/batches",
        content=body,
        headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"},
    )
    assert_problem(response, 400)


def test_oversized_api_body_is_413_problem(service: tuple[Forwarder, Settings]) -> None:
    """An API body over the limit is 413 problem+json."""
    fwd, _ = service
    body = b'{"batch_id":"bpred_1","replay":false' + b" " * MAX_BODY + b"}"
    response = fwd.http.post(
        "/v1/batches", content=body, headers={"Authorization": f"Bearer {API_TOKEN}"}
    )
    assert_problem(response, 413)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param(b"[" * 5_000, id="deep-brackets"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"evt"', id="string"),
        pytest.param(b'{"event_type":"batch_prediction.completed","data":{"id":"b1"}}', id="no-id"),
        pytest.param(b'{"id":5,"event_type":"batch_prediction.completed"}', id="id-number"),
        pytest.param(b'{"id":"evt_1","data":{"id":"bpred_1"}}', id="no-event-type"),
        pytest.param(b'{"id":"evt_1","event_type":"batch_prediction.completed"}', id="no-data"),
        pytest.param(
            b'{"id":"evt_1","event_type":"batch_prediction.completed","data":[]}', id="data-array"
        ),
        pytest.param(
            b'{"id":"evt_1","event_type":"batch_prediction.completed","data":{"id":7}}',
            id="data-id-number",
        ),
        pytest.param(
            b'{"id":"evt_1","event_type":"batch_prediction.completed","data":{"id":"'
            + b"\\ud800"
            + b'"}}',
            id="lone-surrogate-id",
        ),
    ],
)
def test_malformed_signed_webhook_is_400_problem(
    service: tuple[Forwarder, Settings], body: bytes
) -> None:
    """Correctly signed but malformed webhook bodies are 400 problem+json."""
    fwd, _ = service
    assert_problem(fwd.webhook(body), 400)


# ------------------------------------------------------------------------------------------------
# Batch ids that may not reach a URL: refused by every way in
# ------------------------------------------------------------------------------------------------


def _cli_env(settings_: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    env.update(
        {
            "FORWARDER_KAFKA_BOOTSTRAP_SERVERS": settings_.kafka_bootstrap_servers,
            "FORWARDER_DATAGRID_BASE_URL": settings_.datagrid_base_url,
            "DATAGRID_API_KEY": API_KEY,
            "FORWARDER_RESULTS_TOPIC": settings_.results_topic,
            "FORWARDER_DEAD_LETTER_TOPIC": settings_.dead_letter_topic,
            "FORWARDER_STATE_TOPIC": settings_.state_topic,
            "FORWARDER_JOBS_TOPIC": settings_.jobs_topic,
            "FORWARDER_MAX_ATTEMPTS": "1",
        }
    )
    return env


# Calls the CLI's entry point once per (command, id) in one interpreter: the same argument parsing,
# settings and checks as the console script, without paying interpreter start-up 34 times.
_CLI_DRIVER = """
import contextlib, io, json, sys
from forwarder.cli import main
out = []
for command, batch_id in json.load(sys.stdin):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([command, batch_id])
    out.append([command, batch_id, code, stdout.getvalue(), stderr.getvalue()])
print(json.dumps(out))
"""


def test_cli_refuses_bad_batch_ids_with_exit_2(
    service: tuple[Forwarder, Settings], fake_datagrid: FakeDatagrid
) -> None:
    """`forwarder forward` and `forwarder enqueue` exit 2 for every bad id, before any request,
    and queue nothing."""
    _, settings_ = service
    fake_datagrid.clear_requests()
    jobs_before = len(topic(settings_, settings_.jobs_topic))
    env = _cli_env(settings_)
    # The console script itself, end to end, for two ids ...
    for command, bad in (("forward", "../etc/passwd"), ("enqueue", "a b")):
        done = subprocess.run(
            [sys.executable, "-m", "forwarder.cli", command, "bpred_ok", bad],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "invalid input" in done.stderr and not done.stdout
    # ... and its entry point for every id and both commands.
    runs = [[command, bad] for bad in BAD_IDS.values() for command in ("forward", "enqueue")]
    done = subprocess.run(
        [sys.executable, "-c", _CLI_DRIVER],
        input=json.dumps(runs),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    wrong = [
        (command, bad, code, err.strip()[-120:])
        for command, bad, code, out, err in json.loads(done.stdout)
        if code != 2 or "invalid input" not in err or out
    ]
    assert not wrong, wrong
    assert fake_datagrid.requests() == []
    assert len(topic(settings_, settings_.jobs_topic)) == jobs_before


def test_api_refuses_bad_batch_ids_with_400(
    service: tuple[Forwarder, Settings], fake_datagrid: FakeDatagrid
) -> None:
    """POST /v1/batches with a bad id is 400 invalid_batch_id and never reaches Datagrid."""
    fwd, _ = service
    fake_datagrid.clear_requests()
    wrong = []
    for name, bad in {**BAD_IDS, "nul": "bpred\x001"}.items():
        response = fwd.http.post(
            "/v1/batches",
            json={"batch_id": bad},
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        )
        if response.status_code != 400 or not response.json()["type"].endswith("invalid_batch_id"):
            wrong.append((name, response.status_code))
        else:
            assert_problem(response, 400)
    assert not wrong, wrong
    sentinel_then_only_sentinel_requests(fwd, fake_datagrid)


def test_webhook_refuses_bad_batch_ids_with_400(
    service: tuple[Forwarder, Settings], fake_datagrid: FakeDatagrid
) -> None:
    """A correctly signed terminal webhook whose data.id is a bad id is 400 and queues nothing."""
    fwd, _ = service
    fake_datagrid.clear_requests()
    wrong = []
    for name, bad in {**BAD_IDS, "nul": "bpred\x001"}.items():
        body = json.dumps(
            {
                "id": f"evt_{uuid.uuid4().hex[:8]}",
                "event_type": "batch_prediction.completed",
                "timestamp": int(time.time()),
                "data": {"id": bad, "status": "completed"},
            }
        ).encode()
        response = fwd.webhook(body)
        if response.status_code != 400:
            wrong.append((name, response.status_code))
        else:
            assert_problem(response, 400)
    assert not wrong, wrong
    sentinel_then_only_sentinel_requests(fwd, fake_datagrid)


def test_state_route_refuses_bad_batch_ids(service: tuple[Forwarder, Settings]) -> None:
    """GET /v1/batches/{id} with a bad id (percent-encoded on the wire) is 400 invalid_batch_id,
    or 404/405 when the path no longer names that route at all."""
    fwd, _ = service
    wrong = []
    for name, bad in BAD_IDS.items():
        request = fwd.http.build_request(
            "GET", "/v1/batches/x", headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
        raw = b"/v1/batches/" + quote(bad, safe="").encode()
        request.url = request.url.copy_with(raw_path=raw)
        response = fwd.http.send(request)
        if name in ("slash", "traversal", "dotdot", "empty"):
            # "/" and ".." are decoded before routing: that path is not this route (404), and
            # "/v1/batches/" is the POST-only collection (405). Neither reaches the handler.
            ok = response.status_code in (404, 405)
        else:
            ok = response.status_code == 400 and response.json()["type"].endswith(
                "invalid_batch_id"
            )
        if ok:
            assert_problem(response, response.status_code)
        else:
            wrong.append((name, response.status_code, response.text[:100]))
    assert not wrong, wrong
    # The raw dot-segment form too (httpx would normalise it away).
    request = fwd.http.build_request(
        "GET", "/v1/batches/x", headers={"Authorization": f"Bearer {API_TOKEN}"}
    )
    request.url = request.url.copy_with(raw_path=b"/v1/batches/../batches/..")
    assert fwd.http.send(request).status_code in (400, 404)


def metric(fwd: Forwarder, sample: str) -> float:
    """A sample's value from /metrics (0 if absent)."""
    for text in fwd.http.get("/metrics").text.splitlines():
        if text.startswith(sample + " "):
            return float(text.split()[-1])
    return 0.0


def finished_jobs(fwd: Forwarder) -> dict[str, float]:
    return {
        outcome: metric(fwd, f'forwarder_batches_total{{outcome="{outcome}"}}')
        for outcome in ("invalid", "failed", "forwarded", "duplicate")
    }


async def jobs_all_committed(settings_: Settings) -> bool:
    """True once the workers' group has committed every job written so far (each was handled)."""
    bootstrap = settings_.kafka_bootstrap_servers
    tps = [
        TopicPartition(settings_.jobs_topic, p)
        for p in await topic_partitions({"bootstrap_servers": bootstrap}, settings_.jobs_topic)
    ]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(settings_.consumer_group)
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
        await admin.close()
    return all((committed[tp].offset if tp in committed else 0) >= end for tp, end in ends.items())


def test_bad_jobs_on_the_jobs_topic_are_skipped_with_a_log_line(
    service: tuple[Forwarder, Settings], fake_datagrid: FakeDatagrid
) -> None:
    """Bare ids, JSON strings and JSON jobs with bad ids written by any producer are skipped with
    a `job_invalid` log line each, never an upstream request; the worker carries on."""
    fwd, settings_ = service
    fake_datagrid.clear_requests()
    # A bare value is trimmed (producers add newlines), so " bpred_1" is the valid "bpred_1":
    # only ids that are still bad after trimming are bad as bare values.
    values: list[bytes | None] = [bad.encode() for bad in BAD_IDS.values() if bad.strip() == bad]
    values += [json.dumps(bad).encode() for bad in BAD_IDS.values()]  # "a/b" as a JSON string
    values += [json.dumps({"batch_id": bad}).encode() for bad in BAD_IDS.values()]
    values += [
        None,  # a tombstone
        b"",
        b"\xff\xfe",
        b"bpred_\xc3",
        b'{"batch_id": 5}',
        b'{"batch_id": "bpred_1", "replay": "yes"}',
        b"{not json",
        b'"unterminated',
    ]
    before = finished_jobs(fwd)
    logged_before = len(fwd.events("job_invalid"))

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings_.kafka_bootstrap_servers)
        await producer.start()
        try:
            for value in values:
                await producer.send(settings_.jobs_topic, value, key=b"bad")
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(produce())
    wait_until(lambda: asyncio.run(jobs_all_committed(settings_)), 30, "every job handled", 0.3)
    now = finished_jobs(fwd)
    assert now["invalid"] - before["invalid"] == len(values)
    assert now["forwarded"] == before["forwarded"]
    assert len(fwd.events("job_invalid")) - logged_before == len(values)
    sentinel_then_only_sentinel_requests(fwd, fake_datagrid)
