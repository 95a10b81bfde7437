"""``python -m bench.hotpath``: CPU per million lines of the publisher's per-line path, offline.

Measures ``Publisher.publish`` (numbering, the routing head, headers, murmur2, the append to
aiokafka's record batches, the hand-over of full ones) on the bench's lines (``bench.data``:
300-byte lines, 50,000 distinct ``custom_id``s), split into the fake's 64 KiB chunks beforehand,
with a producer that acknowledges every batch at once (``tests.support.hotpath``): no broker, no
HTTP, no sender, so what differs between the variants is all that is timed:

* ``before``: the flat per-line loop of ``forwarder/publish.py`` as of ``--before`` (a git
  revision, default the tree this work started from), loaded from git;
* ``pure``: ``forwarder.hotpath`` from its source (what an editable install runs);
* ``compiled``: ``forwarder.hotpath`` compiled with mypyc as the wheel build does (built and
  cached under ``.cache/hotpath/`` when the package is not installed from a wheel).

``split`` is ``LineSplitter.feed`` on the same chunks, for scale (the same code for all).
Interleaved rounds (every variant once per round) after ``--warmup``; reported: median CPU
seconds of this process per million lines and the ratio to ``before``. Only CPU time of one
process, so background load matters less than for wall time, but on a shared machine the
numbers are indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from prometheus_client import CollectorRegistry

import forwarder.publish
from bench.data import CHUNK, Workload
from forwarder.ndjson import LineSplitter, Oversized
from forwarder.observability import Metrics
from forwarder.publish import Batch, Progress, PublishConfig
from tests.support.fake_datagrid import generate_lines
from tests.support.hotpath import REPO, RecordingProducer, compiled_hotpath, pure_hotpath

#: The tree before the compiled hot path (the flat loop in Publisher.publish).
BEFORE = "a900ef0"
BATCH_ID = "bpred_6f1d2c3b4a5e6f708192a3b4"
#: The service's producer batch size (FORWARDER_KAFKA_BATCH_BYTES' default).
BATCH_BYTES = 262_144

Chunks = list[list[bytes | Oversized]]


def chunks_of(lines: int) -> tuple[list[bytes], Chunks]:
    """The body in the fake's 64 KiB chunks, and the lines each chunk completes."""
    body = b"".join(line + b"\n" for line in generate_lines(BATCH_ID, Workload(lines).spec()))
    raw = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    splitter = LineSplitter(1 << 20)
    return raw, [splitter.feed(chunk) for chunk in raw]


def publish_before(revision: str) -> ModuleType:
    """``forwarder/publish.py`` as of ``revision``, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:forwarder/publish.py"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("bench_publish_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:forwarder/publish.py", "exec"), module.__dict__)  # noqa: S102 - our own file at a revision
    return module


async def publish_all(publish: ModuleType, chunks: Chunks, partitions: int) -> tuple[float, int]:
    """CPU seconds to publish every chunk and drain; the records the producer took."""
    config = PublishConfig(
        results_topic="results",
        dead_letter_topic="results.dlq",
        results_limit=1_000_000,
        dead_letter_limit=1_000_000,
        max_in_flight=64 << 20,
        linger=60.0,
        metrics=Metrics(CollectorRegistry(), process=False),
    )
    producer = RecordingProducer(batch_size=BATCH_BYTES, keep=False)
    batch = Batch(BATCH_ID, None, time="2026-12-07T14:50:10Z")
    publisher = publish.Publisher(config, producer, batch, Progress(), partitions)
    cpu = time.process_time()
    for lines in chunks:
        await publisher.publish(lines)
    await publisher.drain()
    elapsed = time.process_time() - cpu
    return elapsed, sum(publisher.progress.lines.values())


def variants(before: str) -> dict[str, Callable[[Chunks, int], float]]:
    """Each variant as a function of (chunks, partitions) giving CPU seconds."""
    old = publish_before(before)

    def with_publish(module: ModuleType) -> Callable[[Chunks, int], float]:
        def run(chunks: Chunks, partitions: int) -> float:
            cpu, records = asyncio.run(publish_all(module, chunks, partitions))
            expected = sum(len(lines) for lines in chunks)
            if records != expected:
                raise SystemExit(f"{records} records acknowledged, not {expected}")
            return cpu

        return run

    def with_hotpath(hotpath: ModuleType) -> Callable[[Chunks, int], float]:
        def run(chunks: Chunks, partitions: int) -> float:
            saved = forwarder.publish.hotpath
            forwarder.publish.hotpath = hotpath
            try:
                return with_publish(forwarder.publish)(chunks, partitions)
            finally:
                forwarder.publish.hotpath = saved

        return run

    return {
        "before": with_publish(old),
        "pure": with_hotpath(pure_hotpath()),
        "compiled": with_hotpath(compiled_hotpath()),
    }


def split_cpu(raw: list[bytes]) -> float:
    """CPU seconds to split the raw chunks into lines."""
    splitter = LineSplitter(1 << 20)
    cpu = time.process_time()
    for chunk in raw:
        splitter.feed(chunk)
    return time.process_time() - cpu


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=1_000_000, help="lines per run (default 1,000,000)")
    p.add_argument("--runs", type=int, default=5, help="measured rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--before", default=BEFORE, help=f"revision of the flat loop ({BEFORE})")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: does it still run?")
    args = p.parse_args(argv)
    if args.smoke:
        args.lines, args.runs, args.warmup = 2_000, 1, 0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds and print the table."""
    args = parse_args(argv)
    raw, chunks = chunks_of(args.lines)
    runs = variants(args.before)
    cpu: dict[str, list[float]] = {name: [] for name in (*runs, "split")}
    for round_ in range(args.warmup + args.runs):
        for name, run in runs.items():
            seconds = run(chunks, args.partitions)
            if round_ >= args.warmup:
                cpu[name].append(seconds)
        if round_ >= args.warmup:
            cpu["split"].append(split_cpu(raw))
    per_million = {name: statistics.median(s) * 1e6 / args.lines for name, s in cpu.items()}
    print(report(per_million, cpu, args))
    return 0


def report(per_million: dict[str, float], cpu: dict[str, list[float]], args: Any) -> str:
    """A Markdown table: CPU-s per million lines, the spread, and the ratio to ``before``."""
    rows = [
        f"{args.lines:,} lines, {args.partitions} partitions, median of {args.runs} rounds "
        f"(CPU seconds of this process per million lines; before = {args.before})",
        "",
        "| variant | CPU-s / 1M lines | min-max | vs before |",
        "|---|---:|---:|---:|",
    ]
    base = per_million["before"]
    for name, value in per_million.items():
        low, high = (min(cpu[name]) * 1e6 / args.lines, max(cpu[name]) * 1e6 / args.lines)
        rows.append(f"| {name} | {value:.3f} | {low:.3f}-{high:.3f} | {value / base:.2f}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
