"""Profile one contender on a big batch and say where its CPU time goes.

    python -m bench.profile [--lines 1000000] [--contender service|batch-api|send-loop] [--native]

Uses ``py-spy record`` (PyPI; ``uv tool install py-spy``, found on PATH or in ~/.local/bin) in raw
(collapsed-stack) mode, idle samples excluded, so the percentages are of on-CPU samples; falls back
to cProfile when py-spy is missing.  One unprofiled 2,000-line run first writes the ``.pyc`` files,
as the suite's warm-up does.  Prints CPU by stage of the path (inclusive: murmur2, record append,
sender, ...), by area (innermost known frame: ours, aiokafka's produce path, asyncio, httpx, ...),
and the hottest functions by self and inclusive time; keeps the raw profile (collapsed stacks:
speedscope or flamegraph.pl read it) and the report in ``bench/out/``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data import Workload
from bench.harness import OUT, PY, log
from bench.oneshot import contender_command
from bench.testbed import Rig

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


def summarize_raw(path: Path, top: int = 25) -> str:
    """Stage, area, self and inclusive tables of a py-spy raw (collapsed) profile."""
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
        stages[stage_of(frames)] += count
    if not total:
        return "no samples\n"

    def table(title: str, counter: collections.Counter[str], n: int, what: str = "function") -> str:
        rows = [f"### {title}\n", f"| % of CPU samples | {what} |", "|--:|---|"]
        for name, count in counter.most_common(n):
            rows.append(f"| {100 * count / total:5.1f} | `{name}` |")
        return "\n".join(rows) + "\n"

    return (
        f"{total} on-CPU samples\n\n"
        + table("By stage (inclusive, first match)", stages, len(STAGES), "stage")
        + "\n"
        + table("By area (innermost known frame)", areas, len(AREAS) + 1, "area")
        + "\n"
        + table("Self time (leaf frame)", self_time, top)
        + "\n"
        + table("Inclusive time", inclusive, top)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument(
        "--contender",
        choices=("service", "batch-api", "send-loop", "confluent"),
        default="service",
        help="what to profile: the service (default) or a Python baseline, for comparison",
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
    try:
        rig_.start()
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
