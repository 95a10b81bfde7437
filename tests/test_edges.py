"""Reliability at the edges: broken and hostile upstreams, long batches, slow clients, secrets.

Each case runs the real ``forwarder`` (``forward`` or ``serve``) against the real broker, and either
the fake Datagrid or ``tests/support/hostile_upstream.py`` (a real HTTP server that sends scripted
bytes).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from forwarder.config import Settings
from forwarder.kafka import partition_for
from tests.conftest import API_KEY
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.hostile_upstream import Answer, HostileUpstream, batch_json
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import Forwarder, forwarder_env, run_forwarder, wait_until

MakeSettings = Callable[..., Settings]
NDJSON = {"Content-Type": "application/x-ndjson"}


def line(batch: str, n: int, status: str = "succeeded") -> bytes:
    """A valid result line."""
    return json.dumps(
        {
            "object": "batch_prediction_result",
            "batch_id": batch,
            "custom_id": f"req-{n}",
            "status": status,
            "output": {"text": "x" * 20},
        }
    ).encode()


def last_state(settings: Settings, batch: str) -> dict[str, Any]:
    """The batch's latest record on the state topic."""
    records = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.state_topic))
    mine = [json.loads(r.value or b"{}") for r in records if r.key == batch.encode()]
    assert mine, f"no state record for {batch}"
    return mine[-1]


def topic_records(settings: Settings, topic: str, batch: str) -> list[Any]:
    """Committed records of ``batch`` on ``topic``."""
    records = asyncio.run(read_topic(settings.kafka_bootstrap_servers, topic))
    return [r for r in records if r.headers.get("datagrid-batch-id") == batch.encode()]


def forward(settings: Settings, batch: str, timeout: float = 120, **env: str) -> Any:
    """Run ``forwarder forward BATCH`` to completion."""
    environment = forwarder_env(settings)
    environment.update(env)
    return run_forwarder(environment, "forward", batch, timeout=timeout)


@pytest.fixture
def hostile() -> Iterator[HostileUpstream]:
    """A scripted upstream on a real socket."""
    with HostileUpstream() as upstream:
        yield upstream


def hostile_settings(make_settings: MakeSettings, up: HostileUpstream) -> Settings:
    """Settings for a quick failure: two attempts, short waits."""
    return make_settings(datagrid_base_url=up.base_url, max_attempts=2, retry_max_seconds=0.2)


# --- what the upstream sends ----------------------------------------------------------------


def test_html_page_with_200_is_an_upstream_error_not_a_forwarded_batch(
    make_settings: MakeSettings, hostile: HostileUpstream, batch_id: str
) -> None:
    """A proxy's 200 text/html page is retried, then fails; nothing reaches either topic."""
    settings = hostile_settings(make_settings, hostile)
    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=batch_json(batch_id)))
    page = b"<html><body>Please log in to the Wi-Fi</body></html>\n" * 3
    hostile.answer(
        f"batch-predictions/{batch_id}/results",
        Answer(headers={"Content-Type": "text/html; charset=utf-8"}, body=page),
    )
    done = forward(settings, batch_id)
    assert done.returncode == 1, done.stdout + done.stderr
    state = last_state(settings, batch_id)
    assert state["status"] == "failed" and "not NDJSON" in state["error"]["detail"]
    assert topic_records(settings, settings.dead_letter_topic, batch_id) == []
    assert topic_records(settings, settings.results_topic, batch_id) == []


def test_close_delimited_body_cut_mid_line_is_a_broken_stream(
    make_settings: MakeSettings, hostile: HostileUpstream, batch_id: str
) -> None:
    """A body ended only by the connection closing, mid-line, is a cut: the complete lines are
    forwarded once, the partial one is not dead-lettered, and the batch is not `forwarded`."""
    settings = hostile_settings(make_settings, hostile)
    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=batch_json(batch_id)))
    body = b"".join(line(batch_id, n) + b"\n" for n in range(1, 6)) + line(batch_id, 6)[:30]
    hostile.answer(
        f"batch-predictions/{batch_id}/results", Answer(headers=NDJSON, body=body, framing="close")
    )
    done = forward(settings, batch_id)
    assert done.returncode == 1, done.stdout + done.stderr
    state = last_state(settings, batch_id)
    assert state["status"] == "failed" and "middle of a line" in state["error"]["detail"]
    assert topic_records(settings, settings.dead_letter_topic, batch_id) == []
    keys = sorted(r.key for r in topic_records(settings, settings.results_topic, batch_id))
    assert keys == sorted(f"req-{n}".encode() for n in range(1, 6))  # re-streams skip them


def test_a_complete_close_delimited_body_is_forwarded(
    make_settings: MakeSettings, hostile: HostileUpstream, batch_id: str
) -> None:
    """Every line, the count equal to the total, no final newline, the connection closed: the
    last line is a whole object, so the batch is forwarded (a cut one fails, see above)."""
    settings = hostile_settings(make_settings, hostile)
    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=batch_json(batch_id, 6)))
    body = b"".join(line(batch_id, n) + b"\n" for n in range(1, 6)) + line(batch_id, 6)
    hostile.answer(
        f"batch-predictions/{batch_id}/results", Answer(headers=NDJSON, body=body, framing="close")
    )
    done = forward(settings, batch_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert last_state(settings, batch_id)["lines"] == {"succeeded": 6}
    keys = sorted(r.key for r in topic_records(settings, settings.results_topic, batch_id))
    assert keys == sorted(f"req-{n}".encode() for n in range(1, 7))


@pytest.mark.parametrize(
    ("lines", "total", "code"),
    [
        (0, 10, "incomplete"),
        (4, 10, "incomplete"),
        (9, 10, "incomplete"),
        (4, 3, "too_many_lines"),
    ],
    ids=["empty-body", "short", "one-short", "one-too-many"],
)
def test_line_count_must_match_request_counts_total(
    make_settings: MakeSettings,
    hostile: HostileUpstream,
    batch_id: str,
    lines: int,
    total: int,
    code: str,
) -> None:
    """Fewer result lines than `request_counts.total` is incomplete; more is an inconsistent
    upstream; either way the batch fails with the reason, after its attempts."""
    settings = hostile_settings(make_settings, hostile)
    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=batch_json(batch_id, total)))
    body = b"".join(line(batch_id, n) + b"\n\n" for n in range(1, lines + 1))  # blanks: not lines
    hostile.answer(
        f"batch-predictions/{batch_id}/results",
        Answer(headers=NDJSON, body=body, framing="chunked"),
    )
    done = forward(settings, batch_id)
    assert done.returncode == 1, done.stdout + done.stderr
    state = last_state(settings, batch_id)
    assert state["status"] == "failed" and state["error"]["code"] == code, state
    assert state["expected_lines"] == total
    # What is in Kafka is counted exactly: every line up to the total, none past it.
    assert sum(state["lines"].values()) == min(lines, total)


def test_exact_count_with_blank_lines_is_forwarded(
    make_settings: MakeSettings, hostile: HostileUpstream, batch_id: str
) -> None:
    """Blank lines do not count: 4 result lines and some blanks against a total of 4 is whole."""
    settings = hostile_settings(make_settings, hostile)
    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=batch_json(batch_id, 4)))
    body = b"\n \n" + b"".join(line(batch_id, n) + b"\r\n\n" for n in range(1, 5))
    hostile.answer(f"batch-predictions/{batch_id}/results", Answer(headers=NDJSON, body=body))
    done = forward(settings, batch_id)
    assert done.returncode == 0, done.stdout + done.stderr
    state = last_state(settings, batch_id)
    assert state["status"] == "forwarded" and state["lines"] == {"succeeded": 4}


def test_oversized_batch_metadata_is_refused_unread(
    make_settings: MakeSettings, hostile: HostileUpstream, batch_id: str
) -> None:
    """A batch object past the size bound is an upstream error; it is never read whole."""
    settings = hostile_settings(make_settings, hostile)
    sent: list[int] = []

    async def huge() -> AsyncIterator[bytes]:
        yield b'{"id": "' + batch_id.encode() + b'", "padding": "'
        for _ in range(200):  # 200 x 1 MiB, far more than the bound
            sent.append(1)
            yield b"x" * 1_048_576

    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=huge, framing="close"))
    done = forward(settings, batch_id)
    assert done.returncode == 1
    state = last_state(settings, batch_id)
    assert state["status"] == "failed" and "larger than" in state["error"]["detail"]
    assert len(sent) < 200  # the forwarder hung up long before the end


def test_compressed_bomb_is_refused_undecoded(
    make_settings: MakeSettings, hostile: HostileUpstream, batch_id: str
) -> None:
    """A gzip body that inflates to 64 MiB of newlines (sent although identity was asked for) is
    refused undecoded: no compressed body is ever inflated, so none can blow up memory."""
    settings = hostile_settings(make_settings, hostile)
    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=batch_json(batch_id, 10)))
    bomb = gzip.compress(b"\n" * (64 * 1024 * 1024), compresslevel=9)
    hostile.answer(
        f"batch-predictions/{batch_id}/results",
        Answer(headers={**NDJSON, "Content-Encoding": "gzip"}, body=bomb),
    )
    done = forward(settings, batch_id)
    assert done.returncode == 1
    state = last_state(settings, batch_id)
    assert state["status"] == "failed" and "Content-Encoding 'gzip'" in state["error"]["detail"]
    results = [r for r in hostile.requests if r["path"].endswith("/results")]
    assert results and all(r["headers"].get("accept-encoding") == "identity" for r in results)


def test_endless_blank_lines_stop_at_the_line_bound(
    make_settings: MakeSettings, hostile: HostileUpstream, batch_id: str
) -> None:
    """An endless stream of newlines stops at the batch's line bound: total plus the blank
    allowance, never read to the end."""
    settings = hostile_settings(make_settings, hostile)
    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=batch_json(batch_id, 10)))

    async def newlines() -> AsyncIterator[bytes]:
        while True:
            yield b"\n" * 65536

    hostile.answer(
        f"batch-predictions/{batch_id}/results",
        Answer(headers=NDJSON, body=newlines, framing="chunked"),
    )
    done = forward(settings, batch_id)
    assert done.returncode == 1
    assert last_state(settings, batch_id)["error"]["code"] == "too_many_lines"


def test_endless_stream_without_total_stops_at_the_batch_limit(
    make_settings: MakeSettings, hostile: HostileUpstream, batch_id: str
) -> None:
    """A stream that never ends (and no total to check against) stops after the most lines a
    batch can hold, plus the blank-line allowance: it holds no slot for ever."""
    settings = hostile_settings(make_settings, hostile)
    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=batch_json(batch_id)))

    async def endless() -> AsyncIterator[bytes]:
        n = 0
        while True:
            n += 1
            yield line(batch_id, n) + b"\n"

    hostile.answer(
        f"batch-predictions/{batch_id}/results",
        Answer(headers=NDJSON, body=endless, framing="chunked"),
    )
    done = forward(settings, batch_id, timeout=300)
    assert done.returncode == 1
    state = last_state(settings, batch_id)
    assert state["error"]["code"] == "too_many_lines", state


def test_slow_endless_drip_hits_the_batch_deadline(
    make_settings: MakeSettings, hostile: HostileUpstream, batch_id: str
) -> None:
    """A stream that drips a line now and then for ever fails at FORWARDER_BATCH_TIMEOUT_SECONDS."""
    settings = hostile_settings(make_settings, hostile)
    hostile.answer(f"batch-predictions/{batch_id}", Answer(body=batch_json(batch_id)))

    async def drip() -> AsyncIterator[bytes]:
        n = 0
        while True:
            n += 1
            yield line(batch_id, n) + b"\n"
            await asyncio.sleep(0.5)

    hostile.answer(
        f"batch-predictions/{batch_id}/results",
        Answer(headers=NDJSON, body=drip, framing="chunked"),
    )
    started = time.monotonic()
    done = forward(settings, batch_id, FORWARDER_BATCH_TIMEOUT_SECONDS="4")
    assert done.returncode == 1
    assert time.monotonic() - started < 90
    state = last_state(settings, batch_id)
    assert state["error"]["code"] == "batch_timeout", state


def test_nan_retry_after_is_ignored_not_slept_on(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """`Retry-After: nan` (and `retry-after-ms: inf`) fall back to the backoff: the batch is
    retried and forwarded, and every log line stays valid JSON."""
    settings = make_settings()
    fake_datagrid.configure(
        batch_id,
        lines=[line(batch_id, n).decode() for n in range(1, 4)],
        faults=[
            {"kind": "status", "code": 503, "headers": {"Retry-After": "nan"}},
            {"kind": "status", "code": 429, "headers": {"retry-after-ms": "inf"}},
        ],
    )
    done = forward(settings, batch_id, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for raw in done.stderr.splitlines():
        json.loads(raw)  # NaN or Infinity would make this raise
    assert "NaN" not in done.stderr and "Infinity" not in done.stderr


def test_headers_count_in_the_size_check(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """A line whose `status` (copied into a header) pushes the record past the topic's limit is
    dead-lettered as too_large; the rest of the batch is forwarded."""
    settings = make_settings()
    big = json.dumps({"custom_id": "big", "status": "s" * 600_000, "batch_id": batch_id})
    lines = [line(batch_id, 1).decode(), big, line(batch_id, 3).decode()]
    fake_datagrid.configure(batch_id, lines=lines)
    done = forward(settings, batch_id)
    assert done.returncode == 0, done.stdout + done.stderr
    state = last_state(settings, batch_id)
    assert state["status"] == "forwarded"
    assert state["lines"] == {"succeeded": 2} and state["dead_letters"] == {"too_large": 1}
    (dead,) = topic_records(settings, settings.dead_letter_topic, batch_id)
    assert dead.headers["forwarder-error"] == b"too_large"
    assert dead.headers["datagrid-line"] == b"2"


# --- secrets ------------------------------------------------------------------------------------


def test_api_key_with_a_trailing_newline_works_and_never_leaks(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """A key read from `echo ... | base64` (trailing newline) is stripped at start and works."""
    settings = make_settings()
    fake_datagrid.configure(batch_id, lines=[line(batch_id, 1).decode()])
    env = forwarder_env(settings)
    env["DATAGRID_API_KEY"] = API_KEY + "\n"
    done = run_forwarder(env, "forward", batch_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert API_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize("key", [API_KEY + "\u00e9", API_KEY + "\nmore", API_KEY + "\x01"])
def test_unusable_api_key_exits_2_naming_the_variable_without_echoing_it(
    make_settings: MakeSettings, batch_id: str, key: str
) -> None:
    """A key that cannot go into an HTTP header stops start-up: exit 2, no traceback, no key."""
    env = forwarder_env(make_settings())
    env["DATAGRID_API_KEY"] = key
    done = run_forwarder(env, "forward", batch_id)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "DATAGRID_API_KEY" in done.stderr and "Traceback" not in done.stderr
    assert API_KEY not in done.stdout + done.stderr


def test_misspelt_variable_exits_2_naming_it_and_the_closest(
    make_settings: MakeSettings, batch_id: str
) -> None:
    """`FORWARDER_CONCURENCY=8` is refused, not silently ignored."""
    env = forwarder_env(make_settings())
    env["FORWARDER_CONCURENCY"] = "8"
    done = run_forwarder(env, "forward", batch_id)
    assert done.returncode == 2
    assert "FORWARDER_CONCURENCY" in done.stderr and "FORWARDER_CONCURRENCY" in done.stderr


def test_missing_ca_file_exits_2_naming_the_variable(
    make_settings: MakeSettings, batch_id: str, tmp_path: Path
) -> None:
    """A Kafka CA file that does not exist stops start-up with one line, exit 2."""
    env = forwarder_env(make_settings())
    env["FORWARDER_KAFKA_SECURITY_PROTOCOL"] = "SSL"
    env["FORWARDER_KAFKA_SSL_CAFILE"] = str(tmp_path / "nope.pem")
    done = run_forwarder(env, "forward", batch_id)
    assert done.returncode == 2
    assert "FORWARDER_KAFKA_SSL_CAFILE" in done.stderr and "Traceback" not in done.stderr


# --- the HTTP server ----------------------------------------------------------------------------


@pytest.fixture
def served(make_settings: MakeSettings, tmp_path: Path) -> Iterator[Forwarder]:
    """One `forwarder serve` with a 2 s request deadline."""
    fwd = Forwarder(make_settings(), tmp_path, FORWARDER_HTTP_REQUEST_TIMEOUT_SECONDS="2").start()
    try:
        yield fwd.wait_ready()
    finally:
        fwd.stop()


def test_slow_clients_are_cut_off_and_health_stays_fast(served: Forwarder) -> None:
    """Clients that trickle headers or bodies are disconnected (or answered 408) at the request
    deadline, while /healthz answers at once."""
    slow: list[socket.socket] = []
    for n in range(60):
        sock = socket.create_connection(("127.0.0.1", served.port))
        if n % 2:
            sock.sendall(b"POST /webhooks/datagrid HTTP/1.1\r\nHost: x\r\n")  # headers never end
        else:
            sock.sendall(
                b"POST /webhooks/datagrid HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
            )  # the body never comes
        slow.append(sock)
    started = time.monotonic()
    assert served.http.get("/healthz").status_code == 200
    assert time.monotonic() - started < 2
    deadline = time.monotonic() + 20
    for sock in slow:
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except TimeoutError:
            pytest.fail("a slow client was still connected past the request deadline")
        finally:
            sock.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_non_ascii_signature_timestamp_is_401_and_counted(served: Forwarder) -> None:
    """`t=²` is a malformed signature (401, counted), never a 500."""
    response = served.http.post(
        "/webhooks/datagrid",
        content=b'{"id":"evt"}',
        headers={"Datagrid-Signature": "t=\u00b2,v1=00".encode()},
    )
    assert response.status_code == 401
    metrics = served.http.get("/metrics").text
    assert 'forwarder_webhooks_total{outcome="bad_signature"} 1.0' in metrics
    assert not served.events("request_crashed")


# --- exactly-once, long batches ------------------------------------------------------------------


def test_exactly_once_batch_longer_than_a_minute_then_its_neighbour(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, tmp_path: Path
) -> None:
    """A batch that streams for over 60 s commits (the transaction outlives aiokafka's 60 s
    default), read_committed sees it once, and the next batch on its jobs partition follows."""
    settings = make_settings(delivery="exactly-once", kafka_topic_partitions=2)
    slow = f"bpred_slow_{uuid.uuid4().hex[:8]}"
    partition = partition_for(slow.encode(), 2)
    neighbour = next(
        b
        for b in (f"bpred_next_{uuid.uuid4().hex[:8]}" for _ in range(100))
        if partition_for(b.encode(), 2) == partition
    )
    slow_lines = [line(slow, n).decode() for n in range(1, 34)]
    fake_datagrid.configure(
        slow, lines=slow_lines, chunk_size=len(slow_lines[0]) + 1, drip_delay=2.0
    )  # 33 chunks, 2 s apart: about 66 s
    fake_datagrid.configure(neighbour, lines=[line(neighbour, n).decode() for n in range(1, 6)])
    fwd = Forwarder(settings, tmp_path, FORWARDER_DATAGRID_READ_TIMEOUT="30").start()
    try:
        fwd.wait_ready()
        assert fwd.queue(slow).status_code == 202
        assert fwd.queue(neighbour).status_code == 202

        def forwarded(batch: str) -> bool:
            state = fwd.state(batch)
            return state is not None and state["status"] == "forwarded"

        wait_until(lambda: forwarded(slow), 200, "the slow batch", interval=1)
        wait_until(lambda: forwarded(neighbour), 60, "its neighbour", interval=0.5)
    finally:
        fwd.stop()
    assert fwd.events("batch_forwarded")[0]["duration_s"] > 60
    slow_records = topic_records(settings, settings.results_topic, slow)
    expected = sorted(f"req-{n}".encode() for n in range(1, 34))
    assert sorted(r.key for r in slow_records) == expected
    assert len(topic_records(settings, settings.results_topic, neighbour)) == 5


# --- the results topic changes under a batch ----------------------------------------------


def test_results_topic_recreated_with_fewer_partitions_mid_batch(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """Deleting the results topic and recreating it with fewer partitions mid-batch loses no
    work silently: no internal task dies unseen, and the counts never exceed the batch."""
    settings = make_settings(kafka_topic_partitions=6, kafka_linger_ms=1)
    warm = f"{batch_id}_warm"
    fake_datagrid.configure(warm, lines=[line(warm, 1).decode()])
    assert forward(settings, warm).returncode == 0  # the topics exist, with 6 partitions
    lines = [line(batch_id, n).decode() for n in range(1, 401)]
    fake_datagrid.configure(batch_id, lines=lines, chunk_size=2000, drip_delay=0.05)
    env = forwarder_env(settings)
    proc = subprocess.Popen(
        [sys.executable, "-m", "forwarder.cli", "forward", batch_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Recreate once the stream has begun, not after a fixed 2 s: a slow start (imports, Kafka
    # connections) on a loaded machine would otherwise recreate the topic before the batch.
    def streaming() -> bool:
        if any(
            r["batch_id"] == batch_id and r["path"].endswith("/results") and r["lines_sent"]
            for r in fake_datagrid.requests()
        ):
            return True
        if proc.poll() is not None:
            raise AssertionError(f"forward ended before streaming: {proc.communicate()}")
        return False

    wait_until(streaming, 120, "the forward streaming the batch", interval=0.05)
    asyncio.run(_recreate(settings.kafka_bootstrap_servers, settings.results_topic, 2))
    _, err = proc.communicate(timeout=240)
    # aiokafka refusing a partition that vanished is handled (the attempt fails, its lines are
    # re-sent): never a task dying unseen, never a traceback.
    assert "never retrieved" not in err and "Traceback" not in err, err[-3000:]
    state = last_state(settings, batch_id)
    # Whichever way it ended, every line the recreated topic holds is counted in the state, and
    # the state counts no line twice (it may count more than the topic holds: lines Kafka
    # acknowledged before the deletion went with the old topic); a forwarded batch counts all.
    held = {
        r.headers["datagrid-line"]
        for r in topic_records(settings, settings.results_topic, batch_id)
    }
    counted = sum(state["lines"].values())
    assert len(held) <= counted <= 400, (len(held), state)
    assert state["status"] in ("forwarded", "failed"), state
    if state["status"] == "forwarded":
        assert counted == 400
    else:
        assert state["error"]["code"] in ("topic_missing", "kafka_error", "upstream_unavailable")


async def _recreate(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        for _ in range(100):
            try:
                await admin.create_topics([NewTopic(topic, partitions, 1)])
                return
            except TopicAlreadyExistsError:  # the deletion is still in progress
                await asyncio.sleep(0.2)
        raise AssertionError(f"{topic} could not be created again within 20 s")
    finally:
        await admin.close()
