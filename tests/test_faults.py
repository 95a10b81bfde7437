"""Fault suite: real ``forwarder serve`` processes, a real broker, the fake Datagrid over HTTP.

Every case injects one fault while a batch is in flight, then reads the results topic back with
``read_committed`` and counts, per (``datagrid-batch-id``, key): lines expected, lines seen,
duplicate copies.  Exactly-once must show 0 lost and 0 duplicates; at-least-once 0 lost, with its
duplicates counted and explained.  Each case records its numbers (``tests.reliability_report``),
from which ``python -m tests.reliability_report`` renders the table in ``docs/reliability.md``.

The shared set-up (settings and topics, the fake's batches, the forwarders, reading the topics
back, the tally and its record) is one fixture, ``fault``, so each case reads as its scenario.

Waiting is by polling for a state that proves the next step may go (a stream held, lines in
Kafka, a status), under ceilings that only fire on a hang; the only sleeps are the faults
themselves (a stall of N s).  Records are counted exactly, by their ``datagrid-line`` header,
never by the time they were written: a record stamped a moment after another stream started is
not necessarily that stream's.
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
from tests.reliability_report import Outcome, record
from tests.support.fake_datagrid import FakeDatagrid, generate_lines
from tests.support.kafka_helpers import Record, read_topic
from tests.support.service_helpers import WEBHOOK_SECRET, Forwarder, event_body, wait_until
from tests.support.tally import Tally

MakeSettings = Callable[..., Settings]
Expected = dict[tuple[str, bytes], bytes]

MODES = [
    pytest.param(Delivery.AT_LEAST_ONCE, id="at-least-once"),
    pytest.param(Delivery.EXACTLY_ONCE, id="exactly-once"),
]

#: Producer batches small enough that some lines reach Kafka while a stream is held mid-batch,
#: whether the pipeline sends on linger or only once a partition's record batch is full.
SMALL_BATCHES: dict[str, Any] = {"kafka_batch_bytes": 16384}

#: The held batches' shape: 1,000 lines in 4 KB chunks, each held stream stopping after line 300.
HELD_LINES = 1000
HELD_AFTER = 300


# --- the shared set-up: one fixture -----------------------------------------------------------


class FaultCase:
    """One fault case's world: its settings and topics, the fake's batches and what they must
    leave in the results topic, the forwarders it started, and the record of its outcome.

    ``fault.setup(mode, ...)`` gives the case its settings; ``fault.held_batch(...)`` or
    ``fault.generated(...)`` its batches; ``fault.start()`` its forwarders (stopped, and resumed
    first if paused, at the end of the test); ``fault.tally()`` and ``fault.record(...)`` count
    and record what a ``read_committed`` consumer sees.
    """

    def __init__(
        self,
        make_settings: MakeSettings,
        fake: FakeDatagrid,
        log_dir: Path,
        batch_id: str,
        nodeid: str,
        forwarders: list[Forwarder] | None = None,
        started: float | None = None,
    ) -> None:
        self.make_settings = make_settings
        self.fake = fake
        self.log_dir = log_dir
        self.batch_id = batch_id
        self.nodeid = nodeid
        self.forwarders: list[Forwarder] = [] if forwarders is None else forwarders
        self.started = time.monotonic() if started is None else started
        self.expected: Expected = {}
        self._settings: Settings | None = None
        self._mode: Delivery | None = None

    # -- settings --

    def setup(self, mode: Delivery, **overrides: Any) -> Settings:
        """This case's settings: its own topics and group, ``mode``, ``overrides``."""
        self._mode = mode
        self._settings = self.make_settings(delivery=mode, **overrides)
        return self._settings

    def lane(self, tag: str, mode: Delivery, **overrides: Any) -> FaultCase:
        """A second case run side by side with this one (topics and group suffixed ``tag``),
        sharing its forwarders, fake and clock."""
        base = self.make_settings()
        other = FaultCase(
            self.make_settings,
            self.fake,
            self.log_dir,
            f"{self.batch_id}_{tag}",
            self.nodeid,
            self.forwarders,
            self.started,
        )
        other.setup(
            mode,
            results_topic=f"{base.results_topic}-{tag}",
            jobs_topic=f"{base.jobs_topic}-{tag}",
            dead_letter_topic=f"{base.dead_letter_topic}-{tag}",
            state_topic=f"{base.state_topic}-{tag}",
            consumer_group=f"{base.consumer_group}-{tag}",
            **overrides,
        )
        return other

    @property
    def settings(self) -> Settings:
        """The settings given by :meth:`setup`."""
        assert self._settings is not None, "call fault.setup(mode, ...) first"
        return self._settings

    @property
    def mode(self) -> Delivery:
        """The delivery mode given by :meth:`setup`."""
        assert self._mode is not None, "call fault.setup(mode, ...) first"
        return self._mode

    # -- the fake's batches --

    def generated(self, batch: str, count: int, **fake_spec: Any) -> str:
        """Configure ``batch`` in the fake as ``count`` generated lines, each with its own
        ``custom_id``, and expect each of them once in the results topic."""
        spec = {"count": count, "distinct_ids": count}
        self.fake.configure(batch, generate=spec, **fake_spec)
        self.expected.update(expect(batch, spec))
        return batch

    def held_batch(self, *stall_seconds: float) -> str:
        """The case's batch (:data:`HELD_LINES` lines in 4 KB chunks) whose first streams, one
        per value, hold after line :data:`HELD_AFTER` for that many seconds."""
        faults = [{"kind": "stall", "after_lines": HELD_AFTER, "seconds": s} for s in stall_seconds]
        return self.generated(self.batch_id, HELD_LINES, chunk_size=4096, faults=faults)

    def results_requests(self, batch: str | None = None) -> list[dict[str, Any]]:
        """The fake's log of results requests for ``batch`` (the case's batch by default)."""
        return results_requests(self.fake, batch or self.batch_id)

    def held(self, n: int = 1) -> bool:
        """True while the ``n``-th results stream of the case's batch is held by the fake."""
        requests = self.results_requests()
        return len(requests) >= n and requests[n - 1]["outcome"] == "stalled"

    # -- forwarders --

    def start(self, **env: str) -> Forwarder:
        """Start one more ``forwarder serve`` with the case's settings (not waiting for it)."""
        fwd = Forwarder(self.settings, self.log_dir, name=f"fwd{len(self.forwarders)}", **env)
        self.forwarders.append(fwd.start())
        return fwd

    def queue(self, fwd: Forwarder, *batches: str) -> None:
        """Queue ``batches`` (the case's batch by default) through ``fwd``'s API."""
        for batch in batches or (self.batch_id,):
            assert fwd.queue(batch).status_code == 202, batch

    def stop_all(self) -> None:
        """Stop every forwarder started (resumed first: a stopped process cannot handle
        SIGTERM); safe to call twice."""
        for fwd in self.forwarders:
            if fwd.process is not None and fwd.process.poll() is None:
                os.kill(fwd.process.pid, signal.SIGCONT)
            fwd.stop()

    # -- waiting --

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """``wait_until``, failing with the batch's upstream requests and the forwarders' logs."""
        try:
            return wait_until(predicate, timeout, what, interval=0.2)
        except AssertionError as exc:
            keys = ("timestamp", "status", "outcome", "lines_sent", "fault")
            requests = [{k: r.get(k) for k in keys} for r in self.results_requests()]
            raise AssertionError(f"{exc}\nresults requests: {requests}\n{self.tails()}") from None

    def wait_held_with_lines(self, n: int = 1, timeout: float = 30) -> None:
        """Wait until the ``n``-th stream is held and at least 100 of its lines are in the log
        (committed or not): proven by lines written ``n`` times, never by when they were."""

        def proven() -> bool:
            if not self.held(n):
                return False
            copies = line_copies(self.settings, self.batch_id)
            return sum(1 for c in copies.values() if c >= n) >= 100

        self.wait(proven, timeout, f"stream {n} held after line {HELD_AFTER}, its lines in Kafka")

    def wait_forwarded(
        self, batches: list[str], timeout: float, fwds: list[Forwarder] | None = None
    ) -> None:
        """Wait until some live forwarder reports every batch ``forwarded``; show logs if not."""
        wait_forwarded(self.forwarders if fwds is None else fwds, batches, timeout)

    def tails(self) -> str:
        """The end of every forwarder's log, for failure messages."""
        return "\n".join(f"--- {f.log_path.name}\n{f.tail(25)}" for f in self.forwarders)

    # -- reading back --

    def log_count(self) -> int:
        """Records written to the results topic so far, committed or not."""
        return log_count(self.settings)

    def line_copies(self, batch: str | None = None) -> Counter[int]:
        """Records of ``batch`` in the results topic (committed or not) per line number."""
        return line_copies(self.settings, batch or self.batch_id)

    def tally(self, *batches: str) -> tuple[Tally, int]:
        """What read_committed consumers see of the lines expected of ``batches`` (all the
        case's batches by default), and how many dead letters exist."""
        wanted = set(batches)
        expected = {k: v for k, v in self.expected.items() if not wanted or k[0] in wanted}
        return tally(self.settings, expected)

    def forwarded_states(self, batch: str | None = None) -> list[BatchState]:
        """Committed ``forwarded`` state records of ``batch`` (the case's batch by default)."""
        return [s for s in states(self.settings, batch or self.batch_id) if s.status == "forwarded"]

    def record(
        self, case: str, title: str, counts: Tally, dead: int, explanation: str, **details: Any
    ) -> Outcome:
        """Record the case's measured outcome (before its assertions, so failures are recorded
        too) and return it."""
        outcome = Outcome.from_tally(
            counts,
            suite="faults",
            case=case,
            title=title,
            mode=str(self.mode),
            seconds=round(time.monotonic() - self.started, 1),
            test=self.nodeid,
            dead_letters=dead,
            explanation=explanation,
            details=details,
        )
        record(outcome)
        return outcome


@pytest.fixture
def fault(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    tmp_path: Path,
    batch_id: str,
    request: pytest.FixtureRequest,
) -> Iterator[FaultCase]:
    """The case's world (see :class:`FaultCase`); every forwarder it started is stopped after."""
    case = FaultCase(make_settings, fake_datagrid, tmp_path, batch_id, request.node.nodeid)
    try:
        yield case
    finally:
        case.stop_all()


# --- reading topics and the fake back ---------------------------------------------------------


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


def _in_log(settings: Settings) -> list[Record]:
    """Every data record in the results topic as read_uncommitted sees them (open and aborted
    transactions too)."""
    return asyncio.run(
        read_topic(
            settings.kafka_bootstrap_servers,
            settings.results_topic,
            isolation_level="read_uncommitted",
        )
    )


def log_counts(settings: Settings) -> Counter[str]:
    """Records written to the results topic so far per batch, committed or not."""
    return Counter(r.headers.get("datagrid-batch-id", b"").decode() for r in _in_log(settings))


def log_count(settings: Settings) -> int:
    """Records written to the results topic so far, committed or not."""
    return len(_in_log(settings))


def line_copies(settings: Settings, batch: str) -> Counter[int]:
    """Records of ``batch`` in the results topic (committed or not) per ``datagrid-line``: an
    attempt writes each line at most once, so a line's count is the number of attempts that
    wrote it, whenever they did."""
    return Counter(
        int(r.headers["datagrid-line"])
        for r in _in_log(settings)
        if r.headers.get("datagrid-batch-id", b"").decode() == batch
    )


def states(settings: Settings, batch_id: str) -> list[BatchState]:
    """Committed state records of ``batch_id``, oldest first."""
    records = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.state_topic))
    return [BatchState.decode(r.value) for r in records if r.key == batch_id.encode() and r.value]


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


def fenced_or_aborted(fwd: Forwarder) -> list[dict[str, Any]]:
    """Log records showing ``fwd``'s transaction could not commit (fenced, or aborted on error)."""
    names = {
        "producer_fenced",  # its transaction was refused: the new owner bumped the epoch
        "rebalance_abandoned",  # or it noticed the lost partition first and gave up the attempt
        "transactional_producer_failed",
        "batch_attempt_failed",
    }
    return [r for r in fwd.logs() if r.get("event") in names]


def copies_by_count(copies: Counter[int], lines: range) -> dict[int, int]:
    """How many of ``lines`` were written 0, 1, 2... times: ``{times: lines}``."""
    return dict(sorted(Counter(copies[n] for n in lines).items()))


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
def test_kill_9_mid_batch_then_restart(mode: Delivery, fault: FaultCase) -> None:
    """SIGKILL while a batch streams (upstream held after 300 of 1,000 lines, some of them in
    Kafka); a restarted process forwards everything: exactly-once shows each line once,
    at-least-once re-sends exactly the lines the dead process had written."""
    fault.setup(mode, datagrid_read_timeout=30.0, **SMALL_BATCHES)
    fault.held_batch(30)
    fwd = fault.start().wait_ready()
    fault.queue(fwd)
    fault.wait_held_with_lines()
    assert fwd.process is not None
    fwd.process.kill()
    assert fwd.wait_exit(10) == -signal.SIGKILL
    seen_at_kill = fault.log_count()  # acknowledged (at-least-once) or in an open txn

    restarted = fault.start().wait_ready(90)
    fault.wait_forwarded([fault.batch_id], 60, [restarted])
    counts, dead = fault.tally()
    forwarded = fault.forwarded_states()
    # Counted once everything is written, not at the kill: a produce request the dead process
    # had sent may reach the log a moment after its exit. The restart streams once, writing
    # each line once, so every record beyond the batch's lines is the dead process's.
    copies = fault.line_copies()
    written_by_dead = copies.total() - HELD_LINES
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
    outcome = fault.record(
        "kill-9-mid-batch",
        "kill -9 mid-batch (upstream held after line 300 of 1000), restart",
        counts,
        dead,
        explanation,
        written_before_kill=written_by_dead,
        forwarded_states=len(forwarded),
    )
    assert outcome.guarantee_met, outcome
    assert dead == 0 and len(forwarded) == 1, forwarded
    # The dead process wrote only lines it had read (at most line 300), each once.
    assert copies_by_count(copies, range(HELD_AFTER + 1, HELD_LINES + 1)) == {1: 700}, copies
    assert set(copies.values()) <= {1, 2}, copies
    assert written_by_dead >= seen_at_kill >= 100
    if mode is Delivery.EXACTLY_ONCE:
        assert counts.duplicates == 0
    else:
        assert counts.duplicates == written_by_dead


# --- broker outage ----------------------------------------------------------------------------


@pytest.mark.slow
def test_broker_outage_mid_batch(fault: FaultCase, tmp_path: Path) -> None:
    """The broker stops while a batch streams in each mode and restarts seconds later: /readyz
    says 503 (kafka false) during the outage, 200 after, and both batches arrive complete.

    Both modes run side by side (own topics and groups) through one outage: a broker restart
    costs a JVM start, and the two processes share nothing but the broker."""
    import rig  # deploy/kafka/rig.py, on sys.path via conftest

    broker = rig.Broker.on_free_ports(tmp_path / "kafka")
    broker.start(wait=120)
    try:
        _broker_outage(broker, fault)
    finally:
        fault.stop_all()
        broker.stop()


def _broker_outage(broker: Any, fault: FaultCase) -> None:
    lanes: dict[Delivery, FaultCase] = {}
    for mode, tag in ((Delivery.AT_LEAST_ONCE, "alo"), (Delivery.EXACTLY_ONCE, "eos")):
        lane = fault.lane(
            tag,
            mode,
            kafka_bootstrap_servers=broker.bootstrap,
            datagrid_read_timeout=30.0,
            **SMALL_BATCHES,
        )
        # ~150 chunks of ~10 lines, 0.1 s apart: lines keep arriving through the outage.
        lane.generated(lane.batch_id, 1500, chunk_size=3000, drip_delay=0.1)
        lanes[mode] = lane
    fwds = {mode: lane.start() for mode, lane in lanes.items()}
    for fwd in fwds.values():
        fwd.wait_ready(90)
    for mode, lane in lanes.items():
        lane.queue(fwds[mode])
    for lane in lanes.values():
        lane.wait(lambda lane=lane: lane.log_count() >= 200, 30, "lines in Kafka before the outage")

    upstream_sent = {  # the streams are still running when the broker goes
        mode: lane.results_requests()[-1]["lines_sent"] for mode, lane in lanes.items()
    }
    stopped_at = time.monotonic()
    broker.stop()
    down: dict[Delivery, dict[str, Any]] = {}
    for mode, fwd in fwds.items():
        response = wait_until(
            lambda f=fwd: (r := _readyz(f)) is not None and r.status_code == 503 and r,
            20,
            "/readyz 503 while the broker is down",
        )
        down[mode] = response.json()["checks"]
    broker.start(wait=120)
    for fwd in fwds.values():
        wait_until(
            lambda f=fwd: (r := _readyz(f)) is not None and r.status_code == 200,
            90,
            "/readyz 200 after the broker is back",
        )
    outage = time.monotonic() - stopped_at
    wait_forwarded(list(fwds.values()), [lane.batch_id for lane in lanes.values()], 90)

    outcomes = []
    for mode, lane in lanes.items():
        counts, dead = lane.tally()
        final = lane.forwarded_states()
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
        outcome = lane.record(
            "broker-outage-mid-batch",
            "broker stopped mid-batch, restarted seconds later",
            counts,
            dead,
            explanation,
            outage_seconds=round(outage, 1),
            attempts=attempts,
            upstream_lines_sent_when_stopped=upstream_sent[mode],
            readyz_while_down=down[mode],
        )
        outcomes.append((mode, counts, dead, outcome))
    for mode, counts, dead, outcome in outcomes:
        assert outcome.guarantee_met, outcome
        assert upstream_sent[mode] < 1500, upstream_sent  # it was mid-batch
        assert down[mode]["kafka"] is False, down
        assert dead == 0
        if mode is Delivery.EXACTLY_ONCE:
            assert counts.duplicates == 0


def _readyz(fwd: Forwarder) -> httpx.Response | None:
    try:
        return fwd.http.get("/readyz", timeout=3)
    except httpx.TransportError:
        return None


# --- upstream faults --------------------------------------------------------------------------

#: The read timeout the upstream cases run with. The slow drip stays well below it and the
#: stall well beyond it (margins of seconds, not fractions of one), so a loaded machine that
#: delays a chunk by a few hundred milliseconds cannot turn one case into the other.
UPSTREAM_READ_TIMEOUT = 2.0

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
        "slow drip: a chunk every 0.6 s, below the 2 s read timeout",
        {"chunk_size": 24000, "drip_delay": 0.6},
    ),
    "upstream-stall-beyond-timeout": (
        "stall of 6 s after line 250, beyond the 2 s read timeout",
        {"faults": [{"kind": "stall", "after_lines": 250, "seconds": 6}]},
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_upstream_faults(mode: Delivery, fault: FaultCase) -> None:
    """5xx bursts, 429 storms (Retry-After honoured), drops and resets mid-line, a slow drip and
    a stall past the 2 s read timeout: every batch arrives whole, none twice, with the expected
    number of attempts."""
    fault.setup(mode, datagrid_read_timeout=UPSTREAM_READ_TIMEOUT, concurrency=6)
    batches = {
        case: fault.generated(
            f"{fault.batch_id}_{i}", 500, **{"chunk_size": 8192, **UPSTREAM_CASES[case][1]}
        )
        for i, case in enumerate(UPSTREAM_CASES)
    }
    fwd = fault.start().wait_ready()
    fault.queue(fwd, *batches.values())
    fault.wait_forwarded(list(batches.values()), 90)

    checks = []
    in_log = log_counts(fault.settings)
    for case, (title, faults) in UPSTREAM_CASES.items():
        batch = batches[case]
        counts, dead = fault.tally(batch)
        aborted = in_log[batch] - counts.seen - counts.duplicates
        state = fwd.state(batch) or {}
        requests = fault.results_requests(batch)
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
        outcome = fault.record(
            case,
            title,
            counts,
            dead,
            explanation,
            state=state,
            request_gaps_s=gaps,
            aborted_records=aborted,
        )
        checks.append((case, faults, counts, state, gaps, outcome))
    for case, faults, counts, state, gaps, outcome in checks:
        assert outcome.guarantee_met, outcome
        assert counts.duplicates == 0, (case, counts)  # a broken stream never re-sends (ALO too)
        n_faults = len(faults.get("faults", []))
        assert state["status"] == "forwarded" and state["attempts"] == n_faults + 1, (case, state)
        if case == "upstream-429-storm":
            # Lower bounds only: a slower machine waits longer, never shorter.
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
def test_fifty_webhooks_at_once(mode: Delivery, fault: FaultCase) -> None:
    """50 identical deliveries of one webhook at once forward its batch once; then 50 distinct
    batches' webhooks at once are each forwarded once."""
    fault.setup(mode)
    batch_id = fault.generated(fault.batch_id, 100)
    fwd = fault.start().wait_ready()

    codes = asyncio.run(_fire(fwd, [event_body(batch_id, f"evt_{batch_id}")] * 50))
    queued = codes.count(202)
    forwarded = 'forwarder_batches_total{outcome="forwarded"}'
    duplicate = 'forwarder_batches_total{outcome="duplicate"}'
    fault.wait(
        lambda: metric(fwd, forwarded) + metric(fwd, duplicate) >= queued,
        60,
        f"all {queued} queued jobs handled",
    )
    counts, dead = fault.tally(batch_id)
    same = fault.record(
        "webhook-50-identical",
        "50 identical webhook deliveries at once",
        counts,
        dead,
        (
            f"{queued} answered 202 (queued), {codes.count(200)} 200 (seen already); the "
            f"{queued} jobs forwarded the batch once and counted "
            f"{metric(fwd, duplicate):.0f} duplicate jobs"
        ),
        codes={c: codes.count(c) for c in set(codes)},
    )

    many = [fault.generated(f"{batch_id}_{i:02d}", 20) for i in range(50)]
    codes_many = asyncio.run(_fire(fwd, [event_body(b, f"evt_{b}") for b in many]))
    fault.wait_forwarded(many, 90)
    counts_many, dead_many = fault.tally(*many)
    distinct = fault.record(
        "webhook-50-distinct",
        "50 distinct batches' webhooks at once",
        counts_many,
        dead_many,
        f"all 50 answered 202; {metric(fwd, forwarded):.0f} batches forwarded in all",
        codes={c: codes_many.count(c) for c in set(codes_many)},
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
def test_rebalance_mid_batch(mode: Delivery, fault: FaultCase) -> None:
    """A second worker joins while a batch streams, then leaves while it streams again: each
    rebalance abandons the attempt (1 s drain), the next owner redoes it, nothing is lost."""
    fault.setup(mode, drain_timeout_seconds=1.0, datagrid_read_timeout=60.0, **SMALL_BATCHES)
    # The first two streams hold after 300 lines (longer than a worker takes to start), so each
    # rebalance surely lands mid-stream; the third stream runs straight through.
    fault.held_batch(45, 45)
    first = fault.start().wait_ready()
    fault.queue(first)
    fault.wait_held_with_lines(1)
    second = fault.start().wait_ready()  # joins: rebalance 1
    # Lines written twice prove the second stream's lines are in Kafka, whenever they were
    # stamped (a late flush of the first attempt's lines may carry a later time).
    fault.wait_held_with_lines(2)
    second.signal(signal.SIGTERM)  # leaves: rebalance 2
    assert second.wait_exit(60) == 0
    fault.wait_forwarded([fault.batch_id], 60, [first])

    counts, dead = fault.tally()
    attempts = len(fault.results_requests())
    abandoned = sum(
        len(f.events("rebalance_abandoned")) + len(f.events("drain_timeout_abandoned"))
        for f in fault.forwarders
    )
    # Counted exactly, by line number: an attempt writes each line at most once, so the records
    # of a line are the attempts that wrote it. Only the last stream got past line 300.
    copies = fault.line_copies()
    extra = copies.total() - HELD_LINES
    held_lines = copies_by_count(copies, range(1, HELD_AFTER + 1))
    written = "of lines 1-300, " + ", ".join(f"{n} written {k}x" for k, n in held_lines.items())
    written += ", the rest once"
    if mode is Delivery.EXACTLY_ONCE:
        explanation = (
            f"{attempts} streams; {written}; each abandoned attempt's transaction ({extra} "
            "records in all) was aborted (or fenced by the next owner), so read_committed sees "
            "the final one only"
        )
    else:
        explanation = (
            f"{attempts} streams; {written}; {counts.duplicates} duplicates = the lines written "
            f"by the {abandoned} attempts abandoned at a rebalance: their job offset stayed "
            "uncommitted, so the next owner started over"
        )
    outcome = fault.record(
        "rebalance-mid-batch",
        "second worker joins, then leaves, while the batch streams",
        counts,
        dead,
        explanation,
        streams=attempts,
        abandoned=abandoned,
        abandoned_records=extra,
        lines_1_300_by_times_written=held_lines,
    )
    assert outcome.guarantee_met, outcome
    # Each rebalance abandoned one stream held at line 300: every line past it was written once
    # (by the last stream), every line up to it at most once per stream, and the abandoned
    # streams wrote the 100 or more lines waited for above.
    assert dead == 0 and attempts >= 3 and abandoned == attempts - 1
    assert set(copies) == set(range(1, HELD_LINES + 1)), sorted(set(copies))[:5]
    assert copies_by_count(copies, range(HELD_AFTER + 1, HELD_LINES + 1)) == {1: 700}, copies
    assert max(copies.values()) <= attempts, held_lines
    assert 100 <= extra <= HELD_AFTER * abandoned, held_lines
    if mode is Delivery.EXACTLY_ONCE:
        assert counts.duplicates == 0
    else:
        assert counts.duplicates == extra, (extra, held_lines)
    assert len(fault.forwarded_states()) == 1


# --- zombie fencing ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_paused_worker_is_fenced(mode: Delivery, fault: FaultCase) -> None:
    """A worker frozen with SIGSTOP mid-batch loses its partitions after the session timeout;
    the other worker forwards the batch; resumed with SIGCONT, the zombie's late transaction is
    fenced (exactly-once: each line once) or its late lines are duplicates (at-least-once)."""
    settings = fault.setup(
        mode, datagrid_read_timeout=30.0, drain_timeout_seconds=1.0, **SMALL_BATCHES
    )
    fault.held_batch(8)
    a = fault.start().wait_ready()
    b = fault.start().wait_ready()
    wait_until(a.ready, 30, "first worker ready after the second joined")
    fault.queue(a)
    fault.wait_held_with_lines()
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
        fault.wait_forwarded([fault.batch_id], 90, [other])
        takeover = time.monotonic() - paused_at
        written_by_zombie = log_count(settings) - 1000  # before the pause; the rest is the taker's
    finally:
        os.kill(owner.process.pid, signal.SIGCONT)
    if mode is Delivery.EXACTLY_ONCE:
        fenced = fault.wait(lambda: fenced_or_aborted(owner), 60, "the zombie's transaction fails")
    else:
        # The zombie carries on until it notices it lost the partition (or finishes).
        fault.wait(lambda: metric(owner, "forwarder_batches_in_flight") == 0, 60, "the zombie done")
        fenced = []
    in_log = log_count(settings)

    counts, dead = fault.tally()
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
    outcome = fault.record(
        "zombie-worker-sigstop",
        "worker frozen (SIGSTOP) mid-batch, partition taken over, then resumed (SIGCONT)",
        counts,
        dead,
        explanation,
        takeover_seconds=round(takeover, 1),
        written_before_pause=written_by_zombie,
        records_in_log=in_log,
        zombie_events=sorted({r["event"] for r in fenced}),
    )
    assert outcome.guarantee_met, outcome
    assert dead == 0 and written_by_zombie >= 100
    if mode is Delivery.EXACTLY_ONCE:
        assert counts.duplicates == 0
        assert [s.status for s in states(settings, fault.batch_id)] == [
            "forwarded"
        ]  # the new owner's
        assert not owner.events("batch_forwarded")
    else:
        assert counts.duplicates >= written_by_zombie
