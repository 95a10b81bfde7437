"""``python -m bench``: the service against its baselines, side by side, on a real broker.

1. ``bench.testbed`` starts a private Kafka broker (or reuses ``FORWARDER_KAFKA_BOOTSTRAP_SERVERS``)
   and the fake Datagrid; ``bench.data`` says what it serves and which records must result;
2. the one-shot contenders (``bench.oneshot``: the service's ``forward``, confluent-kafka, the
   aiokafka batch API and send loop, ``curl | mawk | kcat`` and ``curl | jq | kcat``) and the
   one-pod ``serve`` runs (``bench.serve``: a few batches through the API, many small ones through
   the jobs topic) run in interleaved rounds, a warm-up round first, each on fresh topics and
   verified record count by record count (``bench.harness`` measures them);
3. start-up: a 10-line batch, N interleaved runs of the service and two plain scripts;
4. latency (``bench.latency``): signed webhooks at steady rates into one pod, 202 to last ack;
5. ``bench.report`` prints Markdown tables with each figure against issue 23's target and the
   load during each run (``bench.machine``), ``bench.plots`` writes PNGs, and the raw numbers go
   to ``bench/out/results-*.json``.  Any failed check stops the suite with exit 1.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench import latency, plots, report
from bench.data import Workload
from bench.harness import OUT, REPO, BenchFailure, Run, log
from bench.machine import describe
from bench.oneshot import ONESHOT, run_oneshot
from bench.serve import run_serve
from bench.testbed import Rig

ALL = (*ONESHOT, "serve", "small-batches", "startup", "latency")
DEFAULT = tuple(c for c in ALL if c != "send-loop")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``--quick`` and ``--smoke`` shrink the sizes."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the forwarder against baselines on a real broker.",
        epilog="Reuses FORWARDER_KAFKA_BOOTSTRAP_SERVERS if set, else starts a private broker.",
    )
    add = p.add_argument
    add("--quick", action="store_true", help="200k lines, 1 run, no warm-up, short latency runs")
    add("--smoke", action="store_true", help="tiny sizes: checks that everything runs (seconds)")
    add("--lines", type=int, default=1_000_000, help="lines of the big batch")
    add("--runs", type=int, default=3, help="measured runs per contender (median)")
    add("--warmup", type=int, default=1, help="warm-up runs per contender")
    add("--only", default=",".join(DEFAULT), help=f"subset of {','.join(ALL)}")
    add("--partitions", type=int, default=6, help="partitions of every topic (service default)")
    add("--distinct-ids", type=int, default=50_000)
    add("--serve-batches", type=int, default=8, help="serve: batches queued with POST /v1/batches")
    add("--serve-lines", type=int, default=5_000)
    add("--serve-concurrency", type=int, default=None, help="FORWARDER_CONCURRENCY for serve runs")
    add("--small-batches", type=int, default=1_000, help="small-batches: jobs written at once")
    add("--small-lines", type=int, default=1_000, help="small-batches: lines per batch")
    add("--startup-runs", type=int, default=9, help="start-up: runs per contender (median)")
    add("--startup-lines", type=int, default=10)
    add("--startup-warmup", type=int, default=1, help="start-up: warm-up rounds")
    add("--latency-rates", default="10,20,30,40", help="latency: webhooks (batches) per second")
    add("--latency-seconds", type=float, default=10, help="latency: how long each rate is fed")
    add("--latency-lines", type=int, default=5_000, help="latency: lines per batch")
    add("--latency-drain", type=float, default=120, help="latency: seconds to finish after feeding")
    add("--latency-stop", type=float, default=10, help="latency: skip higher rates past this p99")
    add("--memory-lines", type=int, default=5_000, help="service on a small batch (0: skip)")
    add("--out", type=Path, default=OUT, help="where the JSON (and by default the plots) go")
    add("--plots", type=Path, default=None, help="where the PNG plots go (default: --out)")
    add("--env", action="append", default=[], metavar="NAME=VALUE", help="extra service env")
    add("--ref", default=None, help="benchmark forwarder/ as of this git commit")
    add("--pure", action="store_true", help="the pure-Python hot path, not the compiled one")
    args = p.parse_args(argv)
    if args.quick:
        args.lines, args.runs, args.warmup = min(args.lines, 200_000), 1, 0
        args.small_batches, args.startup_runs, args.latency_seconds = 200, 3, 4
    if args.smoke:
        args.lines, args.runs, args.warmup, args.memory_lines = 3_000, 1, 0, 0
        args.serve_batches, args.serve_lines = 2, 500
        args.small_batches, args.small_lines, args.startup_runs, args.startup_warmup = 10, 100, 1, 0
        args.latency_rates, args.latency_seconds, args.latency_lines = "4", 1.0, 200
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(args.only) - set(ALL)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}; choose from {ALL}")
    args.rates = [float(x) for x in args.latency_rates.split(",") if x.strip()]
    args.plots = args.plots or args.out
    return args


def schedule_for(args: argparse.Namespace, rig_: Rig) -> list[tuple[str, Callable[[bool], Run]]]:
    """The interleaved throughput contenders, in order."""
    big = Workload(args.lines, distinct_ids=args.distinct_ids)
    out: list[tuple[str, Callable[[bool], Run]]] = []
    for contender in args.only:
        if contender in ONESHOT:
            out.append((contender, partial(run_oneshot, rig_, contender, big)))
        elif contender == "serve":
            work = Workload(args.serve_lines, distinct_ids=args.distinct_ids)
            run = partial(
                run_serve, rig_, args.serve_batches, work, concurrency=args.serve_concurrency
            )
            out.append((contender, run))
        elif contender == "small-batches":
            work = Workload(args.small_lines, distinct_ids=args.distinct_ids)
            run = partial(
                run_serve,
                rig_,
                args.small_batches,
                work,
                via="jobs",
                concurrency=args.serve_concurrency,
            )
            out.append((contender, run))
    if args.memory_lines and "service" in args.only:
        small = Workload(args.memory_lines, distinct_ids=args.distinct_ids)
        out.append(
            ("service-mem", partial(run_oneshot, rig_, "service", small, label="service-mem"))
        )
    return out


def _say(round_no: int, total: int, warm: bool, run: Run) -> None:
    log(
        f"round {round_no}/{total}{' (warm-up)' if warm else ''} {run.contender}: "
        f"{run.lines:,} lines in {run.wall_s:.2f} s = {run.lines_per_s:,.0f} lines/s, "
        f"CPU {run.cpu_s:.2f} s, peak RSS {run.rss_kb / 1024:.0f} MB, "
        f"others' cores {run.load.get('others_cores')} {run.load.get('others_top')}"
    )


def measure_all(args: argparse.Namespace, rig_: Rig) -> tuple[list[Run], list[dict[str, Any]]]:
    """Run every selected part; return the runs and the latency points."""
    runs: list[Run] = []
    schedule = schedule_for(args, rig_)
    total = args.warmup + args.runs
    for round_no in range(total):
        warm = round_no < args.warmup
        for _name, fn in schedule:
            run = fn(warm)
            runs.append(run)
            _say(round_no + 1, total, warm, run)
    if "startup" in args.only:
        tiny = Workload(args.startup_lines, distinct_ids=args.distinct_ids)
        rounds = args.startup_warmup + args.startup_runs  # warm-up: .pyc files written
        for round_no in range(rounds):
            warm = round_no < args.startup_warmup
            for contender in ("service", "confluent", "batch-api"):
                run = run_oneshot(rig_, contender, tiny, warm, f"startup-{contender}")
                runs.append(run)
                _say(round_no + 1, rounds, warm, run)
    points: list[dict[str, Any]] = []
    if "latency" in args.only:
        work = Workload(args.latency_lines, distinct_ids=args.distinct_ids)
        for rate in args.rates:
            log(f"latency: {rate:g} batches/s of {work.lines:,} lines for {args.latency_seconds} s")
            point = latency.run_rate(rig_, rate, args.latency_seconds, work, args.latency_drain)
            points.append(point)
            if not point["drained"] or point["p99_s"] > args.latency_stop:
                log(
                    f"latency: p99 above {args.latency_stop:g} s at {rate:g}/s; "
                    "higher rates skipped"
                )
                break
            log(
                f"latency {rate:g}/s: p50 {point['p50_s']:.3f} s, p99 {point['p99_s']:.3f} s, "
                f"max {point['max_s']:.3f} s; forward_delay metric {point['forward_delay']}; "
                f"load {point['load']}"
            )
    return runs, points


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; print the report; 1 if any check failed."""
    args = parse_args(argv)
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so the broker and the fake are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="forwarder-bench-"))
    rig_ = Rig(args.partitions, scratch, args.ref, pure=args.pure)
    rig_.extra_env = dict(item.split("=", 1) for item in args.env)
    started = time.monotonic()
    info = describe()
    info["hotpath"] = rig_.hotpath
    if args.ref:
        info["forwarder_ref"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.ref],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    try:
        rig_.start()
        runs, points = measure_all(args, rig_)
    except BenchFailure as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        rig_.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - started
    rows = report.summarize([r for r in runs if not r.contender.startswith("startup-")])
    where = info.get("forwarder_ref") or "the work tree " + info["revision"]
    where += f", hot path {rig_.hotpath}"
    print(
        f"\n## Results: forwarder/ from {where}; {args.lines:,}-line batch, median of {args.runs} "
        f"after {args.warmup} warm-up; {args.partitions} partitions; took {elapsed:.0f} s\n"
    )
    print(report.render(rows))
    for section in (
        report.render_ratios(rows, args.lines),
        report.render_small(rows, runs, args.lines),
        report.render_startup(runs),
        report.render_latency(points),
    ):
        if section:
            print(section)
    if points:
        print(f"p99 crosses 1 s: {latency.crossing(points)}.\n")
    loads = [float(r.load.get("load1_end", 0)) for r in runs] or [0.0]
    others = [float(r.load.get("others_cores", 0)) for r in runs] or [0.0]
    print(
        f"Machine: {info['cores']} cores, {info['cpu_model']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}; 1-minute load after runs: "
        f"median {statistics.median(loads):.1f}, max {max(loads):.1f}; cores kept busy by other "
        f"processes during runs: median {statistics.median(others):.2f}, max {max(others):.2f}."
    )
    path = report.write_json(
        args.out,
        {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": info,
            "elapsed_s": elapsed,
            "latency": points,
        },
        runs,
        rows,
    )
    log(f"raw numbers in {path}")
    args.plots.mkdir(parents=True, exist_ok=True)
    title = f"forwarder/ {where}; {info['cores']} cores, shared; {time.strftime('%Y-%m-%d %H:%M')}"
    if any(r.lines == args.lines for r in rows):
        log(f"plot: {plots.throughput(rows, args.lines, args.plots / 'throughput.png', title)}")
    if points:
        log(f"plot: {plots.latency(points, args.plots / 'latency.png', title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
