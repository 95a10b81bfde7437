"""Scale-out suite: three ``forwarder serve`` processes in one group over a large state topic.

The state topic is preloaded with 300,000 forwarded batches (records as ``BatchState.encode()``
writes them, keyed by batch id, partitioned with Kafka's murmur2 like the jobs topic) before the
pods start. Then batches are queued while one pod is killed with ``kill -9`` mid-batch and all
three are restarted one by one (SIGTERM, exit, start, ready) with jobs still arriving. The results
topic is read back with ``read_committed`` and counted per (batch, line): nothing may be lost; in
at-least-once mode the duplicates are counted and printed, in exactly-once mode there are none.

Memory follows ownership (issue 23): one pod restores every state partition alone, two more
join, and each pod's RSS must then be within an empty pod's RSS plus 1.25 times the memory of
the states it holds (``tests/support/memory.py``).

Every wait is on a counter, a gauge or a state (polling with generous deadlines), never a sleep
that assumes a fast machine.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from forwarder.config import Delivery, Settings
from forwarder.kafka import partition_for
from tests.support.fake_datagrid import FakeDatagrid, generate_lines
from tests.support.kafka_helpers import read_topic
from tests.support.memory import per_state_bytes, rss_bound_mb, states_per_partition, vm_rss_kb
from tests.support.service_helpers import API_TOKEN, Forwarder, wait_until
from tests.support.state_preload import PARTITIONS, preload_state
from tests.support.tally import Tally

PRELOADED = 300_000
LINES = 120  # per queued batch; streamed slowly (below) so that batches are in flight for seconds
STREAM = {"chunk_size": 4096, "drip_delay": 0.1}  # ~13 lines per chunk: ~1 s per stream
MODES = [
    pytest.param(Delivery.AT_LEAST_ONCE, id="at-least-once"),
    pytest.param(Delivery.EXACTLY_ONCE, id="exactly-once"),
]


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def pods() -> Iterator[list[Forwarder]]:
    """Every forwarder a test starts is stopped at its end (killed ones are already gone)."""
    started: list[Forwarder] = []
    yield started
    for pod in started:
        pod.stop()


def alive(pod: Forwarder) -> bool:
    """The pod's process is running."""
    return pod.process is not None and pod.process.poll() is None


def metric(pod: Forwarder, sample: str) -> float:
    """A sample's value from the pod's /metrics (0 if absent or the pod does not answer)."""
    try:
        text = pod.http.get("/metrics").text
    except httpx.TransportError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


IN_FLIGHT = "forwarder_batches_in_flight"
DUPLICATE = 'forwarder_batches_total{outcome="duplicate"}'


class Feeder:
    """Queues batches with POST /v1/batches, round robin over the live pods (skipping one that
    does not answer), and remembers the batches that were accepted (202)."""

    def __init__(self, pods: list[Forwarder], fake: FakeDatagrid, tag: str) -> None:
        self.pods = pods
        self.fake = fake
        self.tag = tag
        self.accepted: list[str] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._clients: dict[str, httpx.Client] = {}

    def spec(self, hold: float = 0) -> dict[str, Any]:
        """The fake's spec of a queued batch; ``hold`` > 0 stalls its first stream that many
        seconds after 40 lines (so that it is surely in flight when a pod is killed)."""
        faults = [{"kind": "stall", "after_lines": 40, "seconds": hold}] if hold else []
        return {"generate": {"count": LINES, "distinct_ids": LINES}, **STREAM, "faults": faults}

    def queue_one(self, hold: float = 0) -> str:
        """Configure one new batch at the fake and queue it at some live pod; return its id."""
        with self._lock:
            batch_id = f"bpred_scale{self.tag}{len(self.accepted) + 1:04d}"
            self.fake.configure(batch_id, **self.spec(hold))
            for _ in range(2 * len(self.pods)):
                pod = self.pods[self._next % len(self.pods)]
                self._next += 1
                if not alive(pod):
                    continue
                client = self._clients.setdefault(
                    pod.url, httpx.Client(base_url=pod.url, timeout=10)
                )
                try:
                    response = client.post(
                        "/v1/batches",
                        json={"batch_id": batch_id},
                        headers={"Authorization": f"Bearer {API_TOKEN}"},
                    )
                except httpx.TransportError:
                    continue
                if response.status_code == 202:
                    self.accepted.append(batch_id)
                    return batch_id
            raise AssertionError(f"no live pod accepted {batch_id}")

    def queue(self, n: int, hold: float = 0) -> None:
        """Queue ``n`` batches now (each held ``hold`` seconds mid-stream, see :meth:`spec`)."""
        for _ in range(n):
            self.queue_one(hold)

    def start_trickle(self, every: float) -> None:
        """Keep queueing one batch every ``every`` seconds in a thread, until :meth:`stop`."""

        def run() -> None:
            try:
                while not self._stop.wait(every):
                    self.queue_one()
            except BaseException as exc:  # re-raised by stop(), in the test's thread
                self._failure = exc

        self._thread = threading.Thread(target=run, name="feeder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the trickle; raise what made it fail, if anything did."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for client in self._clients.values():
            client.close()
        if self._failure is not None:
            raise AssertionError(f"queueing failed: {self._failure}") from self._failure


def owned_partitions(pod: Forwarder) -> set[int]:
    """The jobs partitions a pod reports a lag for, i.e. the ones it is assigned."""
    try:
        text = pod.http.get("/metrics").text
    except httpx.TransportError:
        return set()
    return {int(p) for p in re.findall(r'^forwarder_jobs_lag\{partition="(\d+)"\}', text, re.M)}


def wait_all_forwarded(pods: list[Forwarder], batch_ids: list[str], timeout: float) -> None:
    """Wait until a live pod reports every batch ``forwarded`` (asking each batch only until it
    is, and its owner first: another pod answers by scanning a state partition); fail with the
    pods' log tails."""
    pending = set(batch_ids)

    def done() -> bool:
        live = [p for p in pods if alive(p)]
        owner = {part: pod for pod in live for part in owned_partitions(pod)}
        for batch_id in sorted(pending):
            first = owner.get(partition_for(batch_id.encode(), PARTITIONS))
            for pod in [first] if first is not None else live:
                try:
                    state = pod.state(batch_id)
                except httpx.TransportError:
                    continue
                if state is not None and state.get("status") == "forwarded":
                    pending.discard(batch_id)
                    break
        return not pending

    try:
        wait_until(done, timeout, f"{len(batch_ids)} batches forwarded", interval=0.5)
    except AssertionError as exc:
        tails = "\n".join(f"--- {p.log_path.name}\n{p.tail(15)}" for p in pods)
        raise AssertionError(f"{exc}; still pending: {sorted(pending)[:10]}\n{tails}") from None


def counted(settings: Settings, batch_ids: list[str]) -> tuple[Tally, dict[str, int], int]:
    """The read_committed view of the results: the tally against every expected line, the
    duplicate copies per batch, and the dead letters."""
    expected = {
        (b, f"cid-{i:08d}".encode()): line
        for b in batch_ids
        for i, line in enumerate(generate_lines(b, {"count": LINES, "distinct_ids": LINES}))
    }
    bootstrap = settings.kafka_bootstrap_servers
    records = asyncio.run(read_topic(bootstrap, settings.results_topic, timeout=120))
    mine = [(r.headers.get("datagrid-batch-id", b"").decode(), r.key, r.value) for r in records]
    per_batch: dict[str, int] = {}
    for batch_id, _, _ in mine:
        per_batch[batch_id] = per_batch.get(batch_id, 0) + 1
    extra = {b: n - LINES for b, n in per_batch.items() if n > LINES}
    dead = asyncio.run(read_topic(bootstrap, settings.dead_letter_topic, timeout=60))
    return Tally.of(mine, expected), extra, len(dead)


# --- the test --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_three_pods_kill_and_rolling_restart(
    mode: Delivery,
    make_settings: Callable[..., Settings],
    fake_datagrid: FakeDatagrid,
    pods: list[Forwarder],
    tmp_path: Path,
) -> None:
    """Three pods over 300,000 preloaded states: a kill -9 mid-batch and a rolling restart under
    load lose no line; exactly-once has no duplicate; preloaded batches are not forwarded again."""
    began = time.monotonic()
    settings = make_settings(
        delivery=mode,
        kafka_topic_partitions=PARTITIONS,
        drain_timeout_seconds=2.0,
        kafka_session_timeout_ms=6000,
        datagrid_requests_per_minute=0,  # the limiter is not under test; it would pace the run
        reconcile_interval_seconds=0,
        datagrid_read_timeout=30.0,
    )
    tag = uuid.uuid4().hex[:6]
    t0 = time.monotonic()
    preloaded = asyncio.run(
        preload_state(settings.kafka_bootstrap_servers, settings.state_topic, PRELOADED, tag=tag)
    )
    preload_s = time.monotonic() - t0

    def pod(name: str) -> Forwarder:
        started = Forwarder(settings, tmp_path, name=name)
        pods.append(started)
        return started

    t0 = time.monotonic()
    group = [pod(f"pod{i}").start() for i in range(3)]
    for member in group:
        member.wait_ready(timeout=180)
    ready_s = time.monotonic() - t0
    assert metric(group[0], "forwarder_state_batches") > 0

    feeder = Feeder(group, fake_datagrid, tag)
    try:
        # Phase 1: 30 batches, the last 6 held mid-stream for 20 s (queueing can take longer
        # than forwarding on a busy machine), and kill -9 a pod while it streams one of them.
        feeder.queue(24)
        feeder.queue(6, hold=20)

        def streaming() -> Forwarder | None:
            return next((p for p in group if metric(p, IN_FLIGHT) >= 1), None)

        victim = wait_until(streaming, 120, "a pod streaming a batch")
        assert victim.process is not None
        os.kill(victim.process.pid, signal.SIGKILL)
        assert victim.wait_exit(30) == -signal.SIGKILL
        # Phase 2: 30 more while the group is one short, then the killed pod comes back.
        feeder.queue(30)
        back = group.index(victim)
        group[back] = pod(f"pod{back}-back").start().wait_ready(timeout=180)
        # Phase 3: a rolling restart, one pod at a time, with a batch queued every second.
        feeder.start_trickle(1.0)
        for index in range(3):
            old = group[index]
            old.signal(signal.SIGTERM)
            assert old.wait_exit(120) == 0, old.tail()
            group[index] = pod(f"pod{index}-rolled").start().wait_ready(timeout=180)
    finally:
        feeder.stop()
    batch_ids = list(feeder.accepted)
    assert len(batch_ids) >= 60

    wait_all_forwarded(group, batch_ids, 300)

    # Preloaded batches queued again are duplicates: never asked of Datagrid, never forwarded.
    again = preloaded[:: PRELOADED // 6][:6]
    duplicates_before = sum(metric(p, DUPLICATE) for p in group)
    for index, batch_id in enumerate(again):
        assert group[index % 3].queue(batch_id).status_code == 202
    wait_until(
        lambda: sum(metric(p, DUPLICATE) for p in group) >= duplicates_before + len(again),
        120,
        "the re-queued preloaded batches counted as duplicates",
    )
    asked = {r["batch_id"] for r in fake_datagrid.requests()}
    assert not asked & set(again)

    tally, extra, dead = counted(settings, batch_ids)
    results = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    assert not {r.headers.get("datagrid-batch-id", b"").decode() for r in results} & set(again)
    print(
        f"\n[{mode}] {len(batch_ids)} batches x {LINES} lines over {PRELOADED} preloaded states "
        f"(preload {preload_s:.1f} s, 3 pods ready {ready_s:.1f} s, case "
        f"{time.monotonic() - began:.0f} s): lost {tally.lost}, duplicates {tally.duplicates} "
        f"in {len(extra)} batches {extra}, unexpected {tally.unexpected}, dead letters {dead}"
    )
    assert tally.lost == 0 and tally.unexpected == 0 and dead == 0, tally
    if mode is Delivery.EXACTLY_ONCE:
        assert tally.duplicates == 0, extra
    else:
        # At-least-once promises no loss, not no duplicates: a copy can only come from a batch
        # streamed again after its attempt was cut (the kill or a rebalance), so whole batches'
        # worth at most.
        assert all(0 < n <= LINES * 8 for n in extra.values()), extra


# --- memory after a scale-out ----------------------------------------------------------------

#: States preloaded for the scale-out, the issue's 300,000: a pod's share is ~60 MB, so the
#: bound's 25 % is ~15 MB above it.  Enough for what restoring every partition alone leaves
#: on the first pod whatever the storage (~8 MB of CPython arenas still partly used, from the
#: records fetched six partitions at a time), and far below what the old storage kept (~110 MB).
SCALE_OUT = PRELOADED


def rss_mb(pod: Forwarder) -> float:
    """The pod's resident memory now, MB."""
    assert pod.process is not None
    return vm_rss_kb(pod.process.pid) * 1024 / 1e6


def held_settled(group: list[Forwarder], counts: dict[int, int]) -> list[int]:
    """Wait until the group's partitions are shared out (each exactly once, each pod some) and
    each pod holds the states of its partitions, no more (``forwarder_state_batches``); each
    pod's number of states."""
    seen: list[tuple[set[int], int]] = []

    def settled() -> bool:
        seen[:] = [(owned_partitions(p), int(metric(p, "forwarder_state_batches"))) for p in group]
        owned = [mine for mine, _ in seen]
        return (
            sorted(p for mine in owned for p in mine) == list(range(PARTITIONS))
            and all(owned)
            and all(held == sum(counts[p] for p in mine) for mine, held in seen)
        )

    try:
        wait_until(settled, 180, "partitions and states shared out", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: (partitions, states) per pod {seen}") from None
    return [held for _, held in seen]


@pytest.mark.slow
def test_scaling_out_from_one_pod_to_three_leaves_each_pod_at_its_share(
    make_settings: Callable[..., Settings], pods: list[Forwarder], tmp_path: Path
) -> None:
    """A deployment scaled from one pod to three: the first pod restores all 300,000 states
    alone, then two pods join (the test broker has ``group.initial.rebalance.delay.ms=0``).  Each
    pod then holds exactly the states of its partitions, and its RSS is at most an empty pod's
    plus 1.25 x its states' memory, the memory of a state being measured here on the first pod
    while it held them all.  The old storage, a dict of small objects per partition, left the
    first pod at about two thirds of everything after giving four partitions of six away."""
    options = {
        "kafka_topic_partitions": PARTITIONS,
        "reconcile_interval_seconds": 0,
        "datagrid_requests_per_minute": 0,
    }
    settings, elsewhere = make_settings(**options), make_settings(**options)
    tag = uuid.uuid4().hex[:6]
    ids = asyncio.run(
        preload_state(settings.kafka_bootstrap_servers, settings.state_topic, SCALE_OUT, tag=tag)
    )
    counts = states_per_partition(ids, PARTITIONS)

    def pod(name: str, where: Settings = settings) -> Forwarder:
        started = Forwarder(where, tmp_path, name=name).start()
        pods.append(started)
        return started

    empty, first = pod("empty", elsewhere), pod("first")
    empty.wait_ready(timeout=180)
    first.wait_ready(timeout=180)
    assert held_settled([first], counts) == [SCALE_OUT]
    empty_mb, one_mb = rss_mb(empty), rss_mb(first)
    empty.stop()
    state_bytes = per_state_bytes(one_mb, empty_mb, SCALE_OUT)
    assert state_bytes > 0

    group = [first, pod("second"), pod("third")]
    for member in group:
        member.wait_ready(timeout=180)
    held = held_settled(group, counts)
    assert sum(held) == SCALE_OUT
    report = [
        (round(rss_mb(member), 1), round(rss_bound_mb(empty_mb, state_bytes, states), 1), states)
        for member, states in zip(group, held, strict=True)
    ]
    print(
        f"\nscale-out 1 -> 3 over {SCALE_OUT:,} states: empty pod {empty_mb:.1f} MB, one pod "
        f"{one_mb:.1f} MB ({state_bytes:.0f} bytes/state); (RSS, bound, states) per pod {report}"
    )
    for member, (rss, bound, states) in zip(group, report, strict=True):
        assert rss <= bound, f"{member.log_path.name}: {rss} MB > {bound} MB with {states} states"
