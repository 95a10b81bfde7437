"""The benchmark suite: the service's path against three baselines, on a real broker.

``python -m bench`` (``make bench``) from a clean checkout after ``uv sync``:

1. starts a private Kafka broker with ``deploy/kafka/rig.py`` (or reuses the one named by
   ``FORWARDER_KAFKA_BOOTSTRAP_SERVERS``) and the fake Datagrid (``tests/fake_datagrid.py``,
   generated ~300-byte lines with tens of thousands of distinct ``custom_id``s, chunked, from a
   generator);
2. runs each contender as its own process, on fresh topics (same partitions, acks=all,
   idempotence), a warm-up round and then ``--runs`` measured rounds, interleaved so that
   background noise spreads over all contenders;
3. measures each run's wall time (process start to exit, so start-up and the final flush count),
   CPU seconds (user + system, from ``wait4``) and peak RSS (``ru_maxrss``; for the kcat pipeline
   the three processes' CPU and peak RSS are added up);
4. verifies every run: the fresh topic's high watermarks, partition by partition, equal the counts
   that Kafka's murmur2 partitioner gives for the served ``custom_id``s (so the sum equals the line
   count), the fake served the whole body once, and nothing went to the dead-letter topic; any
   mismatch stops the suite with a non-zero exit;
5. prints a Markdown table (medians) and the service's ratios to each baseline, and writes the raw
   numbers to ``bench/out/results-*.json``.

Contenders: ``service`` (``forwarder forward BATCH_ID``), ``send-loop``
(``bench/baseline_send.py``), ``batch-api`` (``bench/baseline_batch.py``), ``kcat``
(``curl | mawk | kcat -P``) and ``serve`` (8 batches of 5,000 lines through ``POST /v1/batches``,
the jobs topic and the workers of one ``forwarder serve``); ``service-mem`` is ``service`` on a
small batch, for the memory comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy" / "kafka"))
sys.path.insert(0, str(REPO))
import rig  # noqa: E402

from bench._common import partition_for  # noqa: E402
from tests.fake_datagrid import FakeDatagrid, generate_lines, start_fake_datagrid  # noqa: E402

API_KEY = "dg_bench_key"
API_TOKEN = "bench-api-token"  # noqa: S105 - a throwaway token for a local, private server
WEBHOOK_SECRET = "whsec_bench_secret"  # noqa: S105 - same
CLK_TCK = os.sysconf("SC_CLK_TCK")
PY = sys.executable
OUT = REPO / "bench" / "out"

ALL = ("service", "send-loop", "batch-api", "kcat", "serve")
BASELINES = ("send-loop", "batch-api", "kcat")


class BenchFailure(RuntimeError):
    """A run did not produce exactly the expected records (or did not run at all)."""


@dataclass
class Workload:
    """What the fake serves for one batch."""

    lines: int
    line_bytes: int = 300
    distinct_ids: int = 50_000

    def spec(self) -> dict[str, Any]:
        return {
            "count": self.lines,
            "line_bytes": self.line_bytes,
            "distinct_ids": self.distinct_ids,
        }


@dataclass
class Run:
    """One measured (or warm-up) run of one contender."""

    contender: str
    lines: int
    body_bytes: int
    wall_s: float
    cpu_s: float
    rss_kb: int
    warmup: bool
    fake_cpu_s: float = 0.0
    broker_cpu_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.wall_s

    @property
    def mb_per_s(self) -> float:
        return self.body_bytes / self.wall_s / 1e6

    @property
    def cpu_per_m(self) -> float:
        return self.cpu_s / self.lines * 1e6


# --- processes -------------------------------------------------------------------------------


def proc_cpu(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (``/proc/<pid>/stat``)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_hwm_kb(pid: int) -> int:
    """Peak RSS so far of a live process (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@dataclass
class Exited:
    """A finished process: exit code, wall time, CPU and peak RSS from ``wait4``."""

    code: int
    wall_s: float
    cpu_s: float
    rss_kb: int
    stdout: str
    stderr: str


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, Any]:
    """``wait4`` one child (its own rusage, not the whole family's), killing it after timeout."""
    timer = threading.Timer(timeout, lambda: _kill(proc.pid))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def measure(
    commands: Sequence[Sequence[str]], env: dict[str, str], cwd: Path, timeout: float = 600
) -> Exited:
    """Run a pipeline of commands (usually one); CPU and peak RSS are summed over its processes."""
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(Path(tmp, f"{i}.out"), Path(tmp, f"{i}.err")) for i in range(len(commands))]
        with contextlib.ExitStack() as stack:
            procs: list[subprocess.Popen[bytes]] = []
            started = time.perf_counter()
            previous: Any = subprocess.DEVNULL
            for index, (command, (out, err)) in enumerate(zip(commands, logs, strict=True)):
                last = index == len(commands) - 1
                proc = subprocess.Popen(
                    command,
                    stdin=previous,
                    stdout=stack.enter_context(out.open("wb")) if last else subprocess.PIPE,
                    stderr=stack.enter_context(err.open("wb")),
                    env=env,
                    cwd=cwd,
                )
                if previous is not subprocess.DEVNULL:
                    previous.close()  # the next process owns the read end now
                previous = proc.stdout
                procs.append(proc)
            code, cpu, rss = 0, 0.0, 0
            for proc in procs:
                rc, usage = _reap(proc, timeout)
                code = code or rc
                cpu += usage.ru_utime + usage.ru_stime
                rss += usage.ru_maxrss
            wall = time.perf_counter() - started
        stdout = logs[-1][0].read_text(errors="replace")
        stderr = "".join(err.read_text(errors="replace") for _, err in logs)
    return Exited(code, wall, cpu, rss, stdout, stderr)


# --- Kafka -----------------------------------------------------------------------------------


async def _create_topics(
    bootstrap: str, topics: dict[str, dict[str, str]], partitions: int
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        new = [NewTopic(name, partitions, 1, topic_configs=cfg) for name, cfg in topics.items()]
        response = await admin.create_topics(new, timeout_ms=30_000)
        for topic, code, *rest in response.topic_errors:
            if code != 0:
                raise BenchFailure(f"creating {topic}: error {code} {rest}")
    finally:
        await admin.close()


async def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics, timeout_ms=30_000)
    finally:
        await admin.close()


async def _watermarks(bootstrap: str, topic: str, partitions: int) -> list[int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return [ends[tp] for tp in tps]
    finally:
        await consumer.stop()


# --- the rig ---------------------------------------------------------------------------------


class Rig:
    """Broker, fake Datagrid, scratch dir and the expected partition counts."""

    def __init__(self, partitions: int, scratch: Path, ref: str | None = None) -> None:
        self.partitions = partitions
        self.scratch = scratch
        self.pythonpath = str(REPO)
        if ref:
            # Benchmark the forwarder package of a commit (e.g. HEAD while the work tree is being
            # edited, or main against a branch); bench/ and tests/ still come from the work tree.
            src = scratch / "src"
            src.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", ref, "forwarder"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            self.pythonpath = f"{src}{os.pathsep}{REPO}"
        self.broker: rig.Broker | None = None
        self.broker_pid: int | None = None
        self.bootstrap = ""
        self.fake: FakeDatagrid | None = None
        self._expected: dict[tuple[int, int], list[int]] = {}
        self.tag = uuid.uuid4().hex[:6]
        self.extra_env: dict[str, str] = {}
        self._seq = 0

    def start(self) -> None:
        given = os.environ.get("FORWARDER_KAFKA_BOOTSTRAP_SERVERS")
        if given:
            host, _, port = given.split(",")[0].rpartition(":")
            rig.probe_metadata(host, int(port))
            self.bootstrap = given
            log(f"reusing broker {given} (FORWARDER_KAFKA_BOOTSTRAP_SERVERS)")
        else:
            log("starting a private Kafka broker (deploy/kafka/rig.py)")
            self.broker = rig.Broker.on_free_ports(self.scratch / "kafka")
            self.broker.start(wait=120)
            self.bootstrap = self.broker.bootstrap
            self.broker_pid = self.broker.pid
        log("starting the fake Datagrid (tests/fake_datagrid.py)")
        self.fake = start_fake_datagrid(API_KEY)

    def stop(self) -> None:
        if self.fake is not None:
            self.fake.stop()
        if self.broker is not None:
            self.broker.stop()

    @property
    def fake_pid(self) -> int | None:
        return self.fake.process.pid if self.fake and self.fake.process else None

    def names(self, contender: str) -> dict[str, str]:
        """Fresh topic (and group) names for one run."""
        self._seq += 1
        base = f"bench-{self.tag}-{self._seq:03d}-{contender}"
        return {
            "results": f"{base}.results",
            "dlq": f"{base}.dlq",
            "state": f"{base}.state",
            "jobs": f"{base}.jobs",
            "group": f"{base}.group",
            "batch": f"bpred_{self.tag}_{self._seq:03d}",
        }

    def create(self, names: dict[str, str], *, service: bool) -> list[str]:
        topics: dict[str, dict[str, str]] = {names["results"]: {}}
        if service:
            topics[names["dlq"]] = {}
            topics[names["jobs"]] = {}
            topics[names["state"]] = {"cleanup.policy": "compact"}
        asyncio.run(_create_topics(self.bootstrap, topics, self.partitions))
        return list(topics)

    def delete(self, topics: list[str]) -> None:
        with contextlib.suppress(Exception):  # disk hygiene only; never fails a run
            asyncio.run(_delete_topics(self.bootstrap, topics))

    def configure(self, batch_id: str, work: Workload) -> None:
        assert self.fake is not None
        self.fake.configure(batch_id, generate=work.spec(), chunk_size=65536)

    def expected(self, work: Workload) -> list[int]:
        """Records per partition that murmur2 gives for the served custom_ids."""
        key = (work.lines, work.distinct_ids)
        if key not in self._expected:
            per = [0] * self.partitions
            distinct = min(work.lines, work.distinct_ids)
            cycles, rest = divmod(work.lines, work.distinct_ids)
            sample = generate_lines("bpred_x", {**work.spec(), "count": distinct})
            for i, line in enumerate(sample):
                custom_id = msgspec.json.decode(line)["custom_id"].encode()
                per[partition_for(custom_id, self.partitions)] += cycles + (1 if i < rest else 0)
            self._expected[key] = per
        return self._expected[key]

    def verify(self, names: dict[str, str], work: Workload, *, service: bool) -> int:
        """Fail loudly unless the topic holds exactly the expected records; return body bytes."""
        got = asyncio.run(_watermarks(self.bootstrap, names["results"], self.partitions))
        want = self.expected(work)
        if got != want:
            raise BenchFailure(
                f"{names['results']}: high watermarks {got} (sum {sum(got)}), expected {want} "
                f"(sum {sum(want)})"
            )
        if service:
            dlq = asyncio.run(_watermarks(self.bootstrap, names["dlq"], self.partitions))
            if sum(dlq):
                raise BenchFailure(f"{names['dlq']}: {sum(dlq)} dead letters, expected none")
        assert self.fake is not None
        streams = [
            r
            for r in self.fake.requests()
            if r["batch_id"] == names["batch"] and r["path"].endswith("/results")
        ]
        self.fake.clear_requests()
        if [r["outcome"] for r in streams] != ["complete"] or streams[0][
            "lines_sent"
        ] != work.lines:
            raise BenchFailure(f"{names['batch']}: fake saw results requests {streams}")
        return int(streams[0]["bytes_sent"])

    def service_env(self, names: dict[str, str], **extra: str) -> dict[str, str]:
        assert self.fake is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FORWARDER_", "DATAGRID_"))}
        # Let the warm-up write .pyc files (the image ships them compiled, UV_COMPILE_BYTECODE=1):
        # otherwise every run recompiles its imports and start-up CPU counts against the hot path.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(
            PYTHONPATH=self.pythonpath,
            DATAGRID_API_KEY=API_KEY,
            FORWARDER_DATAGRID_BASE_URL=self.fake.base_url,
            FORWARDER_KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            FORWARDER_RESULTS_TOPIC=names["results"],
            FORWARDER_DEAD_LETTER_TOPIC=names["dlq"],
            FORWARDER_STATE_TOPIC=names["state"],
            FORWARDER_JOBS_TOPIC=names["jobs"],
            FORWARDER_CONSUMER_GROUP=names["group"],
            FORWARDER_KAFKA_TOPIC_PARTITIONS=str(self.partitions),
            FORWARDER_KAFKA_REPLICATION_FACTOR="1",
            FORWARDER_LOG_FORMAT="json",
        )
        env.update(self.extra_env)
        env.update(extra)
        return env

    def baseline_env(self, names: dict[str, str]) -> dict[str, str]:
        """The baselines' environment: the work tree's ``forwarder.kafka`` even under ``--ref``.

        They only borrow its partitioner (``bench._common``), which commits before a4beb8e lack.
        """
        env = self.service_env(names)
        env["PYTHONPATH"] = str(REPO)
        return env


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def forwarder_command() -> list[str]:
    """The ``forwarder`` console script of this interpreter's environment."""
    script = Path(PY).parent / "forwarder"
    return [str(script)] if script.exists() else [PY, "-m", "forwarder.cli"]


# --- contenders ------------------------------------------------------------------------------


def contender_command(
    rig_: Rig, contender: str, names: dict[str, str]
) -> tuple[list[list[str]], dict[str, str]]:
    """The command line(s) and environment of a contender that forwards one batch and exits."""
    if contender == "service":
        return [[*forwarder_command(), "forward", names["batch"]]], rig_.service_env(names)
    if contender == "kcat":
        return kcat_pipeline(rig_, names), rig_.baseline_env(names)
    assert rig_.fake is not None
    script = {"send-loop": "bench.baseline_send", "batch-api": "bench.baseline_batch"}[contender]
    base = [
        "--base-url",
        rig_.fake.base_url,
        "--api-key",
        API_KEY,
        "--batch-id",
        names["batch"],
        "--bootstrap",
        rig_.bootstrap,
        "--topic",
        names["results"],
    ]
    return [[PY, "-m", script, *base]], rig_.baseline_env(names)


def run_process_contender(
    rig_: Rig, contender: str, work: Workload, warmup: bool, label: str | None = None
) -> Run:
    """One run of a contender that is a process (or pipeline) forwarding one batch."""
    service = contender == "service"
    names = rig_.names(contender)
    topics = rig_.create(names, service=service)
    rig_.configure(names["batch"], work)
    commands, env = contender_command(rig_, contender, names)
    fake0, broker0 = proc_cpu(rig_.fake_pid), proc_cpu(rig_.broker_pid)
    done = measure(commands, env, rig_.scratch)
    fake1, broker1 = proc_cpu(rig_.fake_pid), proc_cpu(rig_.broker_pid)
    if done.code != 0:
        raise BenchFailure(
            f"{contender} exited {done.code}\n--- stdout\n{done.stdout[-3000:]}\n"
            f"--- stderr\n{done.stderr[-3000:]}"
        )
    body = rig_.verify(names, work, service=service)
    rig_.delete(topics)
    return Run(
        label or contender,
        work.lines,
        body,
        done.wall_s,
        done.cpu_s,
        done.rss_kb,
        warmup,
        fake_cpu_s=(fake1 or 0) - (fake0 or 0),
        broker_cpu_s=None if broker0 is None or broker1 is None else broker1 - broker0,
        detail=_batch_log(done.stderr),
    )


def _batch_log(stderr: str) -> dict[str, Any]:
    """The service's canonical ``batch_forwarded`` log line, if any (its in-process duration)."""
    for line in stderr.splitlines():
        if '"batch_forwarded"' in line:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                return {"batch_duration_s": event.get("duration_s")}
    return {}


def kcat_pipeline(rig_: Rig, names: dict[str, str]) -> list[list[str]]:
    """``curl | mawk (key<TAB>line) | kcat -P``: the librdkafka floor for the same records.

    kcat cannot set per-message headers from stdin, so it sends the two constant headers only
    (batch id, content type); ``datagrid-status`` and ``datagrid-line`` are missing (~40 bytes less
    per record).
    """
    assert rig_.fake is not None
    for tool in ("curl", "kcat"):
        if shutil.which(tool) is None:
            raise BenchFailure(f"{tool} is not installed (apt-get install {tool})")
    awk = shutil.which("mawk") or shutil.which("awk") or "awk"
    url = f"{rig_.fake.base_url}/batch-predictions/{names['batch']}/results"
    # Not a JSON parser: takes the first "custom_id":"..." of the line, enough for this data.
    script = (
        '{ i = index($0, "\\"custom_id\\":\\""); if (i == 0) next; '
        's = substr($0, i + 13); j = index(s, "\\""); print substr(s, 1, j - 1) "\\t" $0 }'
    )
    return [
        [
            "curl",
            "-sS",
            "--fail",
            "-N",
            "-H",
            f"Authorization: Bearer {API_KEY}",
            "-H",
            "Accept: application/x-ndjson",
            url,
        ],
        [awk, script],
        [
            "kcat",
            "-P",
            "-b",
            rig_.bootstrap,
            "-t",
            names["results"],
            "-K",
            "\t",
            "-H",
            f"datagrid-batch-id={names['batch']}",
            "-H",
            "content-type=application/json",
            "-X",
            "partitioner=murmur2_random",
            "-X",
            "acks=all",
            "-X",
            "enable.idempotence=true",
            "-X",
            "linger.ms=5",
            "-X",
            "batch.size=262144",
        ],
    ]


def run_serve(
    rig_: Rig, batches: int, work: Workload, warmup: bool, concurrency: int | None = None
) -> Run:
    """``batches`` batches queued at once through ``POST /v1/batches`` into one ``forwarder serve``.

    Timed from the first POST until the results topic holds every record (polled with ListOffsets
    from this process, so the server does no extra work); the serve process's CPU is read from
    /proc over the same window, its peak RSS (VmHWM, start-up included) at the end.
    """
    names = rig_.names("serve")
    topics = rig_.create(names, service=True)
    batch_ids = [f"{names['batch']}_{i}" for i in range(batches)]
    for batch_id in batch_ids:
        rig_.configure(batch_id, work)
    port = rig.free_port()
    extra = {
        "FORWARDER_HTTP_HOST": "127.0.0.1",
        "FORWARDER_HTTP_PORT": str(port),
        "FORWARDER_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "FORWARDER_API_TOKENS": API_TOKEN,
    }
    if concurrency:
        extra["FORWARDER_CONCURRENCY"] = str(concurrency)
    env = rig_.service_env(names, **extra)
    out = (rig_.scratch / f"serve-{names['batch']}.log").open("wb")
    proc = subprocess.Popen(
        [*forwarder_command(), "serve"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=rig_.scratch,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            _wait_ready(http, proc, rig_.scratch / f"serve-{names['batch']}.log")
            fake0, broker0 = proc_cpu(rig_.fake_pid), proc_cpu(rig_.broker_pid)
            cpu0 = proc_cpu(proc.pid) or 0.0
            started = time.perf_counter()
            for batch_id in batch_ids:
                response = http.post("/v1/batches", json={"batch_id": batch_id}, headers=headers)
                if response.status_code != 202:
                    raise BenchFailure(
                        f"POST /v1/batches {batch_id}: {response.status_code} {response.text[:500]}"
                    )
            total = batches * work.lines
            asyncio.run(
                _wait_for_records(
                    rig_.bootstrap, names["results"], rig_.partitions, total, timeout=300
                )
            )
            wall = time.perf_counter() - started
            cpu1 = proc_cpu(proc.pid) or 0.0
            fake1, broker1 = proc_cpu(rig_.fake_pid), proc_cpu(rig_.broker_pid)
            rss = proc_hwm_kb(proc.pid)
            for batch_id in batch_ids:
                state = _wait_state(http, batch_id, headers)
                if state.get("status") != "forwarded":
                    raise BenchFailure(f"{batch_id}: state {state}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
    got = asyncio.run(_watermarks(rig_.bootstrap, names["results"], rig_.partitions))
    want = [n * batches for n in rig_.expected(work)]
    if got != want:
        raise BenchFailure(f"serve: high watermarks {got}, expected {want}")
    assert rig_.fake is not None
    streams = [
        r
        for r in rig_.fake.requests()
        if r["path"].endswith("/results") and r["batch_id"] in batch_ids
    ]
    rig_.fake.clear_requests()
    if len(streams) != batches or any(r["outcome"] != "complete" for r in streams):
        raise BenchFailure(f"serve: fake saw results requests {streams}")
    body = sum(int(r["bytes_sent"]) for r in streams)
    rig_.delete(topics)
    return Run(
        "serve",
        total,
        body,
        wall,
        cpu1 - cpu0,
        rss,
        warmup,
        fake_cpu_s=(fake1 or 0) - (fake0 or 0),
        broker_cpu_s=None if broker0 is None or broker1 is None else broker1 - broker0,
        detail={
            "batches": batches,
            "lines_per_batch": work.lines,
            "concurrency": concurrency or "default",
        },
    )


def _wait_ready(http: httpx.Client, proc: subprocess.Popen[bytes], logfile: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchFailure(
                f"forwarder serve exited {proc.returncode} during start-up:\n"
                f"{logfile.read_text()[-4000:]}"
            )
        with contextlib.suppress(httpx.TransportError):
            if http.get("/readyz").status_code == 200:
                return
        time.sleep(0.1)
    raise BenchFailure(f"forwarder serve not ready after 90 s:\n{logfile.read_text()[-4000:]}")


def _wait_state(http: httpx.Client, batch_id: str, headers: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = http.get(f"/v1/batches/{batch_id}", headers=headers)
        if response.status_code == 200:
            state = response.json()
            if state.get("status") in ("forwarded", "failed"):
                return state
        time.sleep(0.1)
    return state


async def _wait_for_records(
    bootstrap: str, topic: str, partitions: int, total: int, timeout: float
) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        deadline = time.monotonic() + timeout
        while True:
            ends = await consumer.end_offsets(tps)
            have = sum(ends.values())
            if have >= total:
                return
            if time.monotonic() > deadline:
                raise BenchFailure(
                    f"serve: {topic} holds {have} of {total} records after {timeout:.0f} s"
                )
            await asyncio.sleep(0.02)
    finally:
        await consumer.stop()


# --- report ----------------------------------------------------------------------------------

LABELS = {
    "service": "service: `forwarder forward` (1 batch)",
    "send-loop": "baseline: aiokafka `send()` loop",
    "batch-api": "baseline: aiokafka batch API + murmur2",
    "kcat": "baseline: `curl | mawk | kcat -P`",
    "serve": "service: `forwarder serve`, jobs topic",
    "service-mem": "service: `forwarder forward` (small batch)",
}


@dataclass
class Row:
    """Medians (and the best throughput) of one contender's measured runs."""

    contender: str
    lines: int
    runs: int
    wall_s: float
    lines_per_s: float
    best_lines_per_s: float
    mb_per_s: float
    cpu_per_m: float
    rss_mb: float
    fake_cpu_per_m: float
    broker_cpu_per_m: float | None


def summarize(runs: list[Run]) -> list[Row]:
    rows = []
    keys: list[tuple[str, int]] = []
    for r in runs:
        if not r.warmup and (r.contender, r.lines) not in keys:
            keys.append((r.contender, r.lines))
    for contender, lines in keys:
        mine = [r for r in runs if r.contender == contender and r.lines == lines and not r.warmup]
        broker = [r.broker_cpu_s / r.lines * 1e6 for r in mine if r.broker_cpu_s is not None]
        rows.append(
            Row(
                contender,
                lines,
                len(mine),
                statistics.median(r.wall_s for r in mine),
                statistics.median(r.lines_per_s for r in mine),
                max(r.lines_per_s for r in mine),
                statistics.median(r.mb_per_s for r in mine),
                statistics.median(r.cpu_per_m for r in mine),
                statistics.median(r.rss_kb for r in mine) / 1024,
                statistics.median(r.fake_cpu_s / r.lines * 1e6 for r in mine),
                statistics.median(broker) if broker else None,
            )
        )
    return rows


def render(rows: list[Row]) -> str:
    head = (
        "| contender | lines | runs | wall s | lines/s | best lines/s | MB/s | CPU s / M lines "
        "| peak RSS MB | fake CPU s/M | broker CPU s/M |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    body = "".join(
        f"| {LABELS.get(r.contender, r.contender)} | {r.lines:,} | {r.runs} | {r.wall_s:.2f} "
        f"| {r.lines_per_s:,.0f} | {r.best_lines_per_s:,.0f} | {r.mb_per_s:.1f} "
        f"| {r.cpu_per_m:.2f} | {r.rss_mb:.0f} | {r.fake_cpu_per_m:.2f} | "
        + ("-" if r.broker_cpu_per_m is None else f"{r.broker_cpu_per_m:.2f}")
        + " |\n"
        for r in rows
    )
    return head + body


def render_ratios(rows: list[Row], lines: int) -> str:
    by = {r.contender: r for r in rows if r.lines == lines}
    out = []
    if "service" in by:
        s = by["service"]
        for base in BASELINES:
            if base not in by:
                continue
            b = by[base]
            out.append(
                f"| service / {base} | {s.lines_per_s / b.lines_per_s:.2f} "
                f"| {s.best_lines_per_s / b.best_lines_per_s:.2f} "
                f"| {s.cpu_per_m / b.cpu_per_m:.2f} | {s.rss_mb / b.rss_mb:.2f} |"
            )
    if not out:
        return ""
    return (
        "| ratio | lines/s (median) | lines/s (best) | CPU per line | peak RSS |\n"
        "|---|--:|--:|--:|--:|\n" + "\n".join(out) + "\n"
    )


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    versions = {}
    for module in ("aiokafka", "httpx", "msgspec"):
        with contextlib.suppress(Exception):
            versions[module] = __import__(module).__version__
    kcat = ""
    with contextlib.suppress(Exception):
        version = subprocess.run(["kcat", "-V"], capture_output=True, text=True).stdout
        # "Version 1.7.1 (JSON, ..., librdkafka 2.0.2 builtin.features=...)"
        kcat = next(line for line in version.splitlines() if line.startswith("Version "))
        kcat = kcat.split(" builtin.features", 1)[0]
    revision = ""
    with contextlib.suppress(Exception):
        revision = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    return {
        "revision": revision,
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "kafka": rig.kafka_version(),
        "kcat": kcat.strip(),
        **versions,
    }


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the forwarder against baselines on a real broker.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Reuses FORWARDER_KAFKA_BOOTSTRAP_SERVERS if set, else starts a private broker.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="200k lines, 1 measured run, no warm-up (about a minute)",
    )
    p.add_argument("--lines", type=int, default=1_000_000, help="lines of the big batch")
    p.add_argument("--runs", type=int, default=3, help="measured runs per contender (median)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per contender")
    p.add_argument(
        "--only",
        default=",".join(ALL),
        help=f"comma-separated subset of {','.join(ALL)} (default: all)",
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=6,
        help="partitions of every results topic "
        "(the service's default FORWARDER_KAFKA_TOPIC_PARTITIONS)",
    )
    p.add_argument("--distinct-ids", type=int, default=50_000)
    p.add_argument("--serve-batches", type=int, default=8)
    p.add_argument("--serve-lines", type=int, default=5_000)
    p.add_argument(
        "--serve-concurrency",
        type=int,
        default=None,
        help="FORWARDER_CONCURRENCY for serve (default: the service's default)",
    )
    p.add_argument(
        "--memory-lines",
        type=int,
        default=5_000,
        help="small batch for the memory comparison (0: skip)",
    )
    p.add_argument("--out", type=Path, default=OUT, help="where the JSON results go")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for service and serve (repeatable), "
        "e.g. FORWARDER_KAFKA_LINGER_MS=0",
    )
    p.add_argument(
        "--ref",
        default=None,
        help="benchmark forwarder/ as of this git commit (default: the work tree)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.lines, args.runs, args.warmup = min(args.lines, 200_000), 1, 0
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(args.only) - set(ALL)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}; choose from {ALL}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="forwarder-bench-"))
    rig_ = Rig(args.partitions, scratch, args.ref)
    rig_.extra_env = dict(item.split("=", 1) for item in args.env)
    runs: list[Run] = []
    started = time.monotonic()
    info = machine()
    if args.ref:
        info["forwarder_ref"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.ref],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    try:
        rig_.start()
        big = Workload(args.lines, distinct_ids=args.distinct_ids)
        small = Workload(args.memory_lines, distinct_ids=args.distinct_ids)
        serve_work = Workload(args.serve_lines, distinct_ids=args.distinct_ids)
        rig_.expected(big)
        schedule: list[tuple[str, Callable[[bool], Run]]] = []
        for contender in args.only:
            if contender == "serve":
                serve = partial(
                    run_serve,
                    rig_,
                    args.serve_batches,
                    serve_work,
                    concurrency=args.serve_concurrency,
                )
                schedule.append((contender, serve))
            else:
                schedule.append((contender, partial(run_process_contender, rig_, contender, big)))
        if args.memory_lines and "service" in args.only:
            mem = partial(run_process_contender, rig_, "service", small, label="service-mem")
            schedule.append(("service-mem", mem))
        total_rounds = args.warmup + args.runs
        for round_no in range(total_rounds):
            warm = round_no < args.warmup
            for name, fn in schedule:
                run = fn(warm)
                run.detail["load1_after"] = round(os.getloadavg()[0], 2)
                runs.append(run)
                log(
                    f"round {round_no + 1}/{total_rounds}{' (warm-up)' if warm else ''} {name}: "
                    f"{run.lines:,} lines in {run.wall_s:.2f} s = {run.lines_per_s:,.0f} lines/s, "
                    f"CPU {run.cpu_s:.2f} s, peak RSS {run.rss_kb / 1024:.0f} MB"
                )
    except BenchFailure as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        rig_.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    rows = summarize(runs)
    loads = [float(r.detail["load1_after"]) for r in runs] or [0.0]
    elapsed = time.monotonic() - started
    print(
        f"\n## Results ({args.lines:,}-line batch; serve: {args.serve_batches} x "
        f"{args.serve_lines:,} lines; median of {args.runs} after {args.warmup} warm-up; "
        f"{args.partitions} partitions; suite took {elapsed:.0f} s)\n"
    )
    print(render(rows))
    ratios = render_ratios(rows, args.lines)
    if ratios:
        print(ratios)
    print(
        f"forwarder/ from {info.get('forwarder_ref') or 'the work tree ' + info['revision']}; "
        f"machine: {info['cores']} cores, {info['cpu_model']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}, 1-minute load average after "
        f"the runs: median {statistics.median(loads):.1f}, max {max(loads):.1f} (2 cores: above ~2 "
        "something else competes; trust CPU s/M more than wall time then)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "machine": info,
                "elapsed_s": elapsed,
                "rows": [asdict(r) for r in rows],
                "runs": [
                    {**asdict(r), "lines_per_s": r.lines_per_s, "cpu_per_m": r.cpu_per_m}
                    for r in runs
                ],
            },
            indent=1,
        )
    )
    log(f"raw numbers in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
