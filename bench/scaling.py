"""``python -m bench.scaling``: how the forwarder scales out, on a real broker.

Parts (``--only``), each on fresh topics and consumer groups, with the machine's load per run:

* ``readiness``: for each state size (``--sizes``, records preloaded on a 6-partition state topic
  with ``tests.support.state_preload.preload_state``), one pod then ``--pods`` pods started at
  once: seconds from process start to ``/readyz`` 200, VmRSS and ``forwarder_state_batches`` per
  pod once the group has settled (every jobs partition reported by exactly one pod). Size 0 is the
  reference.
* ``throughput``: 1, 2, 3 pods against an I/O-bound upstream (the fake Datagrid drips each
  stream: ``--drip`` seconds between 4 KiB chunks), ``--batches`` batches written to the jobs
  topic at once; lines/s and batches/s from the first job to the last record, records verified.
* ``restarts``: three pods, jobs trickling in, a rolling restart (SIGTERM, exit, start, ready, one
  pod at a time); duplicates counted per (batch, line) with read_committed, at-least-once and
  exactly-once; no line may be missing.
* ``lookup``: ``GET /v1/batches/{id}`` latency (p50/p99) on the ``--lookup-size`` state topic from
  a pod that owns the batch's partition and from one that does not.
* ``scaleout``: for each ``--scaleout-sizes`` state size, one pod restores every partition alone,
  then ``--pods - 1`` more join its group (a deployment scaled out from 1 to ``--pods``): each
  pod's RSS against issue 23's bound, an empty pod's RSS + 1.25 x the memory of the states it
  holds (``tests/support/memory.py``: bytes/state measured in the same run, on the one pod).
* ``statemap``: the state map alone, in a process of its own (``--ref`` applies): bytes per state
  and CPU per 100,000 records restored, looked up, put, scanned; the RSS kept after dropping four
  of six partitions restored together.

Writes a Markdown table to stdout, raw numbers to ``bench/out/scaling-*.json`` and a PNG plot
(``--plots DIR``). Any failed check stops it with exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.data import Workload
from bench.harness import OUT, PY, BenchFailure, forwarder_command, log, proc_cpu
from bench.machine import LoadWindow, describe
from bench.testbed import API_TOKEN, WEBHOOK_SECRET, Rig, rig
from bench.topics import produce_values, wait_for_records
from forwarder.kafka import partition_for
from tests.support.fake_datagrid import generate_lines
from tests.support.kafka_helpers import read_topic
from tests.support.memory import (
    SLACK,
    per_state_bytes,
    rss_bound_mb,
    states_per_partition,
    vm_rss_kb,
)
from tests.support.state_preload import preload_state, preloaded_id, preloaded_state
from tests.support.tally import Tally

PARTITIONS = 6
CHUNK = 4096  # small chunks, each after --drip seconds: a slow, I/O-bound upstream


class Pod:
    """One ``forwarder serve`` process of a run."""

    def __init__(self, bench: Bench, names: dict[str, str], name: str, **extra: str) -> None:
        port = rig.free_port()
        self.name = name
        self.env = bench.rig.service_env(
            names,
            FORWARDER_RECONCILE_INTERVAL_SECONDS="0",  # it would queue other runs' batches
            FORWARDER_HTTP_HOST="127.0.0.1",
            FORWARDER_HTTP_PORT=str(port),
            FORWARDER_MANAGEMENT_PORT=str(rig.free_port()),
            FORWARDER_WEBHOOK_SECRETS=WEBHOOK_SECRET,
            FORWARDER_API_TOKENS=API_TOKEN,
            # Not what is measured: the limiter would pace the upstream at 180 requests/min.
            FORWARDER_DATAGRID_REQUESTS_PER_MINUTE="0",
            FORWARDER_DRAIN_TIMEOUT_SECONDS="2",
            **extra,
        )
        self.logfile = bench.scratch / f"{names['group']}-{name}-{port}.log"
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.ready_s: float | None = None

    def start(self) -> Pod:
        """Start the process; readiness is polled by :meth:`poll_ready`."""
        with self.logfile.open("ab") as out:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                [*forwarder_command(), "serve"], stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        return self

    def poll_ready(self) -> bool:
        """True once ``/readyz`` answered 200 (remembering when); fails if the process died."""
        assert self.proc is not None
        if self.ready_s is not None:
            return True
        if self.proc.poll() is not None:
            raise BenchFailure(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
        with contextlib.suppress(httpx.TransportError):
            if self.http.get("/readyz").status_code == 200:
                self.ready_s = time.monotonic() - self.started
                return True
        return False

    def metrics(self) -> str:
        """The exposition text ('' if the pod does not answer)."""
        try:
            return self.http.get("/metrics").text
        except httpx.TransportError:
            return ""

    def owned(self) -> set[int]:
        """Jobs partitions this pod reports a lag for: the ones it is assigned."""
        return {
            int(p)
            for p in re.findall(r'^forwarder_jobs_lag\{partition="(\d+)"\}', self.metrics(), re.M)
        }

    def value(self, sample: str) -> float:
        """One sample's value from /metrics (0 when absent)."""
        for line in self.metrics().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0

    @property
    def rss_mb(self) -> float:
        """Resident memory now, MB (10^6 bytes)."""
        assert self.proc is not None
        return vm_rss_kb(self.proc.pid) * 1024 / 1e6

    @property
    def cpu(self) -> float:
        """CPU seconds so far."""
        return proc_cpu(self.proc.pid if self.proc else None) or 0.0

    def events(self, *names: str) -> int:
        """How many JSON log records have one of these ``event`` names."""
        count = 0
        for raw in self.logfile.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                count += json.loads(raw).get("event") in names
        return count

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 60 s); the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        """The end of the log."""
        return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])


class Bench:
    """The rig, the scratch directory and the pods to stop at the end."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.rig = Rig(PARTITIONS, scratch, ref=args.ref)
        self.live: list[Pod] = []
        self.state_topics: dict[int, tuple[str, list[str]]] = {}  # size -> (topic, ids)

    def pods(self, names: dict[str, str], n: int, label: str, **extra: str) -> list[Pod]:
        """Start ``n`` pods at once; wait until all are ready and the group has settled."""
        group = [Pod(self, names, f"{label}{i}", **extra) for i in range(n)]
        self.live.extend(group)
        for pod in group:
            pod.start()
        self.wait_ready(group)
        self.settle(group)
        return group

    def wait_ready(self, group: list[Pod]) -> None:
        """Poll every pod's readiness until all are ready (``--ready-timeout``)."""
        deadline = time.monotonic() + self.args.ready_timeout
        while not all(p.poll_ready() for p in group):
            if time.monotonic() > deadline:
                raise BenchFailure(f"not ready in {self.args.ready_timeout} s:\n{group[0].tail()}")
            time.sleep(0.05)

    def all_ready(self, group: list[Pod], timeout: float = 300) -> None:
        """Until every pod answers /readyz 200 at once."""
        deadline = time.monotonic() + timeout
        while not all(p.http.get("/readyz").status_code == 200 for p in group):
            if time.monotonic() > deadline:
                raise BenchFailure(f"not all ready again within {timeout} s")
            time.sleep(0.1)

    def settle(self, group: list[Pod], timeout: float = 120) -> list[set[int]]:
        """Until every jobs partition is reported by exactly one pod; each pod's partitions."""
        deadline = time.monotonic() + timeout
        while True:
            owned = [p.owned() for p in group]
            union = set().union(*owned)
            exact = union == set(range(PARTITIONS)) and sum(map(len, owned)) == PARTITIONS
            if exact and (len(group) == 1 or all(owned)):
                return owned
            if time.monotonic() > deadline:
                raise BenchFailure(f"the group did not settle: partitions per pod {owned}")
            time.sleep(0.2)

    def drop(self, group: list[Pod]) -> None:
        """Stop pods (SIGTERM, in parallel)."""
        threads = [threading.Thread(target=p.stop) for p in group]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for pod in group:
            if pod in self.live:
                self.live.remove(pod)

    def names(self, label: str, state: str | None = None) -> dict[str, str]:
        """Fresh topic names; ``state`` reuses a preloaded state topic."""
        names = self.rig.names(label)
        if state is not None:
            names["state"] = state
        return names

    def state_topic(self, size: int) -> tuple[str, list[str]]:
        """A state topic preloaded with ``size`` forwarded batches (made once per size)."""
        if size not in self.state_topics:
            topic = self.rig.names(f"state{size}")["state"]
            started = time.monotonic()
            ids = asyncio.run(preload_state(self.rig.bootstrap, topic, size, tag=self.rig.tag))
            log(f"preloaded {size:,} state records in {time.monotonic() - started:.1f} s")
            self.state_topics[size] = (topic, ids)
        return self.state_topics[size]

    def window(self) -> LoadWindow:
        """A load window over the next run."""
        return LoadWindow()

    def load(self, window: LoadWindow, pods: list[Pod], cpu0: float) -> dict[str, Any]:
        """Close a load window, counting the pods' CPU as the run's own."""
        fake, broker = self.rig.helpers_cpu()
        cpu = sum(p.cpu for p in pods) - cpu0 + (fake or 0) + (broker or 0) - self._helpers0
        pids = {*self.rig.our_pids(), *(p.proc.pid for p in pods if p.proc)}
        return window.close(cpu, pids)

    def mark(self) -> None:
        """Remember the helpers' CPU at the start of a window."""
        fake, broker = self.rig.helpers_cpu()
        self._helpers0 = (fake or 0) + (broker or 0)

    _helpers0 = 0.0


# --- the parts -------------------------------------------------------------------------------


def readiness(bench: Bench) -> list[dict[str, Any]]:
    """Ready time and RSS per pod against state size, one pod and ``--pods`` pods."""
    rows = []
    for size in bench.args.sizes:
        topic, _ = bench.state_topic(size)
        for n in (1, bench.args.pods):
            names = bench.names(f"ready{size}x{n}", state=topic)
            bench.mark()
            window = bench.window()
            try:
                group = bench.pods(names, n, f"r{n}-")
                bench.all_ready(group)  # readiness holds again while a rebalance restores state
            except BenchFailure as exc:  # a size too big for the state store is a result too
                failed = [p for p in bench.live if p.proc is not None]
                load = bench.load(window, failed, 0.0)
                bench.drop(failed)
                log(f"readiness {size:,} states, {n} pod(s): FAILED {str(exc)[:2000]}")
                error = str(exc).splitlines()[0][:200]
                rows.append(
                    {
                        "part": "readiness",
                        "state": size,
                        "pods": n,
                        "per_pod": [],
                        "load": load,
                        "error": error,
                    }
                )
                continue
            pods = [
                {
                    "ready_s": round(p.ready_s or 0, 2),
                    "rss_mb": round(p.rss_mb, 1),
                    "state_batches": int(p.value("forwarder_state_batches")),
                    "partitions": sorted(p.owned()),
                }
                for p in group
            ]
            load = bench.load(window, group, 0.0)
            bench.drop(group)
            row = {"part": "readiness", "state": size, "pods": n, "per_pod": pods, "load": load}
            log(f"readiness {size:,} states, {n} pod(s): {pods} (others {load['others_cores']})")
            rows.append(row)
    return rows


def configure(bench: Bench, batch_ids: list[str], lines: int) -> Workload:
    """Make the fake serve each batch slowly: ``lines`` lines in 4 KiB chunks, ``--drip`` apart."""
    work = Workload(lines, distinct_ids=lines)
    assert bench.rig.fake is not None
    for batch_id in batch_ids:
        bench.rig.fake.configure(
            batch_id, generate=work.spec(), chunk_size=CHUNK, drip_delay=bench.args.drip
        )
    return work


def throughput(bench: Bench) -> list[dict[str, Any]]:
    """Lines/s and batches/s with 1, 2 and 3 pods against a slow upstream."""
    rows = []
    args = bench.args
    for n in args.throughput_pods:
        names = bench.names(f"tput{n}")
        batch_ids = [f"{names['batch']}_{i:03d}" for i in range(args.batches)]
        work = configure(bench, batch_ids, args.lines)
        group = bench.pods(names, n, f"t{n}-")
        bench.mark()
        cpu0 = sum(p.cpu for p in group)
        window = bench.window()
        started = time.perf_counter()
        asyncio.run(
            produce_values(
                bench.rig.bootstrap, names["jobs"], [(b.encode(), b.encode()) for b in batch_ids]
            )
        )
        total = args.batches * args.lines
        done = asyncio.run(
            wait_for_records(bench.rig.bootstrap, names["results"], PARTITIONS, total, 900)
        )
        wall = done - started
        load = bench.load(window, group, cpu0)
        cpu = sum(p.cpu for p in group) - cpu0
        bench.drop(group)
        bench.rig.verify_topic(
            names, [c * args.batches for c in bench.rig.expected(work)], service=True
        )
        bench.rig.verify_streams(set(batch_ids), args.lines)
        stream_s = args.lines * 301 / CHUNK * args.drip
        row = {
            "part": "throughput",
            "pods": n,
            "batches": args.batches,
            "lines": total,
            "wall_s": round(wall, 2),
            "lines_per_s": round(total / wall, 1),
            "batches_per_s": round(args.batches / wall, 2),
            "pods_cpu_s": round(cpu, 2),
            "stream_s": round(stream_s, 2),
            "load": load,
        }
        log(f"throughput {n} pod(s): {row}")
        rows.append(row)
    return rows


def trickle(bench: Bench, names: dict[str, str], queued: list[str], stop: threading.Event) -> None:
    """One job every ``--trickle`` seconds until ``stop``: a steady stream through the restart."""
    while not stop.is_set():
        batch_id = f"{names['batch']}_{len(queued):03d}"
        configure(bench, [batch_id], bench.args.lines)
        job = (batch_id.encode(), batch_id.encode())
        asyncio.run(produce_values(bench.rig.bootstrap, names["jobs"], [job]))
        queued.append(batch_id)
        stop.wait(bench.args.trickle)


def restarts(bench: Bench) -> list[dict[str, Any]]:
    """Duplicates per rolling restart of three pods, jobs trickling in, in both modes."""
    rows = []
    args = bench.args
    for mode in args.modes:
        names = bench.names(f"roll-{mode}")
        extra = {"FORWARDER_DELIVERY": mode}
        group = bench.pods(names, 3, f"roll-{mode}-", **extra)
        bench.mark()
        cpu0 = sum(p.cpu for p in group)
        window = bench.window()
        queued: list[str] = []
        stop = threading.Event()

        feeder = threading.Thread(target=trickle, args=(bench, names, queued, stop), daemon=True)
        feeder.start()
        abandoned = 0
        try:
            while len(queued) < 8:  # work in flight before the first pod goes
                time.sleep(0.1)
            for index in range(3):
                old = group[index]
                assert old.proc is not None
                old.proc.terminate()
                if old.proc.wait(timeout=120) != 0:
                    raise BenchFailure(f"{old.name} exited {old.proc.returncode}:\n{old.tail()}")
                abandoned += old.events("rebalance_abandoned", "drain_timeout_abandoned")
                bench.live.remove(old)
                new = Pod(bench, names, f"roll-{mode}-{index}b", **extra).start()
                bench.live.append(new)
                group[index] = new
                bench.wait_ready([new])
        finally:
            stop.set()
            feeder.join()
        expected = {
            (b, f"cid-{i:08d}".encode()): line
            for b in queued
            for i, line in enumerate(
                generate_lines(b, Workload(args.lines, distinct_ids=args.lines).spec())
            )
        }
        deadline = time.monotonic() + 600
        while True:
            records = asyncio.run(read_topic(bench.rig.bootstrap, names["results"], timeout=120))
            tally = Tally.of(
                [
                    (r.headers.get("datagrid-batch-id", b"").decode(), r.key, r.value)
                    for r in records
                ],
                expected,
            )
            if tally.lost == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        load = bench.load(window, group, cpu0)
        abandoned += sum(p.events("rebalance_abandoned", "drain_timeout_abandoned") for p in group)
        bench.drop(group)
        if tally.lost or tally.unexpected:
            raise BenchFailure(f"rolling restart ({mode}): {tally}")
        if mode == "exactly-once" and tally.duplicates:
            raise BenchFailure(f"rolling restart (exactly-once): {tally.duplicates} duplicates")
        row = {
            "part": "restarts",
            "mode": mode,
            "batches": len(queued),
            "lines": tally.expected,
            "duplicates": tally.duplicates,
            "abandoned_attempts": abandoned,
            "load": load,
        }
        log(f"rolling restart {mode}: {row}")
        rows.append(row)
    return rows


def lookup(bench: Bench) -> list[dict[str, Any]]:
    """GET /v1/batches/{id} latency from an owning pod and from a non-owning one."""
    args = bench.args
    topic, ids = bench.state_topic(args.lookup_size)
    names = bench.names("lookup", state=topic)
    group = bench.pods(names, args.pods, "l-")
    owned = bench.settle(group)
    bench.mark()
    cpu0 = sum(p.cpu for p in group)
    window = bench.window()
    pod = group[0]
    mine = [b for b in ids if partition_for(b.encode(), PARTITIONS) in owned[0]]
    others = [b for b in ids if partition_for(b.encode(), PARTITIONS) not in owned[0]]
    remote = args.remote_lookups
    step_m, step_o = max(len(mine) // args.lookups, 1), max(len(others) // remote, 1)
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    rows = []
    for label, sample in (
        ("owner", mine[::step_m][: args.lookups]),
        ("non-owner", others[::step_o][:remote]),
    ):
        times = []
        for batch_id in sample:
            started = time.perf_counter()
            response = pod.http.get(f"/v1/batches/{batch_id}", headers=headers)
            times.append(time.perf_counter() - started)
            if response.status_code != 200 or response.json().get("status") != "forwarded":
                raise BenchFailure(f"GET {batch_id}: {response.status_code} {response.text[:300]}")
        times.sort()
        rows.append(
            {
                "part": "lookup",
                "state": args.lookup_size,
                "from": label,
                "requests": len(times),
                "p50_ms": round(statistics.median(times) * 1000, 2),
                "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
                "max_ms": round(times[-1] * 1000, 2),
            }
        )
    load = bench.load(window, group, cpu0)
    for row in rows:
        row["load"] = load
    bench.drop(group)
    log(f"lookup: {rows}")
    return rows


def held_settled(pods: list[Pod], counts: dict[int, int], timeout: float = 300) -> list[int]:
    """Until each pod's ``forwarder_state_batches`` is the number of states in the partitions it
    owns (its restores done, the ones it gave away dropped); each pod's number."""
    deadline = time.monotonic() + timeout
    while True:
        owned = [p.owned() for p in pods]
        held = [int(p.value("forwarder_state_batches")) for p in pods]
        expected = [sum(counts.get(part, 0) for part in mine) for mine in owned]
        if held == expected and sum(map(len, owned)) == PARTITIONS:
            return held
        if time.monotonic() > deadline:
            raise BenchFailure(f"states held {held}, expected {expected} for partitions {owned}")
        time.sleep(0.2)


def scaleout(bench: Bench) -> list[dict[str, Any]]:
    """One pod restores every partition alone; ``--pods - 1`` more join: each pod's RSS against
    an empty pod's + 1.25 x its states' memory (bytes/state from the one pod, this run)."""
    rows = []
    args = bench.args
    empty_topic, _ = bench.state_topic(0)
    empty = bench.pods(bench.names("scale-empty", state=empty_topic), 1, "se-")
    empty_mb = empty[0].rss_mb
    bench.drop(empty)
    for size in args.scaleout_sizes:
        topic, ids = bench.state_topic(size)
        counts = states_per_partition(ids, PARTITIONS)
        names = bench.names(f"scale{size}", state=topic)
        bench.mark()
        window = bench.window()
        group = bench.pods(names, 1, f"s{size}-")
        held_settled(group, counts)
        one_mb = group[0].rss_mb
        state_bytes = per_state_bytes(one_mb, empty_mb, size)
        more = [Pod(bench, names, f"s{size}-{i}") for i in range(1, args.pods)]
        bench.live.extend(more)
        for pod in more:
            pod.start()
        group += more
        bench.wait_ready(more)
        bench.settle(group)
        bench.all_ready(group)
        held = held_settled(group, counts)
        per_pod = []
        for pod, states in zip(group, held, strict=True):
            rss, bound = pod.rss_mb, rss_bound_mb(empty_mb, state_bytes, states)
            per_pod.append(
                {
                    "rss_mb": round(rss, 1),
                    "bound_mb": round(bound, 1),
                    "state_batches": states,
                    "partitions": sorted(pod.owned()),
                    "within": rss <= bound,
                }
            )
        load = bench.load(window, group, 0.0)
        bench.drop(group)
        row = {
            "part": "scaleout",
            "state": size,
            "pods": args.pods,
            "empty_mb": round(empty_mb, 1),
            "one_pod_mb": round(one_mb, 1),
            "state_bytes": round(state_bytes),
            "per_pod": per_pod,
            "load": load,
        }
        log(f"scale-out 1 -> {args.pods} pods, {size:,} states: {row}")
        rows.append(row)
    return rows


def statemap(bench: Bench) -> list[dict[str, Any]]:
    """The state map alone, in a child process with the measured tree's ``forwarder/``."""
    rows = []
    for size in bench.args.map_sizes:
        child = subprocess.run(
            [PY, "-m", "bench.scaling", "--map-child", str(size)],
            env=bench.rig.service_env(bench.names("map")),  # its PYTHONPATH: the measured tree
            capture_output=True,
            text=True,
            check=False,
            cwd=bench.scratch,  # not the work tree, which would come first on the path
        )
        if child.returncode:
            raise BenchFailure(f"state map measure failed:\n{child.stderr[-2000:]}")
        row = {"part": "statemap", **json.loads(child.stdout.splitlines()[-1])}
        log(f"state map, {size:,} states: {row}")
        rows.append(row)
    return rows


def measure_map(count: int) -> dict[str, Any]:
    """Restore ``count`` states into six partitions of a ``StateMap`` as a pod that restores them
    alone reads them (interleaved, each record's key and value fresh objects), then read,
    write, scan them and drop four partitions: RSS and CPU of each step."""
    import gc

    from aiokafka import ConsumerRecord

    from forwarder import store
    from forwarder.observability import Metrics
    from forwarder.state import BatchState, Status
    from forwarder.statemap import StateMap

    ids = [preloaded_id("", i) for i in range(count)]  # made before the first RSS reading
    template = preloaded_state("\x00", "2026-12-07T17:00:00.000Z").encode()
    head, middle, tail = template.split(b"\\u0000")
    now_ms = int(time.time() * 1000)

    def records() -> Iterator[ConsumerRecord[bytes, bytes]]:
        for offset, batch_id in enumerate(ids):
            key = batch_id.encode()
            value = b"".join((head, key, middle, key, tail))
            partition = partition_for(key, PARTITIONS)
            yield ConsumerRecord(
                "state", partition, offset, now_ms, 0, key, value, None, 0, len(value), ()
            )

    def rss_mb() -> float:
        gc.collect()
        return vm_rss_kb(os.getpid()) * 1024 / 1e6

    states = StateMap(Metrics(process=False), retention_hours=720)
    states.partition_count = PARTITIONS
    for partition in range(PARTITIONS):
        states.hold(partition)
    before = rss_mb()
    started = time.process_time()
    for _ in records():  # what making the records costs, taken off the restore's CPU
        pass
    making = time.process_time() - started
    started = time.process_time()
    for record in records():
        states.apply(record)
    cpu = {"restore": time.process_time() - started - making}
    full = rss_mb()
    sample = ids[:: max(count // 100_000, 1)]
    for name, step in (
        ("get", lambda: [states.get(b) for b in sample]),
        ("waiting", states.waiting),
        ("prune", states.prune),
    ):
        started = time.process_time()
        step()
        cpu[name] = time.process_time() - started
    cpu["get"] *= count / len(sample)  # scaled to a lookup of every state, like the others
    for partition in range(4):
        states.drop(partition)
    store._release_memory()
    after_drop = rss_mb()
    share = len(states)
    mine = [f"bpred_put{i:07d}" for i in range(200_000)]
    puts = [
        BatchState(batch_id=b, status=Status.FORWARDING)
        for b in mine
        if states.partition_of(b) >= 4
    ][:20_000]
    started = time.process_time()
    for state in puts:
        states.put(state)
    put_cpu = (time.process_time() - started) * 100_000 / len(puts)
    per_100k = {name: round(seconds * 100_000 / count, 3) for name, seconds in cpu.items()}
    return {
        "states": count,
        "bytes_per_state": round((full - before) * 1e6 / count),
        "rss_before_mb": round(before, 1),
        "rss_full_mb": round(full, 1),
        "states_after_drop": share,
        "rss_after_drop_mb": round(after_drop, 1),
        "share_mb": round(before + (full - before) * share / count, 1),
        "cpu_s_per_100k": {**per_100k, "put": round(put_cpu, 3)},
    }


PARTS = {
    "readiness": readiness,
    "throughput": throughput,
    "restarts": restarts,
    "lookup": lookup,
    "scaleout": scaleout,
    "statemap": statemap,
}


# --- report ----------------------------------------------------------------------------------


def _others(load: dict[str, Any]) -> str:
    return f"{load['others_cores']:.2f} (load {load['load1_start']:.1f}→{load['load1_end']:.1f})"


def _each(pods: list[dict[str, Any]], key: str, spec: str) -> str:
    return " / ".join(format(p[key], spec) for p in pods)


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """The tables, one per part."""
    out = []
    ready = [r for r in rows if r["part"] == "readiness"]
    if ready:
        out += [
            "| state records | pods | ready s (per pod) | RSS MB (per pod) | states held (per pod) "
            "| others' cores |",
            "|---:|---:|---|---|---|---|",
        ]
        for r in ready:
            per = r["per_pod"]
            if r.get("error"):
                out.append(
                    f"| {r['state']:,} | {r['pods']} | not ready: {r['error']} | | "
                    f"| {_others(r['load'])} |"
                )
                continue
            out.append(
                f"| {r['state']:,} | {r['pods']} | {_each(per, 'ready_s', '.1f')} "
                f"| {_each(per, 'rss_mb', '.0f')} | {_each(per, 'state_batches', ',')} "
                f"| {_others(r['load'])} |"
            )
        out.append("")
    tput = [r for r in rows if r["part"] == "throughput"]
    if tput:
        base = tput[0]["lines_per_s"]
        out += [
            "| pods | batches × lines | wall s | lines/s | batches/s | speed-up | pods' CPU s "
            "| others' cores |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in tput:
            out.append(
                f"| {r['pods']} | {r['batches']} × {r['lines'] // r['batches']} "
                f"| {r['wall_s']:.1f} | {r['lines_per_s']:,.0f} | {r['batches_per_s']:.2f} "
                f"| {r['lines_per_s'] / base:.2f}× "
                f"| {r['pods_cpu_s']:.1f} | {_others(r['load'])} |"
            )
        out.append("")
    roll = [r for r in rows if r["part"] == "restarts"]
    if roll:
        out += [
            "| delivery | batches (lines) | duplicates (read_committed) | abandoned attempts "
            "| lost "
            "| others' cores |",
            "|---|---|---:|---:|---:|---|",
        ]
        for r in roll:
            out.append(
                f"| {r['mode']} | {r['batches']} ({r['lines']:,}) | {r['duplicates']} "
                f"| {r['abandoned_attempts']} | 0 | {_others(r['load'])} |"
            )
        out.append("")
    look = [r for r in rows if r["part"] == "lookup"]
    if look:
        out += [
            "| GET /v1/batches/{id} | state records | requests | p50 ms | p99 ms | max ms "
            "| others' cores |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in look:
            out.append(
                f"| from {'the owner' if r['from'] == 'owner' else 'a non-owner'} "
                f"| {r['state']:,} | {r['requests']} | {r['p50_ms']:.1f} "
                f"| {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {_others(r['load'])} |"
            )
        out.append("")
    scale = [r for r in rows if r["part"] == "scaleout"]
    if scale:
        out += [
            f"| state records | empty pod MB | 1 pod MB (bytes/state) | after scale-out: RSS MB "
            f"(per pod) | bound MB: empty + {SLACK} × bytes/state × held | states held (per pod) "
            "| within | others' cores |",
            "|---:|---:|---|---|---|---|---|---|",
        ]
        for r in scale:
            per = r["per_pod"]
            within = "yes" if all(p["within"] for p in per) else "**no**"
            out.append(
                f"| {r['state']:,} | {r['empty_mb']:.0f} | {r['one_pod_mb']:.0f} "
                f"({r['state_bytes']}) | {_each(per, 'rss_mb', '.0f')} "
                f"| {_each(per, 'bound_mb', '.0f')} | {_each(per, 'state_batches', ',')} "
                f"| {within} | {_others(r['load'])} |"
            )
        out.append("")
    maps = [r for r in rows if r["part"] == "statemap"]
    if maps:
        out += [
            "| states (6 partitions) | bytes/state | RSS MB: before / full / 2 of 6 kept "
            "(their share) | CPU s per 100k: restore / get / put / waiting / prune |",
            "|---:|---:|---|---|",
        ]
        for r in maps:
            cpu = r["cpu_s_per_100k"]
            out.append(
                f"| {r['states']:,} | {r['bytes_per_state']} | {r['rss_before_mb']:.0f} / "
                f"{r['rss_full_mb']:.0f} / {r['rss_after_drop_mb']:.0f} ({r['share_mb']:.0f}) "
                f"| {cpu['restore']:.2f} / {cpu['get']:.2f} / {cpu['put']:.2f} / "
                f"{cpu['waiting']:.2f} / {cpu['prune']:.2f} |"
            )
        out.append("")
    out.append(
        f"Machine: {machine['cores']} cores ({machine['cpu_model']}), {machine['memory']}, "
        f"Python {machine['python']}, Kafka {machine['kafka']}, revision {machine['revision']}."
    )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Ready time and RSS per pod against state size; lines/s against pods."""
    ready = [r for r in rows if r["part"] == "readiness"]
    tput = [r for r in rows if r["part"] == "throughput"]
    if not ready and not tput:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for n in sorted({r["pods"] for r in ready}):
        series = sorted(
            (r for r in ready if r["pods"] == n and r["per_pod"]), key=lambda r: r["state"]
        )
        xs = [r["state"] / 1000 for r in series]
        label = "1 pod" if n == 1 else f"{n} pods (max of pods)"
        axes[0].plot(
            xs, [max(p["ready_s"] for p in r["per_pod"]) for r in series], "o-", label=label
        )
        axes[1].plot(
            xs, [max(p["rss_mb"] for p in r["per_pod"]) for r in series], "o-", label=label
        )
    axes[0].set(
        xlabel="state records (thousands, 6 partitions)", ylabel="s from start to /readyz 200"
    )
    axes[1].set(
        xlabel="state records (thousands, 6 partitions)", ylabel="RSS per pod after ready (MB)"
    )
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        if ready:
            ax.legend(fontsize=8)
    if tput:
        pods = [r["pods"] for r in tput]
        values = [r["lines_per_s"] for r in tput]
        axes[2].bar([str(p) for p in pods], values, color="tab:blue")
        ideal = [values[0] * p for p in pods]
        axes[2].plot([str(p) for p in pods], ideal, "k--", linewidth=1, label="linear")
        for x, v in enumerate(values):
            axes[2].text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        axes[2].set(xlabel="pods in the group", ylabel="lines/s (slow upstream)")
        axes[2].legend(fontsize=8)
        axes[2].grid(alpha=0.3, axis="y")
    fig.suptitle("datagrid-forwarder scaling (bench/scaling.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- command line ----------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--only", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    add("--sizes", type=_ints, default=[0, 100_000, 300_000, 1_000_000], help="state records")
    add("--pods", type=int, default=3, help="pods of the group in readiness and lookup")
    add("--ready-timeout", type=float, default=600, help="seconds a pod may take to be ready")
    add("--throughput-pods", type=_ints, default=[1, 2, 3])
    add("--batches", type=int, default=48, help="throughput: batches written at once")
    add("--lines", type=int, default=400, help="lines per batch (throughput and restarts)")
    add("--drip", type=float, default=0.05, help="seconds between the fake's 4 KiB chunks")
    add("--trickle", type=float, default=0.5, help="restarts: seconds between jobs")
    add("--modes", default="at-least-once,exactly-once", type=lambda s: s.split(","))
    add("--lookups", type=int, default=300, help="lookup: requests per kind")
    add("--remote-lookups", type=int, default=40, help="lookup: requests to a non-owner")
    add("--lookup-size", type=int, default=300_000, help="lookup: state records")
    add("--scaleout-sizes", type=_ints, default=[300_000], help="scaleout: state records")
    add("--map-sizes", type=_ints, default=[300_000], help="statemap: states")
    add("--map-child", type=int, default=0, help=argparse.SUPPRESS)  # statemap's own process
    add("--ref", default=None, help="measure forwarder/ as of this git commit (e.g. main~1)")
    add("--smoke", action="store_true", help="tiny sizes: does it still run?")
    add("--out", type=Path, default=OUT)
    add("--plots", type=Path, default=None, help="where the PNG goes (default: --out)")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.batches, args.lines, args.lookups = [0, 2000], 6, 40, 20
        args.remote_lookups = 10
        args.lookup_size, args.drip = 2000, 0.01
        args.scaleout_sizes, args.map_sizes = [2000], [2000]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the parts, print the tables, write the JSON and the plot."""
    args = parse_args(argv)
    if args.map_child:  # the statemap part's child: one JSON line
        print(json.dumps(measure_map(args.map_child)))
        return 0
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    bench = Bench(args, scratch)
    rows: list[dict[str, Any]] = []
    try:
        bench.rig.start()
        machine = describe()
        for part in parts:
            rows += PARTS[part](bench)
    except BenchFailure as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        bench.drop(list(bench.live))
        bench.rig.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    raw = args.out / f"scaling-{stamp}.json"
    raw.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    plots = args.plots or args.out
    plots.mkdir(parents=True, exist_ok=True)
    picture = plot(rows, plots / "scaling.png")
    print(markdown(rows, machine))
    log(f"raw numbers: {raw}; plot: {picture}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
