"""Latency as users feel it: from a webhook's ``202`` to the batch's last record acknowledged.

For each rate, a fresh ``forwarder serve`` (one pod) with fresh topics is fed signed
``batch_prediction.completed`` webhooks for 5,000-line batches at a steady rate for a bounded time
(each webhook sent at its scheduled instant, whether or not earlier ones were answered).  The
results topic is created with ``message.timestamp.type=LogAppendTime``, so each record carries the
broker's clock at append, which with ``acks=all`` and one replica is when its acknowledgement left
the broker.  A batch's latency is the latest such timestamp over its records minus the instant
its webhook's ``202`` arrived (same machine, same clock; the broker stamps whole milliseconds).

Beside it, ``forwarder_forward_delay_seconds`` from ``/metrics``: the service's own view, from the
batch's terminal time (the fake's ``completed_at``, set to the instant the webhook is sent) to its
last line acknowledged.  The two differ by the webhook's own round trip and by where each clock is
read; they should agree within a few milliseconds when the pod keeps up.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.data import Workload
from bench.harness import BenchFailure, log
from bench.machine import LoadWindow
from bench.serve import metric_value, serve
from bench.testbed import LOG_APPEND_TIME, WEBHOOK_SECRET, Rig
from bench.topics import last_append_per_batch, wait_for_records


def _iso(moment: float) -> str:
    stamp = datetime.fromtimestamp(moment, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def signed(batch_id: str, event_id: str) -> tuple[bytes, dict[str, str]]:
    """A ``batch_prediction.completed`` webhook body and its ``Datagrid-Signature`` header."""
    body = json.dumps(
        {
            "id": event_id,
            "event_type": "batch_prediction.completed",
            "timestamp": int(time.time()),
            "data": {"object": "batch_prediction", "id": batch_id, "status": "completed"},
        },
        separators=(",", ":"),
    ).encode()
    t = int(time.time())
    mac = hmac.new(WEBHOOK_SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return body, {"Datagrid-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


async def _feed(
    base_url: str, batch_ids: list[str], starts: list[float]
) -> tuple[dict[str, float], list[float]]:
    """Send each batch's webhook at its start instant; (batch id -> when its 202 arrived, RTTs)."""
    accepted: dict[str, float] = {}
    rtts: list[float] = []
    retried: list[str] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:

        async def one(batch_id: str) -> None:
            body, headers = signed(batch_id, f"evt_{batch_id}")
            sent = time.time()
            for attempt in range(5):  # Datagrid redelivers a webhook whose request failed
                try:
                    response = await client.post(
                        "/webhooks/datagrid", content=body, headers=headers
                    )
                    break
                except httpx.TransportError as exc:
                    retried.append(f"{batch_id}: {type(exc).__name__}")
                    if attempt == 4:
                        raise BenchFailure(f"webhook for {batch_id} failed 5 times") from exc
                    await asyncio.sleep(0.1)
            if response.status_code != 202:
                errors.append(f"{batch_id}: {response.status_code} {response.text[:200]}")
            accepted[batch_id] = time.time()
            rtts.append(accepted[batch_id] - sent)

        tasks = []
        for batch_id, start in zip(batch_ids, starts, strict=True):
            delay = start - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(batch_id)))
        await asyncio.gather(*tasks)
    if errors:
        raise BenchFailure(f"webhooks not accepted: {errors[:3]}")
    if retried:
        log(f"webhooks redelivered after a transport error: {len(retried)}, e.g. {retried[:3]}")
    return accepted, rtts


def histogram(text: str, name: str) -> dict[str, Any]:
    """Count, mean and interpolated p50/p99 (as PromQL's histogram_quantile) of a histogram."""
    buckets = [
        (math.inf if le == "+Inf" else float(le), float(v))
        for le, v in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.e+-]+)$', text, re.M)
    ]
    count = metric_value(text, f"{name}_count")
    total = metric_value(text, f"{name}_sum")

    def quantile(q: float) -> float | None:
        if not count:
            return None
        rank, lower, below = q * count, 0.0, 0.0
        for upper, cumulative in buckets:
            if cumulative >= rank:
                if math.isinf(upper):
                    return lower
                inside = cumulative - below
                return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = upper, cumulative
        return None

    return {
        "count": count,
        "mean_s": total / count if count else None,
        "p50_s": quantile(0.5),
        "p99_s": quantile(0.99),
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def run_rate(
    rig_: Rig, rate: float, seconds: float, work: Workload, drain: float = 120
) -> dict[str, Any]:
    """One bounded run at ``rate`` webhooks per second; the latencies and the service's view.

    After the last webhook the pod gets ``drain`` seconds to finish; batches still unfinished then
    count as infinitely late (``drained`` is False, and the records are not verified).
    """
    names = rig_.names(f"latency{rate:g}")
    topics = rig_.create(names, service=True, results_config=LOG_APPEND_TIME)
    count = max(1, round(rate * seconds))
    batch_ids = [f"{names['batch']}_{i}" for i in range(count)]
    total = count * work.lines
    with serve(rig_, names) as server:
        # Configure every batch before the clock starts, each with completed_at = its send
        # instant; how long configuring takes on this (shared) machine is measured first.
        probe = time.perf_counter()
        for _ in range(5):
            rig_.configure(f"{names['batch']}_probe", work)
        lead = 1.0 + 3 * (time.perf_counter() - probe) / 5 * count
        first = time.time() + lead
        starts = [first + i / rate for i in range(count)]
        for batch_id, start in zip(batch_ids, starts, strict=True):
            rig_.configure(batch_id, work, timestamps={"completed_at": _iso(start)})
        if time.time() > first:
            raise BenchFailure(f"configuring {count} batches took longer than {lead:.1f} s")
        cpu0 = server.cpu
        fake0, broker0 = rig_.helpers_cpu()
        window = LoadWindow()
        accepted, rtts = asyncio.run(_feed(str(server.http.base_url), batch_ids, starts))
        sent_span = max(accepted.values()) - min(accepted.values())
        drained = True
        try:
            asyncio.run(
                wait_for_records(rig_.bootstrap, names["results"], rig_.partitions, total, drain)
            )
        except BenchFailure:
            drained = False
        elapsed = time.time() - first
        cpu = server.cpu - cpu0
        fake1, broker1 = rig_.helpers_cpu()
        fake_cpu = (fake1 or 0) - (fake0 or 0)
        broker_cpu = None if broker0 is None or broker1 is None else broker1 - broker0
        load = window.close(cpu + fake_cpu + (broker_cpu or 0), {*rig_.our_pids(), server.proc.pid})
        # The histogram is observed right after the state record is written: wait for all.
        deadline = time.monotonic() + (60 if drained else 1)
        while True:
            delay = histogram(server.metrics(), "forwarder_forward_delay_seconds")
            if delay["count"] >= count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if drained and delay["count"] != count:
            raise BenchFailure(f"forward_delay_seconds counted {delay['count']} of {count}")
        last = last_append_per_batch(
            rig_.bootstrap, names["results"], rig_.partitions, total if drained else None
        )
    if drained:
        if set(last) != set(batch_ids) or any(n != work.lines for _, n in last.values()):
            raise BenchFailure("results topic: not every batch has exactly its lines")
        rig_.verify_topic(names, [n * count for n in rig_.expected(work)], service=True)
        rig_.verify_streams(set(batch_ids), work.lines)
    elif rig_.fake is not None:
        rig_.fake.clear_requests()
    rig_.delete(topics)
    latencies = [
        last[b][0] - accepted[b] if b in last and last[b][1] == work.lines else math.inf
        for b in batch_ids
    ]
    finite = [v for v in latencies if math.isfinite(v)]
    return {
        "rate": rate,
        "seconds": seconds,
        "batches": count,
        "lines_per_batch": work.lines,
        "drained": drained,
        "drain_s": drain,
        "unfinished": count - len(finite),
        "send_rate": (count - 1) / sent_span if sent_span > 0 else None,
        "p50_s": percentile(latencies, 0.50),
        "p99_s": percentile(latencies, 0.99),
        "max_s": max(latencies),
        "mean_s": statistics.fmean(finite) if finite else math.inf,
        "forward_delay": delay,
        "webhook_rtt_p50_s": percentile(rtts, 0.5),
        "webhook_rtt_p99_s": percentile(rtts, 0.99),
        "latencies_s": latencies,
        "serve_cpu_s": cpu,
        "serve_cpu_per_m": cpu / total * 1e6,
        "elapsed_s": elapsed,
        "fake_cpu_s": fake_cpu,
        "broker_cpu_s": broker_cpu,
        "load": load,
    }


def crossing(points: list[dict[str, Any]], limit: float = 1.0) -> str:
    """Where p99 first exceeds ``limit`` seconds, interpolated between the measured rates."""
    ordered = sorted(points, key=lambda p: p["rate"])
    previous = None
    for point in ordered:
        if point["p99_s"] > limit:
            if previous is None:
                return f"already above {limit:g} s at {point['rate']:g} batches/s"
            r0, y0, r1, y1 = previous["rate"], previous["p99_s"], point["rate"], point["p99_s"]
            if math.isinf(y1):
                return f"between {r0:g} (p99 {y0:.2f} s) and {r1:g} batches/s (did not drain)"
            at = r0 + (r1 - r0) * (limit - y0) / (y1 - y0)
            return (
                f"about {at:.0f} batches/s ({at * point['lines_per_batch'] / 1000:.0f}k lines/s), "
                f"between {r0:g} (p99 {y0:.2f} s) and {r1:g} (p99 {y1:.2f} s), linear interpolation"
            )
        previous = point
    top = ordered[-1]
    return f"not crossed up to {top['rate']:g} batches/s (p99 {top['p99_s']:.2f} s there)"
