"""The core pipeline against the real broker and the fake Datagrid over real HTTP."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import structlog.testing

from forwarder.config import Settings
from forwarder.core import open_core
from forwarder.observability import Metrics
from forwarder.state import BatchState
from tests.support.fake_datagrid import FakeDatagrid, generate_lines
from tests.support.kafka_helpers import java_partition, read_topic
from tests.support.service_helpers import forwarder_env, run_forwarder

MakeSettings = Callable[..., Settings]


def line(batch_id: str, custom_id: str, status: str = "succeeded", **extra: Any) -> str:
    """A realistic result line (compact JSON)."""
    body = {
        "object": "batch_prediction.result",
        "batch_id": batch_id,
        "custom_id": custom_id,
        "status": status,
        "output": {"v": custom_id} if status == "succeeded" else None,
        "error": None if status == "succeeded" else {"type": "x", "title": "t", "status": 422},
        **extra,
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


async def forward(settings: Settings, batch_id: str, **kwargs: Any) -> tuple[BatchState, Metrics]:
    metrics = Metrics(process=False)
    async with open_core(settings, metrics) as core:
        state = await core.pipeline.forward(batch_id, **kwargs)
    return state, metrics


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_values_keys_headers_and_partitions(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """Values are the upstream bytes minus the terminator; keys, headers and partitions are
    right."""
    settings = make_settings()
    lines = [
        line(batch_id, "inv-1"),
        line(batch_id, "caf\u00e9-\u2603", "errored", note="a\u2028b\u0085c \U0001f600"),
        line(batch_id, "inv-3", "canceled"),
        line(batch_id, "inv-4", "expired"),
        line(batch_id, "inv-5"),
    ]
    fake_datagrid.configure(batch_id, lines=lines, line_ending="\r\n")
    state, metrics = await forward(settings, batch_id, event_id="evt_42", source="webhook")

    assert state.status == "forwarded"
    assert state.lines == {"succeeded": 2, "errored": 1, "canceled": 1, "expired": 1}
    records = await read_topic(settings.kafka_bootstrap_servers, settings.results_topic)
    by_line = {int(r.headers["datagrid-line"]): r for r in records}
    assert sorted(by_line) == [1, 2, 3, 4, 5]
    for number, text in enumerate(lines, start=1):
        record = by_line[number]
        expected = json.loads(text)
        assert record.value == text.encode()  # byte-identical, CRLF stripped
        assert record.key == expected["custom_id"].encode()
        assert record.headers == {
            "datagrid-batch-id": batch_id.encode(),
            "datagrid-status": expected["status"].encode(),
            "datagrid-line": str(number).encode(),
            "content-type": b"application/json",
            "datagrid-event-id": b"evt_42",
            "ce_specversion": b"1.0",
            "ce_id": f"{batch_id}:{number}".encode(),
            "ce_source": f"{settings.datagrid_base_url}/batch-predictions/{batch_id}".encode(),
            "ce_type": b"com.datagrid.batch_prediction.result.v1",
            "ce_time": (state.terminal_at or "").encode(),
        }
        assert state.terminal_at  # the fake says when the batch completed
        assert record.partition == java_partition(record.key, settings.kafka_topic_partitions)
    assert metric(metrics, "forwarder_lines_forwarded_total", status="succeeded") == 2
    assert metric(metrics, "forwarder_batches_total", outcome="forwarded") == 1
    states = await read_topic(settings.kafka_bootstrap_servers, settings.state_topic)
    assert [r.key for r in states] == [batch_id.encode()]
    assert BatchState.decode(states[0].value or b"").status == "forwarded"


def test_murmur2_matches_java_vectors() -> None:
    """Partitioning uses Java's murmur2: vectors computed with kafka-clients' Utils.murmur2."""
    from aiokafka.partitioner import murmur2

    vectors = {  # key -> Utils.murmur2(key.getBytes(UTF_8)), from kafka-clients 4.4.0
        "21": -973932308,
        "foobar": -790332482,
        "a-little-bit-long-string": -985981536,
        "a-little-bit-longer-string": -1486304829,
        "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        "abc": 479470107,
        "inv-1": 1869030817,
        "caf\u00e9-\u2603": -948454518,
    }
    from forwarder.kafka import murmur2 as ours

    for key, java in vectors.items():
        assert ours(key.encode()) == murmur2(key.encode()), key
        signed = murmur2(key.encode())
        signed = signed - (1 << 32) if signed >= 1 << 31 else signed
        assert signed == java, key
    assert java_partition(b"inv-1", 6) == 1 and java_partition("caf\u00e9-\u2603".encode(), 6) == 2


async def test_framing_blank_lines_tiny_chunks(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """Blank lines are skipped and counted; 1-byte chunks, CRLF and a missing final newline work."""
    settings = make_settings()
    lines = [
        line(batch_id, "a", note="\u00e9\u2028\U0001f600"),
        "",
        "   \t",
        line(batch_id, "b"),
        line(batch_id, "c", "errored"),
    ]
    fake_datagrid.configure(
        batch_id, lines=lines, line_ending="\r\n", trailing_newline=False, chunk_size=1
    )
    state, metrics = await forward(settings, batch_id)
    assert state.status == "forwarded" and state.blank_lines == 2
    records = await read_topic(settings.kafka_bootstrap_servers, settings.results_topic)
    got = sorted((int(r.headers["datagrid-line"]), r.value) for r in records)
    assert got == [(1, lines[0].encode()), (4, lines[3].encode()), (5, lines[4].encode())]
    assert metric(metrics, "forwarder_blank_lines_total") == 2
    assert await read_topic(settings.kafka_bootstrap_servers, settings.dead_letter_topic) == []


async def test_every_dead_letter_reason(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """Each contract reason lands in the DLQ with its headers; valid neighbours still arrive."""
    settings = make_settings()
    bad: list[str | bytes] = [
        line(batch_id, "ok-1"),
        '{"custom_id": "broken"',  # invalid_json
        b'{"custom_id":"\xff\xfe"}',  # invalid UTF-8: invalid_json
        "[1, 2, 3]",  # not_an_object
        '{"status":"succeeded"}',  # missing_custom_id
        line("bpred_other", "x"),  # batch_id_mismatch
        line(batch_id, "ok-2"),
    ]
    fake_datagrid.configure(batch_id, lines=bad)
    state, metrics = await forward(settings, batch_id)
    assert state.status == "forwarded"
    assert state.dead_letters == {
        "invalid_json": 2,
        "not_an_object": 1,
        "missing_custom_id": 1,
        "batch_id_mismatch": 1,
    }
    results = await read_topic(settings.kafka_bootstrap_servers, settings.results_topic)
    assert sorted(r.key for r in results) == [b"ok-1", b"ok-2"]
    dead = await read_topic(settings.kafka_bootstrap_servers, settings.dead_letter_topic)
    by_line = {int(r.headers["datagrid-line"]): r for r in dead}
    expected = {
        2: "invalid_json",
        3: "invalid_json",
        4: "not_an_object",
        5: "missing_custom_id",
        6: "batch_id_mismatch",
    }
    assert {n: r.headers["forwarder-error"].decode() for n, r in by_line.items()} == expected
    for n, record in by_line.items():
        raw = bad[n - 1]
        assert record.value == (raw if isinstance(raw, bytes) else raw.encode())
        assert record.key == batch_id.encode()
        assert record.headers["datagrid-batch-id"] == batch_id.encode()
        assert record.headers["forwarder-error-detail"]
    assert metric(metrics, "forwarder_dead_letters_total", reason="invalid_json") == 2


async def test_retries_then_drop_midway_forwards_each_line_once(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """503, then 429 Retry-After 1, then a drop mid-line after 400 lines, then success: once
    each."""
    settings = make_settings()
    spec = {"count": 1000, "line_bytes": 300, "distinct_ids": 1000}
    fake_datagrid.configure(
        batch_id,
        generate=spec,
        chunk_size=4096,
        faults=[
            {"kind": "status", "code": 503},
            {"kind": "status", "code": 429, "retry_after": 1},
            {"kind": "drop", "after_lines": 400, "mid_line": True},
        ],
    )
    fake_datagrid.clear_requests()
    state, metrics = await forward(settings, batch_id)
    assert state.status == "forwarded"
    assert state.attempts == 4 and state.stream_restarts == 1
    records = await read_topic(settings.kafka_bootstrap_servers, settings.results_topic)
    expected = list(generate_lines(batch_id, spec))
    assert len(records) == 1000  # exactly once: no line re-published after the drop
    assert sorted(r.value for r in records) == sorted(expected)
    assert sorted(int(r.headers["datagrid-line"]) for r in records) == list(range(1, 1001))
    results_requests = [r for r in fake_datagrid.requests() if r["path"].endswith("/results")]
    assert [r["status"] for r in results_requests] == [503, 429, 200, 200]
    assert metric(metrics, "forwarder_upstream_requests_total", code="503") == 1
    assert metric(metrics, "forwarder_upstream_requests_total", code="429") == 1
    assert metric(metrics, "forwarder_stream_restarts_total") == 1


async def test_a_producer_that_failed_for_good_is_replaced_and_the_batch_forwarded(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """After a broker restart that lost the producer's state, aiokafka's sender stops for good
    (OUT_OF_ORDER_SEQUENCE_NUMBER) and fails every later send: the forwarder starts a new
    producer and forwards the batch, each line once."""
    from aiokafka.errors import OutOfOrderSequenceNumber

    settings = make_settings()
    spec = {"count": 300, "distinct_ids": 300}
    fake_datagrid.configure(batch_id, generate=spec)
    async with open_core(settings, Metrics(process=False)) as core:
        failed = core.producer.current
        # What aiokafka's sender leaves behind when it dies at that error (Sender._fail_all).
        failed._message_accumulator.fail_all(OutOfOrderSequenceNumber())
        state = await core.pipeline.forward(batch_id)
        assert core.producer.current is not failed
    assert state.status == "forwarded" and state.attempts == 2
    records = await read_topic(settings.kafka_bootstrap_servers, settings.results_topic)
    assert sorted(r.value for r in records) == sorted(generate_lines(batch_id, spec))


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``forwarder`` command with ``settings`` passed through the environment."""
    return run_forwarder(forwarder_env(settings), *args)


@pytest.mark.parametrize(
    ("code", "expect"),
    [(404, "HTTP 404"), (410, "HTTP 410"), (401, "HTTP 401")],
)
def test_permanent_errors_fail_fast(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    batch_id: str,
    code: int,
    expect: str,
) -> None:
    """404, 410 and 401 fail at once with a clear message, exit 1, and publish no line."""
    settings = make_settings()
    fake_datagrid.configure(
        batch_id, lines=[line(batch_id, "a")], faults=[{"kind": "status", "code": code}] * 3
    )
    fake_datagrid.clear_requests()
    done = run_cli(settings, "forward", batch_id)
    assert done.returncode == 1, done.stderr
    assert f"{batch_id}: failed" in done.stdout and expect in done.stdout
    assert "1 attempt" in done.stdout
    results = [r for r in fake_datagrid.requests() if r["path"].endswith("/results")]
    assert len(results) == 1  # never retried
    import asyncio

    assert asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic)) == []
    states = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.state_topic))
    state = BatchState.decode(states[-1].value or b"")
    assert state.status == "failed" and state.error and state.error["upstream_status"] == code


def test_unknown_batch_and_invalid_id_exit_codes(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid
) -> None:
    """An unknown batch exits 1 (404); a batch id that may not reach a URL exits 2 untouched."""
    settings = make_settings()
    done = run_cli(settings, "forward", "bpred_does_not_exist")
    assert done.returncode == 1 and "HTTP 404" in done.stdout
    done = run_cli(settings, "forward", "../etc/passwd")
    assert done.returncode == 2 and "batch id" in done.stderr


async def test_big_batch_with_large_line_and_too_large(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """5,000 lines with one ~300 KB line forward; a line above max.message.bytes is too_large."""
    settings = make_settings()
    spec = {"count": 4998, "line_bytes": 300, "distinct_ids": 4998}
    lines: list[str] = [s.decode() for s in generate_lines(batch_id, spec)]
    big = line(batch_id, "big-ok", note="x" * 300_000)
    huge = line(batch_id, "huge", note="y" * 1_200_000)  # above the 1 MiB default topic limit
    lines.insert(2500, big)
    lines.insert(4000, huge)
    fake_datagrid.configure(batch_id, lines=lines)
    state, _metrics = await forward(settings, batch_id)
    assert state.status == "forwarded"
    assert sum(state.lines.values()) == 4999 and state.dead_letters == {"too_large": 1}
    results = await read_topic(settings.kafka_bootstrap_servers, settings.results_topic)
    assert len(results) == 4999
    assert any(r.key == b"big-ok" and r.value == big.encode() for r in results)
    dead = await read_topic(settings.kafka_bootstrap_servers, settings.dead_letter_topic)
    assert len(dead) == 1 and dead[0].headers["forwarder-error"] == b"too_large"
    assert dead[0].headers["datagrid-line"] == b"4001"
    assert huge.encode().startswith(dead[0].value or b"x")  # truncated to fit, and says so
    assert b"truncated" in dead[0].headers["forwarder-error-detail"]


async def test_retry_after_is_honoured_on_a_retriable_status_other_than_429(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """A 503 with Retry-After: 1.5 waits 1.5 s (not the 0.05 s backoff): the pipeline's own
    retry honours it, not only the rate limiter (which reads it on 429s alone)."""
    settings = make_settings(retry_base_seconds=0.05, retry_max_seconds=10.0)
    fake_datagrid.configure(
        batch_id,
        generate={"count": 3, "distinct_ids": 3},
        faults=[{"kind": "status", "code": 503, "retry_after": 1.5}],
    )
    with structlog.testing.capture_logs() as logs:
        state, _ = await forward(settings, batch_id)
    assert state.status == "forwarded" and state.attempts == 2
    (failed,) = [e for e in logs if e["event"] == "batch_attempt_failed"]
    assert failed["retry_in"] == 1.5 and failed["code"] == "upstream_unavailable"
