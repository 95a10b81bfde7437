"""Pure rules, without a broker: commit safety, jobs, retry hints, error mapping, settings."""

from __future__ import annotations

import asyncio
import math
import time
import types
from pathlib import Path

import httpx
import pytest

from forwarder.config import SecretStr, Settings
from forwarder.datagrid import RateLimiter, _raise_for_status, expected_lines, parse_retry_after
from forwarder.environment import check_unknown_variables, load_settings
from forwarder.errors import (
    Backoff,
    BatchNotReady,
    ConfigError,
    Fenced,
    ForwarderError,
    KafkaError,
    Retry,
    SignatureError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from forwarder.jobs import Job, parse_job
from forwarder.kafka import murmur2, py_murmur2
from forwarder.observability import Redactor
from forwarder.webhooks import sign, verify_signature

# Kafka's own test vectors (UtilsTest.testMurmur2), as signed Java ints.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("impl", [murmur2, py_murmur2], ids=["compiled", "python"])
def test_murmur2_matches_javas_test_vectors(impl: object) -> None:
    """Both murmur2 implementations give Java's values on Kafka's own test vectors."""
    for data, java in JAVA_MURMUR2.items():
        assert impl(data) == java & 0xFFFFFFFF, data  # type: ignore[operator]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            b'{"batch_id":"bpred_1","source":"webhook","event_id":"evt_1"}',
            Job("bpred_1", "webhook", "evt_1"),
        ),
        (b"bpred_2", Job("bpred_2")),
        (b'  "bpred_3"\n', Job("bpred_3")),
        (b'{"batch_id":"bpred_4","replay":true}', Job("bpred_4", replay=True)),
    ],
)
def test_parse_job_reads_json_jobs_and_bare_ids(value: bytes, expected: Job) -> None:
    """A JSON job, a bare id and a JSON string id are all jobs."""
    assert parse_job(value) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "nan", "retry-after": "2"}, 2.0),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "-inf"}, None),
        ({"retry-after-ms": "1e400"}, None),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "Mon, 99 Foo 99999 99:99:99 GMT"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_finite_and_not_negative(
    headers: dict[str, str], expected: float | None
) -> None:
    """Retry hints become finite seconds >= 0, or None; NaN, infinity and garbage are ignored."""
    assert parse_retry_after(httpx.Headers(headers)) == expected


def test_backoff_is_finite_capped_and_jittered() -> None:
    """Every delay is finite and at most the cap, whatever the attempt or the server's hint."""
    backoff = Backoff(base=1.0, cap=30.0)
    for attempt in (1, 2, 10, 1_000_000):
        delay = backoff.delay(attempt)
        assert 0 <= delay <= 30.0 and math.isfinite(delay)
    for hint in (math.nan, math.inf, -math.inf, -1.0, 1e300):
        delay = backoff.delay(1, hint)
        assert 0 <= delay <= 30.0 and math.isfinite(delay), hint
    assert backoff.delay(1, 2.5) == 2.5


@pytest.mark.parametrize(
    ("status", "error", "retry"),
    [
        (429, UpstreamUnavailable, Retry.BACKOFF),
        (408, UpstreamUnavailable, Retry.BACKOFF),
        (500, UpstreamUnavailable, Retry.BACKOFF),
        (503, UpstreamUnavailable, Retry.BACKOFF),
        (409, BatchNotReady, Retry.LATER),
        (401, UpstreamRejected, Retry.NEVER),
        (403, UpstreamRejected, Retry.NEVER),
        (404, UpstreamRejected, Retry.NEVER),
        (410, UpstreamRejected, Retry.NEVER),
        (422, UpstreamRejected, Retry.NEVER),
        (418, UpstreamRejected, Retry.NEVER),
    ],
)
def test_upstream_status_maps_to_one_error_and_retry_kind(
    status: int, error: type[Exception], retry: Retry
) -> None:
    """Each Datagrid status becomes one error of the tree, with its kind of retry."""
    with pytest.raises(error) as caught:
        _raise_for_status("batch-predictions/x", status, httpx.Headers(), b'{"detail":"d"}')
    assert caught.value.retry is retry  # type: ignore[attr-defined]


def test_kafka_errors_say_how_to_retry() -> None:
    """A fenced producer hands the work off; a Kafka error retries per its cause."""
    assert Fenced("x").retry is Retry.HAND_OFF and not Fenced("x").retriable
    assert KafkaError("x").retry is Retry.BACKOFF
    assert KafkaError("x", retriable=False).retry is Retry.NEVER


def test_expected_lines_reads_request_counts_total() -> None:
    """The batch's total is an int >= 0 or unknown; anything else is ignored."""
    assert expected_lines({"request_counts": {"total": 10}}) == 10
    for odd in (
        {},
        {"request_counts": None},
        {"request_counts": {"total": "10"}},
        {"request_counts": {"total": -1}},
        {"request_counts": {"total": True}},
    ):
        assert expected_lines(odd) is None


@pytest.mark.parametrize("t", ["²", "١٢٣", "12a", "", "1" * 13, "-5", "+5", " 5"])
def test_signature_timestamp_must_be_ascii_digits(t: str) -> None:
    """A timestamp of non-ASCII digits (or not digits) is a bad signature, never a crash."""
    body = b"{}"
    header = f"t={t},v1={sign(b's', 0, body)}"
    with pytest.raises(SignatureError):
        verify_signature(header, body, [b"s"], now=time.time(), tolerance=300)


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [(-300, True), (300, True), (-301, False), (301, False), (-300.5, False), (300.5, False)],
)
def test_signature_tolerance_edge_is_exact(offset: float, accepted: bool) -> None:
    """A signature stamped exactly 300 s before or after now passes; a moment more fails (the
    edge, checked at a fixed ``now`` instead of over HTTP, where it moves with the clock)."""
    body, now = b"{}", 1_700_000_000.0
    t = 1_700_000_000
    header = f"t={t},v1={sign(b's', t, body)}"
    if accepted:
        assert verify_signature(header, body, [b"s"], now=now + offset, tolerance=300) == t
    else:
        with pytest.raises(SignatureError, match="tolerance"):
            verify_signature(header, body, [b"s"], now=now + offset, tolerance=300)


def _settings(**values: object) -> Settings:
    return Settings(**values)


def test_secrets_lose_surrounding_white_space() -> None:
    """A key from `echo ... | base64` ends in a newline: it is stripped, not sent."""
    settings = _settings(
        datagrid_api_key=SecretStr("dg_key\n"), webhook_secrets=" whsec_a ,whsec_b\n"
    )
    assert settings.datagrid_api_key is not None
    assert settings.datagrid_api_key.get_secret_value() == "dg_key"
    assert [s.get_secret_value() for s in settings.webhook_secrets] == ["whsec_a", "whsec_b"]


@pytest.mark.parametrize("key", ["dg\nkey", "dg_kéy", "dg\x7fkey", "  \n"])
def test_unusable_secrets_stop_start_up_naming_the_variable(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control or non-ASCII character, or only white space: exit 2 naming the variable."""
    monkeypatch.setenv("DATAGRID_API_KEY", key)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "FORWARDER_DATAGRID_API_KEY" in str(caught.value) or "DATAGRID_API_KEY" in str(
        caught.value
    )
    assert key.strip() not in str(caught.value) or not key.strip()


def test_unknown_variables_are_refused_with_the_closest_name() -> None:
    """A misspelt FORWARDER_* variable stops start-up naming it and the likely intended one."""
    with pytest.raises(ConfigError, match=r"FORWARDER_CONCURENCY.*FORWARDER_CONCURRENCY"):
        check_unknown_variables(
            {"FORWARDER_CONCURENCY": "4", "PATH": "/", "FORWARDER_DELIVERY": ""}
        )
    check_unknown_variables(
        {"FORWARDER_DELIVERY": "", "FORWARDER_DATAGRID_API_KEY": "", "HOME": ""}
    )


def test_missing_tls_file_names_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA file that does not exist, or does not parse, stops start-up naming the variable."""
    monkeypatch.setenv("FORWARDER_KAFKA_SSL_CAFILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="FORWARDER_KAFKA_SSL_CAFILE"):
        load_settings().check_files()
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    monkeypatch.setenv("FORWARDER_KAFKA_SSL_CAFILE", str(junk))
    with pytest.raises(ConfigError, match="FORWARDER_KAFKA_SSL_CAFILE"):
        load_settings().check_files()
    monkeypatch.setenv("FORWARDER_KAFKA_SSL_CERTFILE", str(junk))
    with pytest.raises(ConfigError, match="FORWARDER_KAFKA_SSL_KEYFILE"):
        load_settings().check_files()


def test_exactly_once_needs_a_transaction_longer_than_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch deadline past the transaction timeout would let the broker abort slow batches."""
    monkeypatch.setenv("FORWARDER_DELIVERY", "exactly-once")
    monkeypatch.setenv("FORWARDER_BATCH_TIMEOUT_SECONDS", "900")
    monkeypatch.setenv("FORWARDER_KAFKA_TRANSACTION_TIMEOUT_MS", "60000")
    with pytest.raises(ConfigError, match="FORWARDER_BATCH_TIMEOUT_SECONDS"):
        load_settings()


def test_redactor_scrubs_secrets_from_nested_values() -> None:
    """Every configured secret is masked in text, dicts and lists; short or empty ones are not
    treated as secrets (they would mask ordinary words)."""
    redact = Redactor(["dg_secret_key", "", "ab"])
    assert redact("Illegal header value b'Bearer dg_secret_key\\n'") == (
        "Illegal header value b'Bearer [redacted]\\n'"
    )
    assert redact.scrub({"detail": ["x dg_secret_key"], "n": 1}) == {
        "detail": ["x [redacted]"],
        "n": 1,
    }
    assert redact("ab cd") == "ab cd"


async def test_rate_limiter_keeps_to_the_window_and_to_the_servers_word() -> None:
    """At most N requests per endpoint per 60 s; a server saying the window is used up pauses
    that endpoint (and only that one) until its reset."""
    waits: list[float] = []
    limiter = RateLimiter(3, waits.append)
    for _ in range(3):
        await limiter.acquire("results")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limiter.acquire("results"), 0.2)
    assert waits and 59 < waits[0] <= 60
    await asyncio.wait_for(limiter.acquire("batch"), 0.2)  # another endpoint is not held up
    limiter.observe(
        "batch",
        200,
        httpx.Headers({"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(time.time() + 30)}),
    )
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limiter.acquire("batch"), 0.2)
    off = RateLimiter(0, waits.append)  # 0: no client-side limit, still the server's word
    for _ in range(500):
        await off.acquire("results")


class _Producer:
    """A producer stand-in for the publisher's bookkeeping: real aiokafka record batches, acks at
    once, except the first record batch of ``fail_partition``, which is refused."""

    def __init__(self, fail_partition: int | None) -> None:
        from aiokafka.cluster import ClusterMetadata

        self.fail_partition, self.units = fail_partition, 0
        # No metadata fetched yet: a refusal is never taken for a missing topic.
        self.client = types.SimpleNamespace(cluster=ClusterMetadata())

    def create_batch(self) -> object:
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(16_384, 0)

    async def send_batch(self, builder: object, topic: str, partition: int) -> asyncio.Future[None]:
        self.units += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if partition == self.fail_partition:
            self.fail_partition = None
            future.set_exception(OSError("refused"))
        else:
            future.set_result(None)
        return future


@pytest.mark.parametrize("fail_partition", [None, 0])
def test_publisher_counts_each_acknowledged_line_once_and_holds_little(
    fail_partition: int | None,
) -> None:
    """Lines are counted as their units are acknowledged (memory stays flat), but never those at
    or past the first refused line, which the next attempt publishes and counts again; here the
    refused record batch (partition 0, one line in 100) was opened long before many others that
    Kafka acknowledged first."""
    from forwarder.kafka import TopicLimits, partition_for
    from forwarder.observability import Metrics
    from forwarder.publish import Batch, Progress, PublishConfig, Publisher

    keys = (f"id-{i}" for i in range(10**6))
    sparse = (k for k in keys if partition_for(k.encode(), 6) == 0 or fail_partition is None)
    dense = (k for k in (f"key-{i}" for i in range(10**6)) if partition_for(k.encode(), 6) != 0)
    pad = b"x" * 200
    skewed = fail_partition is not None  # else keys spread evenly, as custom ids do
    lines = [
        b'{"custom_id":"%s","status":"succeeded","pad":"%s"}'
        % (next(sparse if i % 100 == 50 or not skewed else dense).encode(), pad)
        for i in range(20_000)
    ]
    limits = TopicLimits(1_048_588, 1_048_588)
    config = PublishConfig.build(_settings(), limits, Metrics(process=False))
    progress, held = Progress(), []

    async def run() -> None:
        producer = _Producer(fail_partition)
        publisher = Publisher(config, producer, Batch("bpred_x", None), progress, 6)  # type: ignore[arg-type]
        try:
            for start in range(0, len(lines), 500):
                await publisher.publish(lines[start : start + 500])
                held.append(len(publisher.acks.acked))
        except ForwarderError:
            assert fail_partition is not None  # the refusal surfaces mid-stream, as in the pipeline
        try:
            await publisher.drain()
        except ForwarderError:
            assert fail_partition is not None
        assert producer.units > 64  # so counting as acknowledged happened before any refusal
        counted = sum(progress.lines.values())
        if fail_partition is None:
            assert counted == len(lines) and progress.acked_through == len(lines)
            # Counted as acknowledged, not kept to the end (with keys spread evenly, no record
            # batch stays open long; a sparse partition's open batch holds counting back).
            assert max(held) < 64 + 6
        else:
            # Every line before the refused batch's first is counted, none after it.
            assert publisher.acks.failed_from == 51
            assert counted == progress.acked_through == 50

    asyncio.run(run())
