"""``python -m bench.codecs``: what each ``FORWARDER_KAFKA_COMPRESSION_TYPE`` costs and saves.

For each codec (``none``, ``gzip``, ``snappy``, ``lz4``, ``zstd``), in interleaved rounds (every
codec once per round, so background load hits all alike), one ``forwarder forward`` of the same
generated batch into fresh topics of a private broker (``deploy/kafka/rig.py``), then:

- **bytes on the wire**: the size of the results topic's log segments on the broker's disk.  With
  the topic's default ``compression.type=producer`` the broker stores the producer's record
  batches as they arrived, so this is the produce requests' record bytes (and the disk and
  replication traffic they become);
- **CPU per million lines**: user + system of the ``forward`` process (``wait4``), and the
  broker's CPU over the run (it decompresses every batch to validate it);
- lines/s (wall, start-up included, as in ``python -m bench``).

The fake's lines pad with repeated "lorem ipsum" and compress far better than model output does,
so the same codecs also run offline (``--offline-lines``, no broker): aiokafka's own record batch
builder, 256 KiB batches as the forwarder sends them, on the fake's lines and on lines whose
text is drawn from a Zipf-distributed vocabulary of 20,000 random words (natural text's word
frequencies; about what zstd gets from English), with per-line ids and numbers.

Medians of ``--runs``.  It needs its own broker (the segment files are read from its data dir),
so ``FORWARDER_KAFKA_BOOTSTRAP_SERVERS`` is refused.  The results go to ``bench/RESULTS.md`` by
hand (section "Compression").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import string
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.data import Workload
from bench.harness import OUT, BenchFailure, forwarder_command, log, measure
from bench.machine import describe
from bench.testbed import Rig

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
#: aiokafka's codec numbers (the record batch attributes' bits 0-2).
CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
BATCH_BYTES = 262_144  # FORWARDER_KAFKA_BATCH_BYTES's default


def zipf_lines(count: int, seed: int = 7) -> list[bytes]:
    """Result lines shaped like the fake's, whose ``text`` is ~200 bytes of Zipf-distributed
    words (rank r drawn with weight 1/r) from a vocabulary of random lowercase words."""
    rng = random.Random(seed)
    vocabulary = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(20_000)
    ]
    weights = [1 / rank for rank in range(1, len(vocabulary) + 1)]
    lines = []
    for i in range(count):
        words = rng.choices(vocabulary, weights, k=32)
        text = " ".join(words)[:200]
        line = {
            "object": "batch_prediction.result",
            "batch_id": "bpred_offline",
            "custom_id": f"req-{rng.getrandbits(64):016x}",
            "status": "succeeded",
            "output": {"seq": i + 1, "score": round(rng.random(), 6), "text": text},
            "error": None,
        }
        lines.append(json.dumps(line, separators=(",", ":")).encode())
    return lines


def offline(codec: str, lines: list[bytes]) -> dict[str, Any]:
    """Build ``lines`` into 256 KiB record batches with ``codec`` (aiokafka's builder, the
    forwarder's four headers); bytes out and CPU seconds."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    headers = [
        ("datagrid-batch-id", b"bpred_offline"),
        ("content-type", b"application/json"),
        ("datagrid-status", b"succeeded"),
    ]
    out = 0
    started = time.process_time()
    builder = DefaultRecordBatchBuilder(2, CODEC_IDS[codec], 0, -1, -1, -1, BATCH_BYTES)
    offset = 0
    for n, line in enumerate(lines):
        record = [*headers, ("datagrid-line", str(n + 1).encode())]
        key = line[line.index(b'"custom_id":"') + 13 :].partition(b'"')[0]
        if builder.append(offset, None, key, line, record) is None:
            out += len(builder.build())
            builder = DefaultRecordBatchBuilder(2, CODEC_IDS[codec], 0, -1, -1, -1, BATCH_BYTES)
            offset = 0
            builder.append(offset, None, key, line, record)
        offset += 1
    out += len(builder.build())
    return {"codec": codec, "bytes": out, "cpu_s": time.process_time() - started}


def offline_table(count: int) -> str:
    """The offline table: bytes per line and CPU per million lines, both data sets."""
    from tests.support.fake_datagrid import generate_lines

    sets = {
        "fake (lorem ipsum)": list(
            generate_lines("bpred_offline", {"count": count, "line_bytes": 300})
        ),
        "Zipf words": zipf_lines(count),
    }
    out = [
        f"{count:,} lines per data set, aiokafka's batch builder, "
        f"{BATCH_BYTES // 1024} KiB batches:",
        "",
        "| data | line bytes | codec | bytes per line | vs none | CPU-s per M lines |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, lines in sets.items():
        mean = sum(map(len, lines)) / len(lines)
        results = [offline(codec, lines) for codec in CODECS]
        base = results[0]["bytes"]
        for r in results:
            out.append(
                f"| {name} | {mean:.0f} | `{r['codec']}` | {r['bytes'] / count:.1f} "
                f"| {base / r['bytes']:.1f}x | {r['cpu_s'] / count * 1e6:.2f} |"
            )
    return "\n".join(out)


def segment_bytes(log_dirs: Path, topic: str) -> int:
    """Bytes of every log segment (``*.log``) of every partition of ``topic`` on the broker."""
    return sum(f.stat().st_size for f in log_dirs.glob(f"{topic}-*/*.log"))


def run_codec(rig_: Rig, codec: str, work: Workload) -> dict[str, Any]:
    """One ``forwarder forward`` with ``codec``; its bytes on disk, CPU and wall time."""
    assert rig_.broker is not None
    names = rig_.names(f"codec-{codec}")
    topics = rig_.create(names, service=True)
    rig_.configure(names["batch"], work)
    env = rig_.service_env(names, FORWARDER_KAFKA_COMPRESSION_TYPE=codec)
    _fake0, broker0 = rig_.helpers_cpu()
    done = measure([[*forwarder_command(), "forward", names["batch"]]], env, rig_.scratch)
    _fake1, broker1 = rig_.helpers_cpu()
    if done.code != 0:
        raise BenchFailure(f"{codec}: forward exited {done.code}\n{done.stderr[-3000:]}")
    body = rig_.verify(names, work, service=True)
    on_disk = segment_bytes(rig_.broker.log_dirs, names["results"])
    rig_.delete(topics)
    return {
        "codec": codec,
        "lines": work.lines,
        "body_bytes": body,
        "segment_bytes": on_disk,
        "wall_s": done.wall_s,
        "cpu_s": done.cpu_s,
        "broker_cpu_s": None if broker0 is None or broker1 is None else broker1 - broker0,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per codec: medians over the runs, per million lines, and the ratio to ``none``."""
    rows = []
    for codec in CODECS:
        mine = [r for r in runs if r["codec"] == codec]
        if not mine:
            continue
        lines = mine[0]["lines"]
        brokers = [r["broker_cpu_s"] for r in mine if r["broker_cpu_s"] is not None]
        rows.append(
            {
                "codec": codec,
                "runs": len(mine),
                "segment_bytes_per_line": statistics.median(r["segment_bytes"] for r in mine)
                / lines,
                "body_bytes_per_line": mine[0]["body_bytes"] / lines,
                "cpu_s_per_m": statistics.median(r["cpu_s"] for r in mine) / lines * 1e6,
                "broker_cpu_s_per_m": statistics.median(brokers) / lines * 1e6 if brokers else None,
                "lines_per_s": statistics.median(lines / r["wall_s"] for r in mine),
            }
        )
    base = next((r for r in rows if r["codec"] == "none"), None)
    for row in rows:
        row["wire_ratio"] = (
            base["segment_bytes_per_line"] / row["segment_bytes_per_line"] if base else None
        )
    return rows


def markdown(rows: list[dict[str, Any]], lines: int) -> str:
    """The table for ``bench/RESULTS.md``."""
    out = [
        f"{lines:,} lines of {rows[0]['body_bytes_per_line']:.0f} bytes, median of "
        f"{rows[0]['runs']} run(s):",
        "",
        "| codec | bytes on the wire per line | vs none | forward CPU-s per M lines "
        "| broker CPU-s per M lines | lines/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        broker = "" if r["broker_cpu_s_per_m"] is None else f"{r['broker_cpu_s_per_m']:.1f}"
        ratio = "" if r["wire_ratio"] is None else f"{r['wire_ratio']:.1f}x"
        out.append(
            f"| `{r['codec']}` | {r['segment_bytes_per_line']:.1f} | {ratio} "
            f"| {r['cpu_s_per_m']:.1f} | {broker} | {r['lines_per_s']:,.0f} |"
        )
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.codecs", description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--lines", type=int, default=1_000_000, help="lines of the batch")
    add("--runs", type=int, default=3, help="measured runs per codec (median)")
    add("--warmup", type=int, default=1, help="warm-up rounds (not counted)")
    add("--codecs", default=",".join(CODECS), help="subset, comma-separated")
    add("--partitions", type=int, default=6)
    add("--offline-lines", type=int, default=200_000, help="offline part: lines per data set")
    add("--offline-only", action="store_true", help="only the offline part (no broker)")
    add("--smoke", action="store_true", help="tiny sizes: does it still run?")
    add("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.smoke:
        args.lines, args.runs, args.warmup, args.offline_lines = 3_000, 1, 0, 3_000
    args.codecs = [c for c in args.codecs.split(",") if c]
    if set(args.codecs) - set(CODECS):
        p.error(f"codecs are among {','.join(CODECS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds, print the table, write the raw JSON."""
    args = parse_args(argv)
    table = offline_table(args.offline_lines)
    print(table, end="\n\n", flush=True)
    if args.offline_only:
        return 0
    if os.environ.get("FORWARDER_KAFKA_BOOTSTRAP_SERVERS"):
        log(
            "bench.codecs reads the broker's segment files: unset FORWARDER_KAFKA_BOOTSTRAP_SERVERS"
        )
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="bench-codecs-"))
    rig_ = Rig(args.partitions, scratch)
    work = Workload(args.lines)
    runs: list[dict[str, Any]] = []
    try:
        rig_.start()
        machine = describe()
        for round_no in range(args.warmup + args.runs):
            for codec in args.codecs:
                run = run_codec(rig_, codec, work)
                log(
                    f"round {round_no + 1} {codec}: {run['segment_bytes']:,} bytes on disk, "
                    f"CPU {run['cpu_s']:.2f} s, wall {run['wall_s']:.2f} s"
                )
                if round_no >= args.warmup:
                    runs.append(run)
    except BenchFailure as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        rig_.stop()
    rows = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    raw = args.out / f"codecs-{stamp}.json"
    raw.write_text(json.dumps({"machine": machine, "runs": runs, "rows": rows}, indent=1))
    print(markdown(rows, args.lines))
    log(f"raw numbers: {raw}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
