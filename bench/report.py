"""Reporting: medians per contender, the ratios and targets of issue 23, load, and the raw JSON.

Everything printed is Markdown, so a run's output can be pasted into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.harness import Run

LABELS = {
    "service": "service: `forwarder forward` (1 batch)",
    "confluent": "baseline: confluent-kafka (librdkafka)",
    "batch-api": "baseline: aiokafka batch API + murmur2",
    "send-loop": "baseline: aiokafka `send()` loop",
    "kcat": "baseline: `curl | mawk | kcat -P`",
    "kcat-jq": "baseline: `curl | jq | kcat -P`",
    "serve": "service: `forwarder serve`, `POST /v1/batches`",
    "small-batches": "service: `forwarder serve`, jobs topic, small batches",
    "service-mem": "service: `forwarder forward` (small batch)",
}

#: Issue 23's lines/s targets: service / baseline must be at least this.
TARGETS = {"confluent": 1.1, "batch-api": 1.5, "kcat": 2.5, "kcat-jq": 2.5}


@dataclass
class Row:
    """Medians (and the best throughput) of one contender's measured runs."""

    contender: str
    lines: int
    runs: int
    wall_s: float
    lines_per_s: float
    best_lines_per_s: float
    worst_lines_per_s: float
    mb_per_s: float
    cpu_per_m: float
    rss_mb: float
    fake_cpu_per_m: float
    broker_cpu_per_m: float | None
    others_cores: float
    others_cores_max: float
    load1: float


def summarize(runs: list[Run]) -> list[Row]:
    """One row per (contender, lines) of the measured (not warm-up) runs."""
    rows = []
    keys: list[tuple[str, int]] = []
    for r in runs:
        if not r.warmup and (r.contender, r.lines) not in keys:
            keys.append((r.contender, r.lines))
    for contender, lines in keys:
        mine = [r for r in runs if r.contender == contender and r.lines == lines and not r.warmup]
        broker = [r.broker_cpu_s / r.lines * 1e6 for r in mine if r.broker_cpu_s is not None]
        others = [float(r.load.get("others_cores", 0.0)) for r in mine]
        rows.append(
            Row(
                contender,
                lines,
                len(mine),
                statistics.median(r.wall_s for r in mine),
                statistics.median(r.lines_per_s for r in mine),
                max(r.lines_per_s for r in mine),
                min(r.lines_per_s for r in mine),
                statistics.median(r.mb_per_s for r in mine),
                statistics.median(r.cpu_per_m for r in mine),
                statistics.median(r.rss_kb for r in mine) / 1024,
                statistics.median(r.fake_cpu_s / r.lines * 1e6 for r in mine),
                statistics.median(broker) if broker else None,
                statistics.median(others),
                max(others),
                statistics.median(float(r.load.get("load1_end", 0.0)) for r in mine),
            )
        )
    return rows


def render(rows: list[Row]) -> str:
    """The main table: one row per contender."""
    head = (
        "| contender | lines | runs | wall s | lines/s | min-max lines/s | MB/s | CPU s / M lines "
        "| peak RSS MB | fake CPU s/M | broker CPU s/M | others' cores (median, max) | load1 |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    body = "".join(
        f"| {LABELS.get(r.contender, r.contender)} | {r.lines:,} | {r.runs} | {r.wall_s:.2f} "
        f"| {r.lines_per_s:,.0f} | {r.worst_lines_per_s:,.0f}-{r.best_lines_per_s:,.0f} "
        f"| {r.mb_per_s:.1f} | {r.cpu_per_m:.2f} | {r.rss_mb:.0f} | {r.fake_cpu_per_m:.2f} | "
        + ("-" if r.broker_cpu_per_m is None else f"{r.broker_cpu_per_m:.2f}")
        + f" | {r.others_cores:.2f}, {r.others_cores_max:.2f} | {r.load1:.1f} |\n"
        for r in rows
    )
    return head + body


def render_ratios(rows: list[Row], lines: int) -> str:
    """service / each baseline on the big batch, against issue 23's targets."""
    by = {r.contender: r for r in rows if r.lines == lines}
    if "service" not in by:
        return ""
    s = by["service"]
    out = []
    for base in ("confluent", "batch-api", "send-loop", "kcat", "kcat-jq"):
        if base not in by:
            continue
        b = by[base]
        ratio = s.lines_per_s / b.lines_per_s
        target = TARGETS.get(base)
        verdict = "-" if target is None else ("yes" if ratio >= target else "**no**")
        out.append(
            f"| service / {base} | {ratio:.2f} | {s.best_lines_per_s / b.best_lines_per_s:.2f} "
            f"| {s.cpu_per_m / b.cpu_per_m:.2f} | {s.rss_mb / b.rss_mb:.2f} "
            f"| {'-' if target is None else f'≥ {target:g}'} | {verdict} |"
        )
    return (
        "| ratio | lines/s (median) | lines/s (best) | CPU per line | peak RSS | target | met? |\n"
        "|---|--:|--:|--:|--:|--:|---|\n" + "\n".join(out) + "\n"
    )


def render_small(rows: list[Row], runs: list[Run], lines: int) -> str:
    """Many small batches against the single big batch (target ≥ 0.8x)."""
    by = {r.contender: r for r in rows}
    small = by.get("small-batches")
    big = next((r for r in rows if r.contender == "service" and r.lines == lines), None)
    if small is None:
        return ""
    rates = [r.detail["batches_per_s"] for r in runs if r.contender == "small-batches"]
    ratio = f"{small.lines_per_s / big.lines_per_s:.2f}" if big else "-"
    met = (
        "-" if big is None else ("yes" if small.lines_per_s / big.lines_per_s >= 0.8 else "**no**")
    )
    return (
        "| small batches | lines/s | batches/s | ÷ single-batch lines/s | target | met? "
        "| CPU s/M | others' cores |\n|---|--:|--:|--:|--:|---|--:|--:|\n"
        f"| {small.lines:,} lines | {small.lines_per_s:,.0f} | {statistics.median(rates):,.1f} "
        f"| {ratio} | ≥ 0.8 | {met} | {small.cpu_per_m:.2f} | {small.others_cores:.2f} |\n"
    )


def render_startup(runs: list[Run]) -> str:
    """Wall time of a 10-line batch, median of N (target ≤ 0.3 s for the service)."""
    out = []
    for contender in ("service", "confluent", "batch-api"):
        mine = [r for r in runs if r.contender == f"startup-{contender}" and not r.warmup]
        if not mine:
            continue
        walls = sorted(r.wall_s for r in mine)
        target = "≤ 0.3 s" if contender == "service" else "-"
        met = (
            ("yes" if statistics.median(walls) <= 0.3 else "**no**")
            if contender == "service"
            else "-"
        )
        out.append(
            f"| {LABELS[contender]} | {len(walls)} | {statistics.median(walls):.3f} "
            f"| {walls[0]:.3f}-{walls[-1]:.3f} "
            f"| {statistics.median(r.cpu_s for r in mine):.3f} "
            f"| {statistics.median(r.rss_kb for r in mine) / 1024:.0f} "
            f"| {target} | {met} "
            f"| {statistics.median(float(r.load.get('others_cores', 0)) for r in mine):.2f} |"
        )
    if not out:
        return ""
    return (
        "| start-up: 10-line batch | runs | wall s (median) | min-max | CPU s | peak RSS MB "
        "| target | met? | others' cores |\n|---|--:|--:|--:|--:|--:|--:|---|--:|\n"
        + "\n".join(out)
        + "\n"
    )


def _seconds(value: float | None, drain: float) -> str:
    if value is None:
        return "-"
    return f"> {drain:.0f} (unfinished)" if math.isinf(value) else f"{value:.3f}"


def render_latency(points: list[dict[str, Any]]) -> str:
    """Webhook 202 to last record acknowledged, per rate, with the service's own histogram."""
    if not points:
        return ""
    out = []
    for p in sorted(points, key=lambda x: x["rate"]):
        d = p["forward_delay"]

        def s(value: float | None, drain: float = p["drain_s"]) -> str:
            return _seconds(value, drain)

        batches = str(p["batches"]) + ("" if p["drained"] else f" ({p['unfinished']} unfinished)")
        out.append(
            f"| {p['rate']:g} ({p['rate'] * p['lines_per_batch'] / 1000:.0f}k lines/s) "
            f"| {batches} | {s(p['p50_s'])} | {s(p['p99_s'])} | {s(p['max_s'])} "
            f"| {s(d['p50_s'])} | {s(d['p99_s'])} | {s(d['mean_s'])} / {s(p['mean_s'])} "
            f"| {s(p['webhook_rtt_p50_s'])} / {s(p['webhook_rtt_p99_s'])} "
            f"| {p['serve_cpu_per_m']:.2f} | {p['load']['others_cores']:.2f} |"
        )
    return (
        "| rate, batches/s | batches | p50 s | p99 s | max s | delay metric p50 s | p99 s "
        "| mean s: metric / measured | webhook RTT p50 / p99 s | serve CPU s/M | others' cores |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n" + "\n".join(out) + "\n"
    )


def write_json(out: Path, payload: dict[str, Any], runs: list[Run], rows: list[Row]) -> Path:
    """The raw numbers (every run) beside the medians."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        **payload,
        "rows": [asdict(r) for r in rows],
        "runs": [
            {**asdict(r), "lines_per_s": r.lines_per_s, "cpu_per_m": r.cpu_per_m} for r in runs
        ],
    }
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path
