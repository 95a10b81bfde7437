"""Profile one contender on a big batch and say where its CPU time goes.

    python -m bench.profile [--lines 1000000] [--contender service|batch-api|send-loop] [--native]
    python -m bench.profile --contender serve [--batches 500] [--lines 5] [--via jobs|webhook]

Uses ``py-spy record`` (PyPI; ``uv tool install py-spy``, found on PATH or in ~/.local/bin) in raw
(collapsed-stack) mode, idle samples excluded, so the percentages are of on-CPU samples; falls back
to cProfile when py-spy is missing.  One unprofiled 2,000-line run first writes the ``.pyc`` files,
as the suite's warm-up does.  Prints CPU by stage of the path (inclusive: murmur2, record append,
sender, ...), by area (innermost known frame: ours, aiokafka's produce path, asyncio, httpx, ...),
and the hottest functions by self and inclusive time; keeps the raw profile (collapsed stacks:
speedscope or flamegraph.pl read it) and the report in ``bench/out/``.

``--contender serve`` measures the fixed cost of a batch instead: one ``forwarder serve`` is fed
``--batches`` batches of ``--lines`` lines (tiny, so the per-line path hardly shows) through the
jobs topic or as signed webhooks, three times: a warm-up, a timed round (the server's CPU from
``/proc`` over it, divided by the batches: CPU-ms per batch, and the kernel's share of it) and a
profiled round (py-spy attached to the running server), whose samples are also broken down by
per-batch step.  py-spy counts a thread that is runnable but waiting for a core as on-CPU, so on a
busy machine the shares of the event loop's ``select`` and of socket sends are inflated: compare
shares from a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data import Workload
from bench.harness import OUT, PY, BenchFailure, log
from bench.latency import signed
from bench.machine import LoadWindow
from bench.oneshot import contender_command
from bench.serve import Serve, metric_value, serve
from bench.testbed import Rig
from bench.topics import produce_values, wait_for_records, watermarks

#: Lines of the one batch profiled (serve: 5 per batch unless given).
LINES = 1_000_000

#: Areas, first match wins; matched against "function (file:line)" frames.
AREAS: list[tuple[str, str]] = [
    (
        "forwarder/publish.py, pipeline.py: Publisher.publish & co (our per-line loop)",
        r"forwarder/(pipeline|publish)\.py",
    ),
    ("forwarder/ndjson.py (split, classify)", r"forwarder/ndjson\.py"),
    ("forwarder/kafka.py: murmur2 / partition_for", r"forwarder/kafka\.py|murmurhash2"),
    ("bench baseline scripts (their per-line loop)", r"bench/"),
    ("aiokafka partitioner (murmur2, pure Python)", r"aiokafka/partitioner\.py"),
    (
        "aiokafka producer.send + accumulator (per-line)",
        r"aiokafka/producer/(producer|message_accumulator)\.py",
    ),
    ("aiokafka record building (C extension)", r"aiokafka/record/|default_records|cutil"),
    ("aiokafka sender / connection / protocol", r"aiokafka/(producer/sender|conn|client|protocol)"),
    ("prometheus_client (per-line metrics)", r"prometheus_client/"),
    ("structlog / logging", r"structlog/|logging/"),
    ("httpx / httpcore / h11 (upstream stream)", r"httpx/|httpcore/|h11/|anyio/"),
    ("msgspec", r"msgspec"),
    ("asyncio event loop, futures, tasks", r"asyncio/|_asyncio|uvloop"),
    ("interpreter start-up and imports", r"<frozen importlib|_bootstrap"),
]


#: Stages of the path, first match wins; a sample belongs to a stage when any frame of its stack
#: matches (inclusive), so a syscall or a C helper is charged to the stage that called it.
STAGES: list[tuple[str, str]] = [
    # Decided in stage_of: no event loop on the stack (start-up, the final GC at exit) or an import.
    ("start-up, imports, exit (outside the event loop)", r"^$"),
    ("cyclic GC (inside the event loop)", r"^gc_collect"),
    ("murmur2 + partition_for", r"^(murmur2|partition_for|murmurhash2) "),
    ("record append (BatchBuilder.append, C encoding)", r"^BatchBuilder\.append "),
    (
        "producer sender: produce requests, crc32c, socket send, responses",
        r"aiokafka/(producer/sender|conn|client)\.py",
    ),
    (
        "upstream HTTP stream (httpx, httpcore, h11, recv)",
        r"^(Response\.aiter_bytes|_chunks) |httpcore/|anyio/",
    ),
    ("line decode (classify, msgspec)", r"^classify |msgspec"),
    (
        "line split (LineSplitter.feed, stream_lines)",
        r"^(LineSplitter\.feed|stream_lines\.<locals>)",
    ),
    ("linger (timer per chunk)", r"^(_lingering|Publisher\.linger|Publisher\._linger_expired) "),
    (
        "per-line loop: self time, small helpers, send_batch, acks",
        r"^(_Run\.|Publisher\.|run \(bench|stream_lines \(bench|_stream_lines \(bench"
        r"|(Pipeline|PublishConfig)\.status_of|is_blank|_raw )",
    ),
    ("event loop, other", r""),
]


#: Steps of one batch in ``forwarder serve``, for the fixed cost per batch: a sample belongs to the
#: first step any frame of its stack matches (so logging or metrics called from the state write
#: count as logging or metrics, and the state write's own send as the state record).
STEPS: list[tuple[str, str]] = [
    ("cyclic GC", r"^gc_collect"),
    ("logging (structlog, the JSON renderer, the handler)", r"structlog/|logging/"),
    ("metrics (prometheus_client)", r"prometheus_client/"),
    (
        "state record (Outcomes.record / send_state, BatchState.encode)",
        r"^(Outcomes\.(record|_record_once|send_state)|BatchState\.encode) ",
    ),
    ("state store (StateStore, statemap)", r"forwarder/(store|statemap)\.py"),
    (
        "job offset commit (Worker._commit, GroupCommit, consumer.commit)",
        r"^(Worker\._commit(_offsets)?|GroupCommit\.\w+|AIOKafkaConsumer\.commit) ",
    ),
    (
        "webhook / API request (litestar, uvicorn, the handler, the job's produce)",
        r"litestar/|uvicorn/protocols/|forwarder/(webhooks|api)\.py",
    ),
    ("upstream GET /batches/{id} (DatagridClient.get_batch)", r"^DatagridClient\.get_batch "),
    (
        "upstream results stream (stream_results, httpx)",
        r"^DatagridClient\.stream_results |httpx/|httpcore/|h11/|anyio/",
    ),
    (
        "Publisher set-up and publish (publish.py, acks.py, ndjson.py)",
        r"forwarder/(publish|acks|ndjson)\.py",
    ),
    ("results partitions (producer.partitions_for)", r"^AIOKafkaProducer\.partitions_for "),
    (
        "jobs poll loop (Worker._loop, lag, getmany)",
        r"^(Worker\._loop|LagReporter\.update|AIOKafkaConsumer\.getmany) ",
    ),
    ("consumer fetcher / coordinator (aiokafka)", r"aiokafka/consumer/"),
    ("producer sender / connection (aiokafka)", r"aiokafka/(producer|conn|client|protocol|record)"),
    (
        "rest of the pipeline and worker (pipeline.py, outcome.py, worker.py, retry.py)",
        r"forwarder/(?!server\.py|cli\.py)",
    ),
    ("event loop, other (scheduling, epoll, callbacks)", r""),
]


def step_of(frames: list[str]) -> str:
    for name, pattern in STEPS:
        if any(re.search(pattern, f) for f in reversed(frames)):
            return name
    return STEPS[-1][0]


def stage_of(frames: list[str]) -> str:
    if not any(f.startswith("BaseEventLoop.run_forever") for f in frames) or any(
        "importlib" in f for f in frames
    ):
        return STAGES[0][0]
    for name, pattern in STAGES[1:]:
        if any(re.search(pattern, f) for f in frames):
            return name
    return STAGES[-1][0]


def find_pyspy() -> str | None:
    """py-spy from the venv (the dev group), else on PATH or where ``uv tool install`` puts it."""
    beside = Path(PY).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path.home() / ".local" / "bin" / "py-spy"
    return str(candidate) if candidate.exists() else None


def area_of(frame: str) -> str:
    for name, pattern in AREAS:
        if re.search(pattern, frame):
            return name
    return "other"


def _function(frame: str) -> str:
    # "publish (forwarder/pipeline.py:341)" -> "publish (forwarder/pipeline.py)"
    return re.sub(r":\d+\)$", ")", frame.strip())


def summarize_raw(path: Path, top: int = 25, *, per_batch_ms: float | None = None) -> str:
    """Stage, area, self and inclusive tables of a py-spy raw (collapsed) profile; with
    ``per_batch_ms`` (serve's CPU-ms per batch), steps of a batch instead of stages, with each
    step's share of that CPU in ms."""
    steps = per_batch_ms is not None
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";")]
        # Drop the thread/process frames py-spy puts first.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
        # Area of a sample: the innermost Python frame that belongs to a known area, so that a
        # native leaf (a syscall, a C helper) is charged to the code that called it.
        area = "other"
        for f in reversed(frames):
            a = area_of(f)
            if a != "other":
                area = a
                break
        areas[area] += count
        stages[step_of(frames) if steps else stage_of(frames)] += count
    if not total:
        return "no samples\n"

    def table(
        title: str,
        counter: collections.Counter[str],
        n: int,
        what: str = "function",
        ms: bool = False,
    ) -> str:
        if ms:
            rows = [f"### {title}\n", f"| % of CPU samples | CPU-ms per batch | {what} |"]
            rows.append("|--:|--:|---|")
        else:
            rows = [f"### {title}\n", f"| % of CPU samples | {what} |", "|--:|---|"]
        for name, count in counter.most_common(n):
            share = f"{100 * count / total:5.1f}"
            if ms:
                share += f" | {(per_batch_ms or 0) * count / total:5.2f}"
            rows.append(f"| {share} | `{name}` |")
        return "\n".join(rows) + "\n"

    return (
        f"{total} on-CPU samples\n\n"
        + (
            table("By step of a batch (first match)", stages, len(STEPS), "step", ms=True)
            if steps
            else table("By stage (inclusive, first match)", stages, len(STAGES), "stage")
        )
        + "\n"
        + table("By area (innermost known frame)", areas, len(AREAS) + 1, "area")
        + "\n"
        + table("Self time (leaf frame)", self_time, top)
        + "\n"
        + table("Inclusive time", inclusive, top)
    )


def _feed_round(
    rig_: Rig, server: Serve, names: dict[str, str], batch_ids: list[str], via: str, lines: int
) -> None:
    """Queue ``batch_ids`` (jobs topic or signed webhooks) and wait until every one is forwarded.

    The results topic's watermarks say when the lines are in (read from the broker: a scrape of
    ``/metrics`` every few ms would cost the server CPU), then one scrape that the batches are
    counted forwarded (their state records follow their lines)."""
    before = sum(asyncio.run(watermarks(rig_.bootstrap, names["results"], rig_.partitions)))
    forwarded = metric_value(server.metrics(), "forwarder_batches_total", 'outcome="forwarded"')
    if via == "jobs":
        jobs = [(b.encode(), b.encode()) for b in batch_ids]
        asyncio.run(produce_values(rig_.bootstrap, names["jobs"], jobs))
    else:
        for batch_id in batch_ids:
            body, headers = signed(batch_id, f"evt_{batch_id}")
            response = server.http.post("/webhooks/datagrid", content=body, headers=headers)
            if response.status_code != 202:
                raise BenchFailure(f"webhook for {batch_id}: {response.status_code}")
    total = before + lines * len(batch_ids)
    asyncio.run(wait_for_records(rig_.bootstrap, names["results"], rig_.partitions, total, 600))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = metric_value(server.metrics(), "forwarder_batches_total", 'outcome="forwarded"')
        if done >= forwarded + len(batch_ids):
            return
        time.sleep(0.2)
    raise BenchFailure(f"{done - forwarded:.0f} of {len(batch_ids)} batches counted forwarded")


def _system_cpu(pid: int) -> float:
    """System (kernel) CPU seconds of a live process: its syscalls (socket sends, epoll)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def profile_serve(rig_: Rig, args: argparse.Namespace, stamp: str) -> str:
    """The fixed cost of a batch in ``forwarder serve``: CPU-ms per batch, then a profile."""
    names = rig_.names("serve")
    topics = rig_.create(names, service=True)
    work = Workload(args.lines)
    rounds = {
        name: [f"{names['batch']}_{name}_{i}" for i in range(n)]
        for name, n in (("warm", max(args.batches // 5, 20)), ("timed", args.batches))
    }
    if not args.cpu_only:
        rounds["profiled"] = [f"{names['batch']}_profiled_{i}" for i in range(args.batches)]
    for batch_ids in rounds.values():
        for batch_id in batch_ids:
            rig_.configure(batch_id, work)
    with serve(rig_, names, **dict(e.split("=", 1) for e in args.env)) as server:
        _feed_round(rig_, server, names, rounds["warm"], args.via, args.lines)
        cpu0, started, helpers0 = server.cpu, time.perf_counter(), rig_.helpers_cpu()
        sys0 = _system_cpu(server.proc.pid)
        window = LoadWindow()
        _feed_round(rig_, server, names, rounds["timed"], args.via, args.lines)
        cpu, wall = server.cpu - cpu0, time.perf_counter() - started
        kernel = _system_cpu(server.proc.pid) - sys0
        helpers = sum(
            (b or 0) - (a or 0) for a, b in zip(helpers0, rig_.helpers_cpu(), strict=True)
        )
        load = window.close(cpu + helpers, {*rig_.our_pids(), server.proc.pid})
        pyspy = None if args.cpu_only else find_pyspy()
        report = ""
        if pyspy:
            raw = OUT / f"profile-serve-{stamp}.txt"
            command = [pyspy, "record", "-r", str(args.rate), "-f", "raw", "-o", str(raw)]
            command += ["--pid", str(server.proc.pid), *(["--native"] if args.native else [])]
            log(f"profiling with {' '.join(command)}")
            spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # attached before the round starts
            _feed_round(rig_, server, names, rounds["profiled"], args.via, args.lines)
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            report = summarize_raw(raw, per_batch_ms=1000 * cpu / len(rounds["timed"]))
        elif not args.cpu_only:
            log("py-spy not found: CPU per batch only")
    rig_.delete(topics)
    n = len(rounds["timed"])
    return (
        f"{n} batches of {args.lines} lines via {args.via}: {1000 * cpu / n:.2f} CPU-ms per "
        f"batch ({cpu:.2f} CPU-s, {100 * kernel / max(cpu, 1e-9):.0f}% of it in the kernel, over "
        f"{wall:.1f} s wall, {n / wall:.0f} batches/s); load: "
        f"{load}\n\n{report}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=LINES, help="lines (serve: per batch, 5)")
    p.add_argument(
        "--contender",
        choices=("service", "batch-api", "send-loop", "confluent", "serve"),
        default="service",
        help="what to profile: the service (default), a Python baseline, for comparison, or "
        "serve: the fixed cost per batch of forwarder serve (--lines per batch)",
    )
    p.add_argument("--batches", type=int, default=500, help="serve: batches per round")
    p.add_argument("--via", choices=("jobs", "webhook"), default="jobs", help="serve: how fed")
    p.add_argument("--cpu-only", action="store_true", help="serve: CPU per batch, no profile")
    p.add_argument(
        "--env", action="append", default=[], help="serve: extra NAME=VALUE for the server"
    )
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--ref", default=None, help="profile forwarder/ as of this git commit")
    args = p.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="forwarder-profile-"))
    rig_ = Rig(args.partitions, scratch, args.ref)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.contender == "serve" and args.lines == LINES:
        args.lines = 5
    try:
        rig_.start()
        if args.contender == "serve":
            report = profile_serve(rig_, args, stamp)
            print(f"## Profile: serve, fixed cost per batch\n\n{report}")
            (OUT / f"profile-serve-{stamp}.md").write_text(report)
            return 0
        service = args.contender == "service"
        warm = Workload(2_000)
        names = rig_.names(args.contender)
        topics = rig_.create(names, service=service)
        rig_.configure(names["batch"], warm)
        commands, env = contender_command(rig_, args.contender, names)
        subprocess.run(commands[0], env=env, cwd=scratch, check=True, capture_output=True)
        rig_.verify(names, warm, service=service)
        rig_.delete(topics)
        work = Workload(args.lines)
        names = rig_.names(args.contender)
        topics = rig_.create(names, service=service)
        rig_.configure(names["batch"], work)
        commands, env = contender_command(rig_, args.contender, names)
        (target,) = commands
        pyspy = find_pyspy()
        if pyspy:
            raw = OUT / f"profile-{args.contender}-{stamp}.txt"
            command = [pyspy, "record", "-r", str(args.rate), "-f", "raw", "-o", str(raw)]
            if args.native:
                command.append("--native")
            log(f"profiling with {' '.join(command)} -- {' '.join(target)}")
            subprocess.run([*command, "--", *target], env=env, cwd=scratch, check=True)
            rig_.verify(names, work, service=service)
            report = summarize_raw(raw)
        else:
            log("py-spy not found (uv tool install py-spy); falling back to cProfile")
            stats = OUT / f"profile-{args.contender}-{stamp}.pstats"
            # cProfile runs a module (``-m x``) or a script (the ``forwarder`` console script).
            program = target[1:] if target[0] == PY else target
            subprocess.run(
                [PY, "-m", "cProfile", "-o", str(stats), *program], env=env, cwd=scratch, check=True
            )
            rig_.verify(names, work, service=service)
            import pstats

            with tempfile.TemporaryFile("w+") as out:
                pstats.Stats(str(stats), stream=out).sort_stats("tottime").print_stats(30)
                out.seek(0)
                report = out.read()
        rig_.delete(topics)
    finally:
        rig_.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"## Profile: {args.contender}, {args.lines:,} lines\n")
    print(report)
    report_path = OUT / f"profile-{args.contender}-{stamp}.md"
    report_path.write_text(report)
    log(f"report in {report_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
