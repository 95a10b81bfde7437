"""Fault suite: real ``forwarder serve`` processes, a real broker, the fake Datagrid over HTTP.

Every case injects one fault while a batch is in flight, then reads the results topic back with
``read_committed`` and counts, per (``datagrid-batch-id``, key): lines expected, lines seen,
duplicate copies.  Exactly-once must show 0 lost and 0 duplicates; at-least-once 0 lost, with its
duplicates counted and explained.  Each case records its numbers (``tests.reliability_report``),
from which ``python -m tests.reliability_report`` renders the table in ``docs/reliability.md``.

Waiting is by polling with deadlines; the only sleeps are the faults themselves (a stall of N s).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from forwarder.config import Delivery, Settings
from forwarder.state import BatchState
from forwarder.webhooks import sign
from tests.fake_datagrid import FakeDatagrid, generate_lines
from tests.kafka_helpers import read_topic
from tests.reliability_report import Outcome, Tally, record
from tests.service_helpers import WEBHOOK_SECRET, Forwarder, event_body, wait_until

MakeSettings = Callable[..., Settings]
Expected = dict[tuple[str, bytes], bytes]

MODES = [
    pytest.param(Delivery.AT_LEAST_ONCE, id="at-least-once"),
    pytest.param(Delivery.EXACTLY_ONCE, id="exactly-once"),
]


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def forwarders() -> Iterator[list[Forwarder]]:
    """Every forwarder a test starts is resumed (if paused) and stopped at its end."""
    started: list[Forwarder] = []
    yield started
    for fwd in started:
        if fwd.process is not None and fwd.process.poll() is None:
            os.kill(fwd.process.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        fwd.stop()


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Callable[..., Outcome]:
    """Record a case's measured outcome (before its assertions, so failures are recorded too)."""
    started = time.monotonic()

    def note(case: str, title: str, mode: Delivery | str, tally: Tally, **fields: Any) -> Outcome:
        outcome = Outcome.from_tally(
            tally,
            suite="faults",
            case=case,
            title=title,
            mode=str(mode),
            seconds=round(time.monotonic() - started, 1),
            test=request.node.nodeid,
            **fields,
        )
        record(outcome)
        return outcome

    return note


def start(forwarders: list[Forwarder], settings: Settings, log_dir: Path, **env: str) -> Forwarder:
    """Start one more ``forwarder serve`` (not waiting for readiness)."""
    fwd = Forwarder(settings, log_dir, name=f"fwd{len(forwarders)}", **env).start()
    forwarders.append(fwd)
    return fwd


def expect(batch_id: str, spec: dict[str, Any]) -> Expected:
    """The (batch id, key) -> line bytes a generated batch must leave in the results topic
    (the specs here give every line its own ``custom_id``)."""
    assert spec.get("distinct_ids") == spec["count"]
    return {
        (batch_id, f"cid-{i:08d}".encode()): line
        for i, line in enumerate(generate_lines(batch_id, spec))
    }


def tally(settings: Settings, expected: Expected) -> tuple[Tally, int]:
    """What read_committed consumers see of ``expected``, and how many dead letters exist."""
    bootstrap = settings.kafka_bootstrap_servers
    records = asyncio.run(read_topic(bootstrap, settings.results_topic))
    batches = {batch_id for batch_id, _ in expected}
    mine = [
        (r.headers.get("datagrid-batch-id", b"").decode(), r.key, r.value)
        for r in records
        if r.headers.get("datagrid-batch-id", b"").decode() in batches
    ]
    dead = asyncio.run(read_topic(bootstrap, settings.dead_letter_topic))
    return Tally.of(mine, expected), len(dead)


def _in_log(settings: Settings) -> list[tuple[str, float]]:
    """(``datagrid-batch-id``, create time in s) of every data record in the results topic as
    read_uncommitted sees them (open and aborted transactions too)."""
    records = asyncio.run(
        read_topic(
            settings.kafka_bootstrap_servers,
            settings.results_topic,
            isolation_level="read_uncommitted",
        )
    )
    return [(r.headers.get("datagrid-batch-id", b"").decode(), r.timestamp / 1000) for r in records]


def log_counts(settings: Settings) -> Counter[str]:
    """Records written to the results topic so far per batch, committed or not."""
    records = _in_log(settings)
    return Counter(batch for batch, _ in records)


def written_between(settings: Settings, start: float, end: float = float("inf")) -> int:
    """Records written to the results topic (committed or not) created in [start, end)."""
    records = _in_log(settings)
    return sum(1 for _, created in records if start <= created < end)


def log_count(settings: Settings) -> int:
    """Records written to the results topic so far, committed or not."""
    return log_counts(settings).total()


def states(settings: Settings, batch_id: str) -> list[BatchState]:
    """Committed state records of ``batch_id``, oldest first."""
    records = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.state_topic))
    return [BatchState.decode(r.value) for r in records if r.key == batch_id.encode() and r.value]


#: Producer batches small enough that some lines reach Kafka while a stream is held mid-batch,
#: whether the pipeline sends on linger or only once a partition's record batch is full.
SMALL_BATCHES: dict[str, Any] = {"kafka_batch_bytes": 16384}


def held(fake: FakeDatagrid, batch_id: str, n: int = 1) -> bool:
    """True while the ``n``-th results stream of ``batch_id`` is stalled mid-body by the fake."""
    requests = results_requests(fake, batch_id)
    return len(requests) >= n and requests[n - 1]["outcome"] == "stalled"


def results_requests(fake: FakeDatagrid, batch_id: str) -> list[dict[str, Any]]:
    """The fake's log of results requests for ``batch_id``, oldest first."""
    return [
        r for r in fake.requests() if r["batch_id"] == batch_id and r["path"].endswith("/results")
    ]


def metric(fwd: Forwarder, sample: str) -> float:
    """A sample's value from /metrics (0 if absent)."""
    for text in fwd.http.get("/metrics").text.splitlines():
        if text.startswith(sample + " "):
            return float(text.split()[-1])
    return 0.0


def state_of(fwd: Forwarder, batch_id: str) -> str | None:
    """The batch's status as ``fwd`` reports it (None if unknown or unreachable)."""
    try:
        return (fwd.state(batch_id) or {}).get("status")
    except httpx.TransportError:
        return None


def wait_forwarded(fwds: list[Forwarder], batch_ids: list[str], timeout: float) -> None:
    """Wait until some live forwarder reports every batch ``forwarded``; show logs if not."""

    def done() -> bool:
        live = [f for f in fwds if f.process is not None and f.process.poll() is None]
        return all(any(state_of(f, b) == "forwarded" for f in live) for b in batch_ids)

    try:
        wait_until(done, timeout, f"{len(batch_ids)} batch(es) forwarded", interval=0.25)
    except AssertionError as exc:
        tails = "\n".join(f"--- {f.log_path.name}\n{f.tail(25)}" for f in fwds)
        raise AssertionError(f"{exc}\n{tails}") from None


def waiting_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    fwds: list[Forwarder],
    fake: FakeDatagrid,
    batch_id: str,
) -> Any:
    """``wait_until``, failing with the batch's upstream requests and the forwarders' logs."""
    try:
        return wait_until(predicate, timeout, what, interval=0.2)
    except AssertionError as exc:
        keys = ("timestamp", "status", "outcome", "lines_sent", "fault")
        requests = [{k: r.get(k) for k in keys} for r in results_requests(fake, batch_id)]
        tails = "\n".join(f"--- {f.log_path.name}\n{f.tail(25)}" for f in fwds)
        raise AssertionError(f"{exc}\nresults requests: {requests}\n{tails}") from None


def fenced_or_aborted(fwd: Forwarder) -> list[dict[str, Any]]:
    """Log records showing ``fwd``'s transaction could not commit (fenced, or aborted on error)."""
    names = {
        "producer_fenced",  # its transaction was refused: the new owner bumped the epoch
        "rebalance_abandoned",  # or it noticed the lost partition first and gave up the attempt
        "transactional_producer_failed",
        "batch_attempt_failed",
    }
    return [r for r in fwd.logs() if r.get("event") in names]


def test_tally_counts_seen_duplicates_lost_and_altered() -> None:
    """The counting itself: a copy is a duplicate, a missing key is lost, other bytes are wrong."""
    expected = {("b", b"k1"): b"one", ("b", b"k2"): b"two", ("b", b"k3"): b"three"}
    records = [("b", b"k1", b"one"), ("b", b"k1", b"one"), ("b", b"k2", b"TWO"), ("c", b"k1", b"x")]
    counts = Tally.of(records, expected)
    assert (counts.expected, counts.seen, counts.duplicates, counts.lost) == (3, 1, 1, 2)
    assert counts.unexpected == 2
    outcome = Outcome.from_tally(counts, suite="s", case="c", title="t", mode="exactly-once")
    assert not outcome.guarantee_met


# --- kill -9 ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_kill_9_mid_batch_then_restart(
    mode: Delivery,
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    reliability: Callable[..., Outcome],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """SIGKILL while a batch streams (upstream held after 300 of 1,000 lines, some of them in
    Kafka); a restarted process forwards everything: exactly-once shows each line once,
    at-least-once re-sends exactly the lines the dead process had written."""
    settings = make_settings(delivery=mode, datagrid_read_timeout=30.0, **SMALL_BATCHES)
    spec = {"count": 1000, "distinct_ids": 1000}
    fake_datagrid.configure(
        batch_id,
        generate=spec,
        chunk_size=4096,
        faults=[{"kind": "stall", "after_lines": 300, "seconds": 30}],
    )
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    assert fwd.queue(batch_id).status_code == 202
    wait_until(
        lambda: held(fake_datagrid, batch_id) and log_count(settings) >= 100,
        30,
        "the stream held after line 300, lines in Kafka",
    )
    assert fwd.process is not None
    fwd.process.kill()
    assert fwd.wait_exit(10) == -signal.SIGKILL
    written_by_dead = log_count(settings)  # acknowledged (at-least-once) or in an open txn

    restarted = start(forwarders, settings, tmp_path).wait_ready(90)
    wait_forwarded([restarted], [batch_id], 60)
    counts, dead = tally(settings, expect(batch_id, spec))
    forwarded = [s for s in states(settings, batch_id) if s.status == "forwarded"]
    if mode is Delivery.EXACTLY_ONCE:
        explanation = (
            f"the dead process's open transaction ({written_by_dead} lines written) was aborted "
            "when the restarted one took the partition; read_committed sees only the redo"
        )
    else:
        explanation = (
            f"{counts.duplicates} duplicates = the {written_by_dead} lines the killed process had "
            "written: its job offset was uncommitted, so the restart re-sent the batch"
        )
    outcome = reliability(
        "kill-9-mid-batch",
        "kill -9 mid-batch (upstream held after line 300 of 1000), restart",
        mode,
        counts,
        dead_letters=dead,
        explanation=explanation,
        details={"written_before_kill": written_by_dead, "forwarded_states": len(forwarded)},
    )
    assert outcome.guarantee_met, outcome
    assert dead == 0 and len(forwarded) == 1
    assert written_by_dead >= 100
    if mode is Delivery.EXACTLY_ONCE:
        assert counts.duplicates == 0
        assert log_count(settings) >= 1000 + written_by_dead  # the aborted copy is in the log
    else:
        assert counts.duplicates == written_by_dead


# --- broker outage ----------------------------------------------------------------------------


@pytest.mark.slow
def test_broker_outage_mid_batch(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    reliability: Callable[..., Outcome],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """The broker stops while a batch streams in each mode and restarts seconds later: /readyz
    says 503 (kafka false) during the outage, 200 after, and both batches arrive complete.

    Both modes run side by side (own topics and groups) through one outage: a broker restart
    costs a JVM start, and the two processes share nothing but the broker."""
    import rig  # deploy/kafka/rig.py, on sys.path via conftest

    broker = rig.Broker.on_free_ports(tmp_path / "kafka")
    broker.start(wait=120)
    try:
        _broker_outage(
            broker, make_settings, fake_datagrid, forwarders, reliability, tmp_path, batch_id
        )
    finally:
        for fwd in forwarders:
            fwd.stop()
        broker.stop()


def _broker_outage(
    broker: Any,
    make_settings: MakeSettings,
    fake: FakeDatagrid,
    forwarders: list[Forwarder],
    reliability: Callable[..., Outcome],
    tmp_path: Path,
    batch_id: str,
) -> None:
    spec = {"count": 1500, "distinct_ids": 1500}
    runs: dict[Delivery, tuple[Settings, str, Forwarder]] = {}
    for mode in (Delivery.AT_LEAST_ONCE, Delivery.EXACTLY_ONCE):
        tag = "eos" if mode is Delivery.EXACTLY_ONCE else "alo"
        base = make_settings()
        settings = make_settings(
            kafka_bootstrap_servers=broker.bootstrap,
            delivery=mode,
            datagrid_read_timeout=30.0,
            results_topic=f"{base.results_topic}-{tag}",
            jobs_topic=f"{base.jobs_topic}-{tag}",
            dead_letter_topic=f"{base.dead_letter_topic}-{tag}",
            state_topic=f"{base.state_topic}-{tag}",
            consumer_group=f"{base.consumer_group}-{tag}",
            **SMALL_BATCHES,
        )
        batch = f"{batch_id}_{tag}"
        # ~150 chunks of ~10 lines, 0.1 s apart: lines keep arriving through the outage.
        fake.configure(batch, generate=spec, chunk_size=3000, drip_delay=0.1)
        runs[mode] = (settings, batch, start(forwarders, settings, tmp_path))
    for _, _, fwd in runs.values():
        fwd.wait_ready(90)
    for _, batch, fwd in runs.values():
        assert fwd.queue(batch).status_code == 202
    for settings, _, _ in runs.values():
        wait_until(lambda s=settings: log_count(s) >= 200, 30, "lines in Kafka before the outage")

    upstream_sent = {  # the streams are still running when the broker goes
        mode: results_requests(fake, batch)[-1]["lines_sent"]
        for mode, (_, batch, _) in runs.items()
    }
    stopped_at = time.monotonic()
    broker.stop()
    down: dict[Delivery, dict[str, Any]] = {}
    for mode, (_, _, fwd) in runs.items():
        response = wait_until(
            lambda f=fwd: (r := _readyz(f)) is not None and r.status_code == 503 and r,
            20,
            "/readyz 503 while the broker is down",
        )
        down[mode] = response.json()["checks"]
    broker.start(wait=120)
    for fwd in (fwd for _, _, fwd in runs.values()):
        wait_until(
            lambda f=fwd: (r := _readyz(f)) is not None and r.status_code == 200,
            90,
            "/readyz 200 after the broker is back",
        )
    outage = time.monotonic() - stopped_at
    wait_forwarded([fwd for _, _, fwd in runs.values()], [b for _, b, _ in runs.values()], 90)

    outcomes = []
    for mode, (settings, batch, _) in runs.items():
        counts, dead = tally(settings, expect(batch, spec))
        final = [s for s in states(settings, batch) if s.status == "forwarded"]
        attempts = final[-1].attempts if final else 0
        explanation = (
            f"broker down {outage:.0f} s mid-stream (readyz 503, kafka=false); the producer held "
            f"and retried; {attempts} attempt(s)"
        )
        if counts.duplicates:
            explanation += (
                f"; {counts.duplicates} duplicates: a produce request the broker wrote but "
                "could not acknowledge before stopping was re-sent after it came back"
            )
        outcomes.append(
            (
                mode,
                down[mode],
                counts,
                dead,
                reliability(
                    "broker-outage-mid-batch",
                    "broker stopped mid-batch, restarted seconds later",
                    mode,
                    counts,
                    dead_letters=dead,
                    explanation=explanation,
                    details={
                        "outage_seconds": round(outage, 1),
                        "attempts": attempts,
                        "upstream_lines_sent_when_stopped": upstream_sent[mode],
                        "readyz_while_down": down[mode],
                    },
                ),
            )
        )
    for mode, checks, counts, dead, outcome in outcomes:
        assert outcome.guarantee_met, outcome
        assert upstream_sent[mode] < spec["count"], upstream_sent  # it was mid-batch
        assert checks["kafka"] is False, checks
        assert dead == 0
        if mode is Delivery.EXACTLY_ONCE:
            assert counts.duplicates == 0


def _readyz(fwd: Forwarder) -> httpx.Response | None:
    try:
        return fwd.http.get("/readyz", timeout=3)
    except httpx.TransportError:
        return None


# --- upstream faults --------------------------------------------------------------------------

UPSTREAM_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "upstream-5xx-burst": (
        "5xx burst: 500, 502, 503, 504 then the stream",
        {"faults": [{"kind": "status", "code": c} for c in (500, 502, 503, 504)]},
    ),
    "upstream-429-storm": (
        "429 storm: five 429s with Retry-After 1 s / retry-after-ms 600",
        {
            "faults": [
                {"kind": "status", "code": 429, "retry_after": 1},
                {"kind": "status", "code": 429, "retry_after_ms": 600},
                {"kind": "status", "code": 429, "retry_after": 1},
                {"kind": "status", "code": 429, "retry_after_ms": 600},
                {"kind": "status", "code": 429, "retry_after": 1},
            ]
        },
    ),
    "upstream-drop-mid-line": (
        "connection dropped in the middle of line 401",
        {"faults": [{"kind": "drop", "after_lines": 400, "mid_line": True}]},
    ),
    "upstream-reset-mid-line": (
        "connection reset (RST) in the middle of line 201",
        {"faults": [{"kind": "drop", "after_lines": 200, "mid_line": True, "reset": True}]},
    ),
    "upstream-slow-drip": (
        "slow drip: a chunk every 0.6 s, below the 1 s read timeout",
        {"chunk_size": 24000, "drip_delay": 0.6},
    ),
    "upstream-stall-beyond-timeout": (
        "stall of 3 s after line 250, beyond the 1 s read timeout",
        {"faults": [{"kind": "stall", "after_lines": 250, "seconds": 3}]},
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_upstream_faults(
    mode: Delivery,
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    reliability: Callable[..., Outcome],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """5xx bursts, 429 storms (Retry-After honoured), drops and resets mid-line, a slow drip and
    a stall past the 1 s read timeout: every batch arrives whole, none twice, with the expected
    number of attempts."""
    settings = make_settings(delivery=mode, datagrid_read_timeout=1.0, concurrency=6)
    spec = {"count": 500, "distinct_ids": 500}
    batches = {case: f"{batch_id}_{i}" for i, case in enumerate(UPSTREAM_CASES)}
    for case, (_, faults) in UPSTREAM_CASES.items():
        fake_datagrid.configure(batches[case], generate=spec, **{"chunk_size": 8192, **faults})
    fwd = start(forwarders, settings, tmp_path).wait_ready()
    for batch in batches.values():
        assert fwd.queue(batch).status_code == 202
    wait_forwarded([fwd], list(batches.values()), 90)

    checks = []
    in_log = log_counts(settings)
    for case, (title, faults) in UPSTREAM_CASES.items():
        batch = batches[case]
        counts, dead = tally(settings, expect(batch, spec))
        aborted = in_log[batch] - counts.seen - counts.duplicates
        state = fwd.state(batch) or {}
        requests = results_requests(fake_datagrid, batch)
        gaps = [round(b["timestamp"] - a["timestamp"], 2) for a, b in itertools.pairwise(requests)]
        explanation = (
            f"{state.get('attempts')} attempt(s), {state.get('stream_restarts')} stream restart(s)"
        )
        if case == "upstream-429-storm":
            explanation += f"; seconds between requests {gaps}"
        if mode is Delivery.AT_LEAST_ONCE and state.get("stream_restarts"):
            explanation += "; the re-stream skipped the lines already acknowledged"
        elif aborted:
            explanation += (
                f"; the broken attempt's transaction ({aborted} lines) was aborted, the retry "
                "committed all lines from line 1"
            )
        outcome = reliability(
            case,
            title,
            mode,
            counts,
            dead_letters=dead,
            explanation=explanation,
            details={"state": state, "request_gaps_s": gaps, "aborted_records": aborted},
        )
        checks.append((case, faults, counts, state, gaps, outcome))
    for case, faults, counts, state, gaps, outcome in checks:
        assert outcome.guarantee_met, outcome
        assert counts.duplicates == 0, (case, counts)  # a broken stream never re-sends (ALO too)
        n_faults = len(faults.get("faults", []))
        assert state["status"] == "forwarded" and state["attempts"] == n_faults + 1, (case, state)
        if case == "upstream-429-storm":
            waits = [1.0, 0.6, 1.0, 0.6, 1.0]
            assert all(g >= w - 0.05 for g, w in zip(gaps, waits, strict=True)), (gaps, waits)
    assert metric(fwd, 'forwarder_upstream_requests_total{code="429"}') == 5
    assert metric(fwd, 'forwarder_batches_total{outcome="forwarded"}') == len(batches)


# --- concurrent deliveries --------------------------------------------------------------------


async def _fire(fwd: Forwarder, bodies: list[bytes]) -> list[int]:
    """POST every body as a signed webhook, all at once (one connection each)."""
    t = int(time.time())
    signed = [  # signed first, so that nothing staggers the requests
        (body, f"t={t},v1={sign(WEBHOOK_SECRET.encode(), t, body)}") for body in bodies
    ]
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=fwd.url, timeout=30, limits=limits) as client:

        async def post(body: bytes, signature: str) -> int:
            headers = {"Datagrid-Signature": signature, "Content-Type": "application/json"}
            response = await client.post("/webhooks/datagrid", content=body, headers=headers)
            return response.status_code

        return list(await asyncio.gather(*(post(body, sig) for body, sig in signed)))


@pytest.mark.parametrize("mode", MODES)
def test_fifty_webhooks_at_once(
    mode: Delivery,
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    reliability: Callable[..., Outcome],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """50 identical deliveries of one webhook at once forward its batch once; then 50 distinct
    batches' webhooks at once are each forwarded once."""
    settings = make_settings(delivery=mode)
    spec = {"count": 100, "distinct_ids": 100}
    fake_datagrid.configure(batch_id, generate=spec)
    fwd = start(forwarders, settings, tmp_path).wait_ready()

    codes = asyncio.run(_fire(fwd, [event_body(batch_id, f"evt_{batch_id}")] * 50))
    queued = codes.count(202)
    forwarded = 'forwarder_batches_total{outcome="forwarded"}'
    duplicate = 'forwarder_batches_total{outcome="duplicate"}'
    wait_until(
        lambda: metric(fwd, forwarded) + metric(fwd, duplicate) >= queued,
        60,
        f"all {queued} queued jobs handled",
    )
    counts, dead = tally(settings, expect(batch_id, spec))
    same = reliability(
        "webhook-50-identical",
        "50 identical webhook deliveries at once",
        mode,
        counts,
        dead_letters=dead,
        explanation=(
            f"{queued} answered 202 (queued), {codes.count(200)} 200 (seen already); the "
            f"{queued} jobs forwarded the batch once and counted "
            f"{metric(fwd, duplicate):.0f} duplicate jobs"
        ),
        details={"codes": {c: codes.count(c) for c in set(codes)}},
    )

    spec_small = {"count": 20, "distinct_ids": 20}
    many = [f"{batch_id}_{i:02d}" for i in range(50)]
    for b in many:
        fake_datagrid.configure(b, generate=spec_small)
    codes_many = asyncio.run(_fire(fwd, [event_body(b, f"evt_{b}") for b in many]))
    wait_forwarded([fwd], many, 90)
    expected: Expected = {}
    for b in many:
        expected.update(expect(b, spec_small))
    counts_many, dead_many = tally(settings, expected)
    distinct = reliability(
        "webhook-50-distinct",
        "50 distinct batches' webhooks at once",
        mode,
        counts_many,
        dead_letters=dead_many,
        explanation=f"all 50 answered 202; {metric(fwd, forwarded):.0f} batches forwarded in all",
        details={"codes": {c: codes_many.count(c) for c in set(codes_many)}},
    )

    assert set(codes) <= {200, 202} and queued >= 1, codes
    assert same.guarantee_met and counts.duplicates == 0 and dead == 0, same
    assert metric(fwd, duplicate) == queued - 1
    assert codes_many == [202] * 50
    assert distinct.guarantee_met and counts_many.duplicates == 0 and dead_many == 0, distinct
    assert metric(fwd, forwarded) == 51


# --- rebalance --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_rebalance_mid_batch(
    mode: Delivery,
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    reliability: Callable[..., Outcome],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """A second worker joins while a batch streams, then leaves while it streams again: each
    rebalance abandons the attempt (1 s drain), the next owner redoes it, nothing is lost."""
    settings = make_settings(
        delivery=mode, drain_timeout_seconds=1.0, datagrid_read_timeout=60.0, **SMALL_BATCHES
    )
    spec = {"count": 1000, "distinct_ids": 1000}
    # The first two streams hold after 300 lines (longer than a worker takes to start), so each
    # rebalance surely lands mid-stream; the third stream runs straight through.
    stall = {"kind": "stall", "after_lines": 300, "seconds": 45}
    fake_datagrid.configure(batch_id, generate=spec, chunk_size=4096, faults=[stall, stall])
    first = start(forwarders, settings, tmp_path).wait_ready()
    assert first.queue(batch_id).status_code == 202

    waiting_for(
        lambda: held(fake_datagrid, batch_id, 1) and log_count(settings) >= 100,
        30,
        "first stream held, lines in Kafka",
        forwarders,
        fake_datagrid,
        batch_id,
    )
    second = start(forwarders, settings, tmp_path).wait_ready()  # joins: rebalance 1

    def second_written() -> int:
        # Records are stamped when produced: those after the second request are its attempt's.
        return written_between(settings, results_requests(fake_datagrid, batch_id)[1]["timestamp"])

    waiting_for(
        lambda: held(fake_datagrid, batch_id, 2) and second_written() >= 100,
        30,
        "second stream held, lines of it in Kafka",
        forwarders,
        fake_datagrid,
        batch_id,
    )
    second.signal(signal.SIGTERM)  # leaves: rebalance 2
    assert second.wait_exit(60) == 0
    wait_forwarded([first], [batch_id], 60)

    counts, dead = tally(settings, expect(batch_id, spec))
    starts = [r["timestamp"] for r in results_requests(fake_datagrid, batch_id)]
    attempts = len(starts)
    written = [written_between(settings, a, b) for a, b in itertools.pairwise([*starts, 1e12])]
    abandoned = sum(
        len(f.events("rebalance_abandoned")) + len(f.events("drain_timeout_abandoned"))
        for f in forwarders
    )
    if mode is Delivery.EXACTLY_ONCE:
        explanation = (
            f"{attempts} streams, writing {written} records; each abandoned attempt's "
            "transaction was aborted (or fenced by the next owner), so read_committed sees the "
            "final one only"
        )
    else:
        explanation = (
            f"{attempts} streams, writing {written} records; {counts.duplicates} duplicates = "
            f"the lines written by the {abandoned} attempts abandoned at a rebalance: their job "
            "offset stayed uncommitted, so the next owner started over"
        )
    outcome = reliability(
        "rebalance-mid-batch",
        "second worker joins, then leaves, while the batch streams",
        mode,
        counts,
        dead_letters=dead,
        explanation=explanation,
        details={"streams": attempts, "abandoned": abandoned, "written_per_stream": written},
    )
    assert outcome.guarantee_met, outcome
    # Each rebalance abandoned one stream held at line 300. Counted exactly, never by timestamps
    # (a record stamped a moment after the next stream started is not the next stream's): every
    # record in the log beyond the batch's 1000 lines is a duplicate, and an abandoned stream
    # wrote at most the 300 lines it had read.
    assert dead == 0 and attempts >= 3 and abandoned == attempts - 1
    in_log = log_count(settings)
    if mode is Delivery.EXACTLY_ONCE:
        assert counts.duplicates == 0 and in_log >= 1000
    else:
        assert counts.duplicates == in_log - 1000, (in_log, written)
        assert 0 <= counts.duplicates <= 300 * abandoned, written
    forwarded = [s for s in states(settings, batch_id) if s.status == "forwarded"]
    assert len(forwarded) == 1


# --- zombie fencing ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_paused_worker_is_fenced(
    mode: Delivery,
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    forwarders: list[Forwarder],
    reliability: Callable[..., Outcome],
    tmp_path: Path,
    batch_id: str,
) -> None:
    """A worker frozen with SIGSTOP mid-batch loses its partitions after the session timeout;
    the other worker forwards the batch; resumed with SIGCONT, the zombie's late transaction is
    fenced (exactly-once: each line once) or its late lines are duplicates (at-least-once)."""
    settings = make_settings(
        delivery=mode, datagrid_read_timeout=30.0, drain_timeout_seconds=1.0, **SMALL_BATCHES
    )
    spec = {"count": 1000, "distinct_ids": 1000}
    fake_datagrid.configure(
        batch_id,
        generate=spec,
        chunk_size=4096,
        faults=[{"kind": "stall", "after_lines": 300, "seconds": 8}],
    )
    a = start(forwarders, settings, tmp_path).wait_ready()
    b = start(forwarders, settings, tmp_path).wait_ready()
    wait_until(a.ready, 30, "first worker ready after the second joined")
    assert a.queue(batch_id).status_code == 202
    wait_until(
        lambda: held(fake_datagrid, batch_id) and log_count(settings) >= 100,
        30,
        "the stream held after line 300, lines in Kafka",
    )
    owner = wait_until(
        lambda: next((f for f in (a, b) if metric(f, "forwarder_batches_in_flight") == 1), None),
        10,
        "the worker streaming the batch",
    )
    other = b if owner is a else a
    assert owner.process is not None
    os.kill(owner.process.pid, signal.SIGSTOP)
    paused_at = time.monotonic()
    try:
        wait_forwarded([other], [batch_id], 90)
        takeover = time.monotonic() - paused_at
        written_by_zombie = log_count(settings) - 1000  # before the pause; the rest is the taker's
    finally:
        os.kill(owner.process.pid, signal.SIGCONT)
    if mode is Delivery.EXACTLY_ONCE:
        fenced = wait_until(lambda: fenced_or_aborted(owner), 60, "the zombie's transaction fails")
    else:
        # The zombie carries on until it notices it lost the partition (or finishes).
        wait_until(lambda: metric(owner, "forwarder_batches_in_flight") == 0, 60, "the zombie done")
        fenced = []
    in_log = log_count(settings)

    counts, dead = tally(settings, expect(batch_id, spec))
    if mode is Delivery.EXACTLY_ONCE:
        explanation = (
            f"taken over {takeover:.0f} s after SIGSTOP; the new owner's init_transactions fenced "
            f"the zombie ({', '.join(sorted({r['event'] for r in fenced}))}); its {in_log - 1000} "
            "records are aborted, invisible to read_committed"
        )
    else:
        finished = bool(owner.events("batch_forwarded"))
        commit_failed = bool(owner.events("commit_failed"))
        explanation = (
            f"taken over {takeover:.0f} s after SIGSTOP; {counts.duplicates} duplicates = the "
            f"{written_by_zombie} lines the zombie wrote before the pause plus the "
            f"{counts.duplicates - written_by_zombie} it sent after SIGCONT"
            + (", finishing its stream," if finished else "")
            + " before noticing it had lost the partition"
            + (" (its offset commit then failed)" if commit_failed else "")
            + "; without transactions nothing fences a zombie"
        )
    outcome = reliability(
        "zombie-worker-sigstop",
        "worker frozen (SIGSTOP) mid-batch, partition taken over, then resumed (SIGCONT)",
        mode,
        counts,
        dead_letters=dead,
        explanation=explanation,
        details={
            "takeover_seconds": round(takeover, 1),
            "written_before_pause": written_by_zombie,
            "records_in_log": in_log,
            "zombie_events": sorted({r["event"] for r in fenced}),
        },
    )
    assert outcome.guarantee_met, outcome
    assert dead == 0 and written_by_zombie >= 100
    if mode is Delivery.EXACTLY_ONCE:
        assert counts.duplicates == 0
        assert [s.status for s in states(settings, batch_id)] == ["forwarded"]  # the new owner's
        assert not owner.events("batch_forwarded")
    else:
        assert counts.duplicates >= written_by_zombie
