"""Tests of the fake Datagrid server itself, through real HTTP against a subprocess."""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.fake_datagrid import (
    FakeDatagrid,
    expected_body,
    generate_lines,
    start_fake_datagrid,
)

API_KEY = "test-key-123"
PROBLEM = "https://api.datagrid.com/errors/"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeDatagrid]:
    """One fake server for the whole module."""
    with start_fake_datagrid(API_KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeDatagrid) -> None:
    """Every test starts with no batches and an empty request log."""
    fake.reset()


@pytest.fixture
def client(fake: FakeDatagrid) -> Iterator[httpx.Client]:
    """An authenticated client for the fake's /v1 API."""
    with httpx.Client(base_url=fake.base_url + "/", headers=fake.auth_headers) as http:
        yield http


def raw_get(fake: FakeDatagrid, path: str) -> tuple[bytes, bytes]:
    """GET over a bare socket; return the response head and the undecoded body bytes."""
    url = urlsplit(fake.base_url)
    request = (
        f"GET {url.path}{path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(request.encode())
        data = b""
        while part := sock.recv(65536):
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def parse_chunked(body: bytes) -> list[bytes]:
    """Split a chunked body into its chunks; assert it ends with the 0-chunk."""
    chunks: list[bytes] = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n"
            return chunks
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def test_missing_or_wrong_key_is_401_problem(fake: FakeDatagrid, client: httpx.Client) -> None:
    """No bearer token or a wrong one gets a no_authentication problem."""
    fake.configure("b1")
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope"}):
        response = client.get("batch-predictions/b1/results", headers=headers)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == PROBLEM + "no_authentication"
        assert problem["status"] == 401 and problem["title"] and problem["detail"]
    assert [r["auth_ok"] for r in fake.requests()] == [False, False]


def test_unknown_batch_is_404_problem(client: httpx.Client) -> None:
    """An unknown batch is resource_not_found on both endpoints."""
    for path in ("batch-predictions/nope", "batch-predictions/nope/results"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["type"] == PROBLEM + "resource_not_found"
        assert response.headers["x-request-id"]


def test_retrieve_returns_batch_object(fake: FakeDatagrid, client: httpx.Client) -> None:
    """The batch object has every documented field, counts and a results_url when terminal."""
    fake.configure(
        "b2", generate={"count": 5, "statuses": ["succeeded", "errored"]}, metadata={"a": "b"}
    )
    response = client.get("batch-predictions/b2")
    assert response.status_code == 200 and response.headers["x-request-id"]
    batch = response.json()
    assert list(batch) == [
        "object", "id", "status", "model", "completion_window", "created_at", "expires_at",
        "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
        "cancelled_at", "expired_at", "request_counts", "metadata", "error", "results_url",
    ]  # fmt: skip
    assert batch["object"] == "batch_prediction" and batch["status"] == "completed"
    assert batch["completed_at"] and batch["failed_at"] is None
    assert batch["request_counts"] == {
        "total": 5, "processing": 0, "succeeded": 3, "errored": 2, "canceled": 0, "expired": 0
    }  # fmt: skip
    assert batch["results_url"] == "/v1/batch-predictions/b2/results"
    assert batch["metadata"] == {"a": "b"} and batch["error"] is None


def test_status_sequence_gives_409_until_terminal(fake: FakeDatagrid, client: httpx.Client) -> None:
    """Each request pops one status; results are 409 conflict until the batch is terminal."""
    fake.configure(
        "b3",
        lines=['{"custom_id":"x"}'],
        status_sequence=["validating", "in_progress", "completed"],
    )
    first = client.get("batch-predictions/b3")
    assert first.json()["status"] == "validating" and first.json()["results_url"] is None
    assert first.json()["request_counts"]["processing"] == 1
    pending = client.get("batch-predictions/b3/results")
    assert pending.status_code == 409
    assert pending.json()["type"] == PROBLEM + "conflict"
    assert client.get("batch-predictions/b3/results").content == b'{"custom_id":"x"}\n'
    assert client.get("batch-predictions/b3").json()["status"] == "completed"


def test_non_terminal_code_is_configurable(fake: FakeDatagrid, client: httpx.Client) -> None:
    """non_terminal_code picks the answer for a pending batch; 200 serves partial lines."""
    fake.configure("b4", status="in_progress", non_terminal_code=404)
    assert client.get("batch-predictions/b4/results").status_code == 404
    fake.configure("b5", status="in_progress", non_terminal_code=200, lines=["a"])
    assert client.get("batch-predictions/b5/results").content == b"a\n"


def test_results_are_chunked_ndjson(fake: FakeDatagrid, client: httpx.Client) -> None:
    """Results use chunked transfer (no Content-Length), x-ndjson and an X-Request-Id."""
    fake.configure("b6", generate={"count": 3})
    with client.stream("GET", "batch-predictions/b6/results") as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers["x-request-id"].startswith("req_")
        body = response.read()
    lines = body.splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0])["object"] == "batch_prediction.result"


def test_chunk_framing_uses_exact_chunk_size(fake: FakeDatagrid) -> None:
    """On the wire, every chunk has exactly chunk_size bytes except the last."""
    lines = ["é€😀", "a\r", "", "{}"]
    fake.configure("b7", lines=lines, chunk_size=7, line_ending="\r\n")
    head, body = raw_get(fake, "/batch-predictions/b7/results")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks = parse_chunked(body)
    assert all(len(c) == 7 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 7
    assert b"".join(chunks) == expected_body("b7", lines=lines, line_ending="\r\n")


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 65536])
def test_chunk_sizes_reproduce_exact_bytes(
    fake: FakeDatagrid, client: httpx.Client, chunk_size: int
) -> None:
    """Raw bytes (invalid UTF-8, split characters, CRLF) come back exactly at any chunk size."""
    lines: list[str | bytes] = ["héllo €", b"\xff\xfe\x00bad", "crlf\r\nembedded", "", "  ", "last"]
    spec: dict[str, Any] = {"lines": lines, "line_ending": "\r\n", "trailing_newline": False}
    fake.configure("b8", chunk_size=chunk_size, **spec)
    with client.stream("GET", "batch-predictions/b8/results") as response:
        body = b"".join(response.iter_raw())
    expected = b"h\xc3\xa9llo \xe2\x82\xac\r\n\xff\xfe\x00bad\r\ncrlf\r\nembedded\r\n\r\n  \r\nlast"
    assert body == expected == expected_body("b8", **spec)


def test_generate_is_deterministic(fake: FakeDatagrid, client: httpx.Client) -> None:
    """Same generate spec -> same bytes, equal to generate_lines, exact lengths, cycling ids."""
    statuses = ["succeeded", "errored", "canceled", "expired"]
    spec = {"count": 20_000, "line_bytes": 300, "statuses": statuses, "distinct_ids": 7}
    fake.configure("gen", generate=spec, chunk_size=4096)
    first = client.get("batch-predictions/gen/results").content
    fake.configure("gen", generate=spec, chunk_size=65536)
    second = client.get("batch-predictions/gen/results").content
    expected = b"".join(line + b"\n" for line in generate_lines("gen", spec))
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    assert first == expected
    lines = [json.loads(line) for line in first.splitlines()[:8]]
    assert [d["status"] for d in lines[:4]] == statuses
    assert lines[0]["output"]["seq"] == 1 and lines[1]["output"] is None
    assert lines[1]["error"]["type"] == PROBLEM + "prediction_failed"
    assert lines[7]["custom_id"] == lines[0]["custom_id"] == "cid-00000000"
    assert all(d["batch_id"] == "gen" for d in lines)
    assert {len(line) for line in first.splitlines()} == {300}


def test_status_faults_are_fifo(fake: FakeDatagrid, client: httpx.Client) -> None:
    """Status faults are consumed one per results request, with problem types and retry headers."""
    fake.configure(
        "f1",
        lines=["ok"],
        faults=[
            {"kind": "status", "code": 503},
            {"kind": "status", "code": 429, "retry_after": 1},
            {"kind": "status", "code": 429, "retry_after_ms": 250},
            {"kind": "status", "code": 410},
            {"kind": "status", "code": 500, "headers": {"x-should-retry": "false"}},
        ],
    )
    responses = [client.get("batch-predictions/f1/results") for _ in range(6)]
    assert [r.status_code for r in responses] == [503, 429, 429, 410, 500, 200]
    types = [r.json()["type"].removeprefix(PROBLEM) for r in responses[:5]]
    assert types == [
        "service_unavailable", "rate_limit_exceeded", "rate_limit_exceeded", "results_gone",
        "internal_error",
    ]  # fmt: skip
    assert all(r.headers["content-type"] == "application/problem+json" for r in responses[:5])
    assert responses[1].headers["retry-after"] == "1"
    assert responses[2].headers["retry-after-ms"] == "250"
    assert responses[4].headers["x-should-retry"] == "false"
    assert responses[5].content == b"ok\n"
    assert fake.batch("f1")["faults_left"] == []


def test_results_gone_flag(fake: FakeDatagrid, client: httpx.Client) -> None:
    """results_gone: results are 410 and the batch's results_url is null."""
    fake.configure("g1", results_gone=True)
    assert client.get("batch-predictions/g1/results").json()["type"] == PROBLEM + "results_gone"
    assert client.get("batch-predictions/g1").json()["results_url"] is None


@pytest.mark.asyncio
@pytest.mark.parametrize("mid_line", [False, True])
async def test_drop_fault_breaks_the_stream(fake: FakeDatagrid, mid_line: bool) -> None:
    """A drop fault makes the async httpx stream raise after the exact prefix, not end cleanly."""
    fake.configure(
        "d1",
        generate={"count": 1000},
        chunk_size=1000,
        faults=[{"kind": "drop", "after_lines": 400, "mid_line": mid_line}],
    )
    lines = list(generate_lines("d1", {"count": 1000}))
    prefix = b"".join(line + b"\n" for line in lines[:400])
    if mid_line:
        prefix += lines[400][: len(lines[400]) // 2]
    received = bytearray()
    async with httpx.AsyncClient(base_url=fake.base_url + "/", headers=fake.auth_headers) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("GET", "batch-predictions/d1/results") as response:
                async for chunk in response.aiter_raw():
                    received += chunk
        assert bytes(received) == prefix
        # The queue is empty now: the retry streams everything.
        retry = await http.get("batch-predictions/d1/results")
        assert retry.content == b"".join(line + b"\n" for line in lines)
    assert [r["outcome"] for r in fake.requests()[-2:]] == ["dropped", "complete"]


def test_drop_fault_with_reset(fake: FakeDatagrid, client: httpx.Client) -> None:
    """reset: true closes with RST; httpx raises a transport error rather than ending cleanly."""
    fake.configure(
        "d2", generate={"count": 100}, faults=[{"kind": "drop", "after_lines": 10, "reset": True}]
    )
    with (
        pytest.raises(httpx.TransportError),
        client.stream("GET", "batch-predictions/d2/results") as response,
    ):
        for _ in response.iter_raw():
            pass


def test_drop_after_every_line_still_errors(fake: FakeDatagrid, client: httpx.Client) -> None:
    """Dropping after the last line (no terminating chunk) is still an error, not a clean EOF."""
    fake.configure("d3", lines=["a", "b"], faults=[{"kind": "drop", "after_lines": 2}])
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("GET", "batch-predictions/d3/results") as response,
    ):
        for chunk in response.iter_raw():
            received += chunk
    assert received == b"a\nb\n"


def test_stall_fault_pauses_then_completes(fake: FakeDatagrid, client: httpx.Client) -> None:
    """A stall sends N lines, goes silent for the given seconds, then finishes the body."""
    fake.configure(
        "s1", generate={"count": 50}, faults=[{"kind": "stall", "after_lines": 20, "seconds": 0.6}]
    )
    arrivals: list[tuple[float, int]] = []
    with client.stream("GET", "batch-predictions/s1/results") as response:
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic(), len(chunk)))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) >= 0.55
    before_gap = sum(n for _, n in arrivals[: gaps.index(max(gaps)) + 1])
    assert before_gap == sum(len(line) + 1 for line in generate_lines("s1", {"count": 20}))
    assert sum(n for _, n in arrivals) == len(expected_body("s1", generate={"count": 50}))


def test_stall_trips_a_read_timeout(fake: FakeDatagrid, client: httpx.Client) -> None:
    """A stall longer than the client's read timeout surfaces as httpx.ReadTimeout."""
    fake.configure(
        "s2", generate={"count": 5}, faults=[{"kind": "stall", "after_lines": 2, "seconds": 2}]
    )
    with (
        pytest.raises(httpx.ReadTimeout),
        client.stream("GET", "batch-predictions/s2/results", timeout=0.3) as response,
    ):
        for _ in response.iter_raw():
            pass


def test_drip_delay_spaces_chunks(fake: FakeDatagrid, client: httpx.Client) -> None:
    """drip_delay sleeps between chunks, so the body takes (chunks - 1) * delay."""
    fake.configure("p1", lines=["0123456789"] * 2, chunk_size=5, drip_delay=0.05)
    started = time.monotonic()
    body = client.get("batch-predictions/p1/results").content
    assert body == b"0123456789\n" * 2
    assert time.monotonic() - started >= 0.04 * 4  # 5 chunks -> 4 pauses


def test_request_log_and_reset(fake: FakeDatagrid, client: httpx.Client) -> None:
    """The request log records method, path, status, auth and counts; reset clears everything."""
    fake.configure("r1", lines=["x", "y"])
    client.get("batch-predictions/r1/results", headers={"X-Trace": "t1"})
    client.get("batch-predictions/r1", headers={"Authorization": "Bearer wrong"})
    first, second = fake.requests()
    assert (first["method"], first["path"], first["status"], first["auth_ok"]) == (
        "GET", "/v1/batch-predictions/r1/results", 200, True
    )  # fmt: skip
    assert first["lines_sent"] == 2 and first["bytes_sent"] == 4 and first["outcome"] == "complete"
    assert first["headers"]["x-trace"] == "t1" and "authorization" not in first["headers"]
    assert (second["status"], second["auth_ok"]) == (401, False)
    assert isinstance(first["timestamp"], float)
    fake.clear_requests()
    assert fake.requests() == []
    fake.reset()
    assert client.get("batch-predictions/r1").status_code == 404


def test_control_rejects_bad_specs(fake: FakeDatagrid) -> None:
    """Typos and invalid values in a spec are refused with a message, not silently ignored."""
    bad_specs: list[dict[str, Any]] = [
        {"statuss": "completed"},
        {"status": "done"},
        {"lines": ["a"], "generate": {"count": 1}},
        {"faults": [{"kind": "explode"}]},
        {"chunk_size": 0},
        {"line_ending": "\r"},
    ]
    for spec in bad_specs:
        with pytest.raises(ValueError, match="fake rejected spec"):
            fake.configure("bad", **spec)
