"""``python -m bench.headers``: what the CloudEvents headers cost, in bytes and in lines/s.

Every results record carries the ``ce_*`` headers of the CloudEvents Kafka binding (binary mode)
besides the ``datagrid-*`` ones (docs/consumers.md, "CloudEvents"). This measures the cost on the
same data and the same broker, both ways:

* ``with``: the headers the service writes, taken from a real ``forwarder.publish.Publisher``
  (its fixed result headers, then per line ``datagrid-status``, ``datagrid-line`` and ``ce_id``,
  as ``Publisher.publish`` builds them);
* ``without``: the same list less every ``ce_*`` header.

The service cannot leave them out, so neither mode runs the service: each run builds the records
with aiokafka's ``BatchBuilder`` directly, with the append call ``Publisher.publish`` makes, one
open builder per partition handed to ``send_batch`` when full, and times the encode and send of
``--lines`` lines until the broker has acknowledged every batch (producer started, topic metadata
fetched and the lines generated beforehand). The lines are the bench's (``bench.data``: 300-byte
lines, 50,000 distinct ``custom_id``s), their keys, statuses and partitions worked out before the
clock starts: what differs between the modes is all inside the timed loop, and the service's other
per-line work (the HTTP stream, JSON classification, partitioning) is not, so the lines/s
difference is an upper bound on what the headers cost the service.

Runs alternate (with, without, with, ...) after one warm-up of each, on a fresh 6-partition topic
each; every run's high watermarks must equal the records the data puts on each partition. Reported:
median lines/s, median CPU seconds of this process (the encoder and aiokafka's sender both run
here) and of the broker (when it is ours), and bytes per record from the built batches (key,
value, headers and batch framing, uncompressed). Markdown on stdout, raw numbers in
``bench/out/headers-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from bench._common import PRODUCER_OPTIONS
from bench.data import Workload
from bench.harness import OUT, BenchFailure, log
from bench.machine import LoadWindow, describe
from bench.testbed import Rig
from forwarder.kafka import partition_for
from forwarder.observability import Metrics
from forwarder.publish import Batch, Progress, PublishConfig, Publisher
from tests.support.fake_datagrid import generate_lines

MODES = ("with", "without")
#: The issue's bar: headers costing more than this share of lines/s should become optional.
THRESHOLD = 0.05
#: A production-like batch id and ``ce_source`` (their lengths are part of the bytes).
BATCH_ID = "bpred_6f1d2c3b4a5e6f708192a3b4"
SOURCE_BASE = "https://api.datagrid.com/v1/batch-predictions/"
BATCH_TIME = "2026-12-07T14:50:10Z"


@dataclass
class Run:
    """One timed run of one mode."""

    mode: str
    lines: int
    warmup: bool
    wall_s: float
    cpu_s: float
    broker_cpu_s: float | None
    batch_bytes: int
    load: dict[str, Any]

    @property
    def lines_per_s(self) -> float:
        """Lines encoded, sent and acknowledged per second of wall time."""
        return self.lines / self.wall_s

    @property
    def bytes_per_record(self) -> float:
        """Built record-batch bytes per record, framing included."""
        return self.batch_bytes / self.lines


class Status(msgspec.Struct):
    """The two fields the per-line headers need."""

    custom_id: str
    status: str | None = None


@dataclass(frozen=True)
class Data:
    """The lines and what the publisher would work out for each before it appends it."""

    values: list[bytes]
    keys: list[bytes]
    statuses: list[bytes]
    partitions: list[int]


def prepare(work: Workload, partitions: int) -> Data:
    """The bench's lines for ``work``, with their keys, statuses and partitions."""
    decode = msgspec.json.Decoder(Status).decode
    values = list(generate_lines(BATCH_ID, work.spec()))
    heads = [decode(v) for v in values]
    keys = [h.custom_id.encode() for h in heads]
    return Data(
        values,
        keys,
        [(h.status or "").encode() for h in heads],
        [partition_for(k, partitions) for k in keys],
    )


def service_headers(topic: str, partitions: int) -> tuple[list[tuple[str, bytes]], bytes]:
    """The service's fixed result headers and ``ce_id`` prefix, from a real Publisher."""
    config = PublishConfig(
        results_topic=topic,
        dead_letter_topic=f"{topic}.dlq",
        results_limit=1_000_000,
        dead_letter_limit=1_000_000,
        max_in_flight=64 << 20,
        linger=0.005,
        metrics=Metrics(CollectorRegistry(), process=False),
        source_base=SOURCE_BASE,
    )
    batch = Batch(BATCH_ID, None, time=BATCH_TIME)
    # The producer is not used by the constructor: the headers are all this takes from it.
    publisher = Publisher(config, None, batch, Progress(), partitions)
    return list(publisher.result_headers), publisher.ce_id


def fixed_by_status(
    fixed: list[tuple[str, bytes]], statuses: Sequence[bytes], mode: str
) -> dict[bytes, tuple[tuple[str, bytes], ...]]:
    """Per ``datagrid-status``: the fixed headers (as ``Publisher._heads_for``), less ``ce_*``
    in ``without`` mode."""
    keep = [(k, v) for k, v in fixed if mode == "with" or not k.startswith("ce_")]
    return {s: (*keep, ("datagrid-status", s)) for s in set(statuses)}


async def send_all(
    bootstrap: str, topic: str, data: Data, partitions: int, mode: str, fixed: list[Any], ce: bytes
) -> tuple[float, float, int]:
    """Encode and send every line; (wall s, CPU s, built batch bytes) from first append to the
    last acknowledgement."""
    heads = fixed_by_status(fixed, data.statuses, mode)
    with_ce = mode == "with"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_OPTIONS)
    await producer.start()
    try:
        await producer.partitions_for(topic)  # metadata now, not in the timed loop
        futures: list[asyncio.Future[Any]] = []
        size = 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        builders = [producer.create_batch() for _ in range(partitions)]
        rows = zip(data.values, data.keys, data.statuses, data.partitions, strict=True)
        for n, (value, key, status, p) in enumerate(rows, start=1):
            # As Publisher.publish: a list (aiokafka's C encoder takes no tuple).
            if with_ce:
                headers = [
                    *heads[status],
                    ("datagrid-line", b"%d" % n),
                    ("ce_id", b"%s%d" % (ce, n)),
                ]
            else:
                headers = [*heads[status], ("datagrid-line", b"%d" % n)]
            builder = builders[p]
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                size += builder.size()
                futures.append(await producer.send_batch(builder, topic, partition=p))
                builder = builders[p] = producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise BenchFailure(f"line {n} does not fit an empty record batch")
            if len(futures) > 64:  # let go of acknowledged batches (a failed one stays)
                await futures[0]
                futures = [f for f in futures if not f.done() or f.exception()]
        for p, builder in enumerate(builders):
            if builder.record_count():
                size += builder.size()
                futures.append(await producer.send_batch(builder, topic, partition=p))
        await asyncio.gather(*futures)
        return time.perf_counter() - wall0, time.process_time() - cpu0, size
    finally:
        await producer.stop()


async def first_record_headers(bootstrap: str, topic: str) -> list[str]:
    """The header names of the first record on partition 0 of ``topic``, as written."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        record = await asyncio.wait_for(consumer.getone(), 30)
        return [name for name, _ in record.headers]
    finally:
        await consumer.stop()


def one_run(rig: Rig, work: Workload, data: Data, mode: str, *, warmup: bool) -> Run:
    """One run of ``mode`` on fresh topics, its records verified."""
    names = rig.names(f"headers-{mode}")
    topics = rig.create(names, service=False)
    try:
        fixed, ce = service_headers(names["results"], rig.partitions)
        window = LoadWindow()
        broker0 = rig.helpers_cpu()[1]
        wall, cpu, size = asyncio.run(
            send_all(rig.bootstrap, names["results"], data, rig.partitions, mode, fixed, ce)
        )
        broker1 = rig.helpers_cpu()[1]
        broker = broker1 - broker0 if broker0 is not None and broker1 is not None else None
        load = window.close(broker or 0.0, rig.our_pids())
        rig.verify_topic(names, rig.expected(work), service=False)
        # The records hold what the mode says: the service's header names, or those less ce_*.
        got = asyncio.run(first_record_headers(rig.bootstrap, names["results"]))
        want = [name for name, _ in fixed if mode == "with" or not name.startswith("ce_")]
        want += ["datagrid-status", "datagrid-line"] + (["ce_id"] if mode == "with" else [])
        if got != want:
            raise BenchFailure(f"{mode}: a record's headers are {got}, expected {want}")
    finally:
        rig.delete(topics)
    run = Run(mode, work.lines, warmup, wall, cpu, broker, size, load)
    log(
        f"{'warm-up ' if warmup else ''}{mode}: {run.lines_per_s:,.0f} lines/s, {cpu:.2f} CPU-s, "
        f"{run.bytes_per_record:.1f} bytes/record, others' cores {load['others_cores']}"
    )
    return run


def summarize(runs: list[Run]) -> dict[str, dict[str, float | None]]:
    """Medians of the measured runs, per mode."""
    out: dict[str, dict[str, float | None]] = {}
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode and not r.warmup]
        brokers = [r.broker_cpu_s for r in mine if r.broker_cpu_s is not None]
        out[mode] = {
            "runs": len(mine),
            "lines_per_s": statistics.median(r.lines_per_s for r in mine),
            "min_lines_per_s": min(r.lines_per_s for r in mine),
            "max_lines_per_s": max(r.lines_per_s for r in mine),
            "cpu_s": statistics.median(r.cpu_s for r in mine),
            "broker_cpu_s": statistics.median(brokers) if brokers else None,
            "bytes_per_record": statistics.median(r.bytes_per_record for r in mine),
            "others_cores": statistics.median(r.load["others_cores"] for r in mine),
        }
    return out


def report(summary: dict[str, dict[str, float | None]], lines: int) -> str:
    """The Markdown table and the verdict against the 5% bar."""
    w, wo = summary["with"], summary["without"]

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    rows = [
        f"| headers | lines/s (median) | min-max | CPU s ({lines:,} lines) | broker CPU s | "
        "bytes/record | others' cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, s in summary.items():
        label = "`datagrid-*` and `ce_*` (the service)" if mode == "with" else "`datagrid-*` only"
        rows.append(
            f"| {label} | {num(s['lines_per_s'], ',.0f')} | {num(s['min_lines_per_s'], ',.0f')}-"
            f"{num(s['max_lines_per_s'], ',.0f')} | {num(s['cpu_s'], '.2f')} | "
            f"{num(s['broker_cpu_s'], '.2f')} | {num(s['bytes_per_record'], '.1f')} | "
            f"{num(s['others_cores'], '.2f')} |"
        )
    assert w["lines_per_s"] and wo["lines_per_s"] and w["cpu_s"] is not None
    assert wo["cpu_s"] is not None and w["bytes_per_record"] and wo["bytes_per_record"]
    slower = 1 - w["lines_per_s"] / wo["lines_per_s"]
    extra_bytes = w["bytes_per_record"] - wo["bytes_per_record"]
    extra_cpu_us = (w["cpu_s"] - wo["cpu_s"]) / lines * 1e6
    verdict = "exceeds" if slower > THRESHOLD else "does not exceed"
    rows += [
        "",
        f"Extra per record: **{extra_bytes:.1f} bytes** "
        f"({extra_bytes / wo['bytes_per_record']:.1%} of a record without them) and "
        f"**{extra_cpu_us:.2f} CPU-µs**. Lines/s with the headers: **{-slower:+.1%}**, which "
        f"{verdict} the 5% bar.",
    ]
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.headers", description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=500_000, help="lines per run (default 500,000)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per mode (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per mode (default 1)")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--out", type=Path, default=OUT, help="where the JSON goes (bench/out)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: does it still run?")
    args = p.parse_args(argv)
    if args.smoke:
        args.lines, args.runs, args.warmup = 2_000, 1, 0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run both modes, print the table, write the JSON."""
    args = parse_args(argv)
    work = Workload(args.lines)
    log(f"generating {args.lines:,} lines")
    data = prepare(work, args.partitions)
    with tempfile.TemporaryDirectory(prefix="bench-headers-") as scratch:
        rig = Rig(args.partitions, Path(scratch))
        rig.start()
        try:
            runs = [
                one_run(rig, work, data, mode, warmup=i < args.warmup)
                for i in range(args.warmup + args.runs)
                for mode in MODES
            ]
        finally:
            rig.stop()
    summary = summarize(runs)
    print(report(summary, args.lines))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"headers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "machine": describe(),
                "lines": args.lines,
                "partitions": args.partitions,
                "summary": summary,
                "runs": [asdict(r) for r in runs],
            },
            indent=2,
        )
    )
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
