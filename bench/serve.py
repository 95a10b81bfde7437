"""Contenders that run one ``forwarder serve`` (one pod) and feed it many batches.

``serve``: ``--serve-batches`` batches queued at once with ``POST /v1/batches`` (bearer token).
``small-batches``: ``--small-batches`` batches of ``--small-lines`` lines written straight to the
jobs topic (bare batch ids, as any producer may), the case a Datagrid user lives in (a batch holds
at most 5,000 items).  Both are timed from the first job until the results topic holds every
record (polled with ListOffsets from the harness, so the server does no extra work); the serve
process's CPU is read from ``/proc`` over the same window, its peak RSS (``VmHWM``, start-up
included) at the end.  Every batch must end ``forwarded`` (``forwarder_batches_total``), every
record must be where murmur2 puts it, and the fake must have served each batch once, whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.data import Workload
from bench.harness import BenchFailure, Run, forwarder_command, proc_cpu, proc_hwm_kb, stop_process
from bench.machine import LoadWindow
from bench.testbed import API_TOKEN, WEBHOOK_SECRET, Rig, rig
from bench.topics import produce_values, wait_for_records


class Serve:
    """One running ``forwarder serve`` with its own topics; an HTTP client on its port."""

    def __init__(self, proc: subprocess.Popen[bytes], http: httpx.Client, logfile: Path) -> None:
        self.proc = proc
        self.http = http
        self.logfile = logfile

    @property
    def cpu(self) -> float:
        """The server's CPU seconds so far."""
        return proc_cpu(self.proc.pid) or 0.0

    def metrics(self) -> str:
        """The Prometheus exposition text."""
        response = self.http.get("/metrics")
        response.raise_for_status()
        return response.text

    def wait_ready(self, timeout: float = 90) -> None:
        """Until ``/readyz`` answers 200 (fail loudly if the process dies first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchFailure(
                    f"forwarder serve exited {self.proc.returncode} during start-up:\n"
                    f"{self.logfile.read_text()[-4000:]}"
                )
            with contextlib.suppress(httpx.TransportError):
                if self.http.get("/readyz").status_code == 200:
                    return
            time.sleep(0.1)
        raise BenchFailure(
            f"forwarder serve not ready after {timeout:.0f} s:\n{self.logfile.read_text()[-4000:]}"
        )


@contextlib.contextmanager
def serve(rig_: Rig, names: dict[str, str], **extra: str) -> Iterator[Serve]:
    """Start ``forwarder serve`` on a free port with the run's topics; stop it (SIGTERM) after."""
    port = rig.free_port()
    env = rig_.service_env(
        names,
        # The reconciler lists every batch the fake holds, including other runs' (one-shot
        # contenders' batches are never recorded as forwarded in this pod's state topic), and
        # would queue them into this run's topics: off, as it is not what is measured here.
        FORWARDER_RECONCILE_INTERVAL_SECONDS="0",
        FORWARDER_HTTP_HOST="127.0.0.1",
        FORWARDER_HTTP_PORT=str(port),
        FORWARDER_MANAGEMENT_PORT=str(rig.free_port()),
        FORWARDER_WEBHOOK_SECRETS=WEBHOOK_SECRET,
        FORWARDER_API_TOKENS=API_TOKEN,
        **extra,
    )
    logfile = rig_.scratch / f"serve-{names['batch']}.log"
    with logfile.open("wb") as out:
        proc = subprocess.Popen(
            [*forwarder_command(), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=rig_.scratch,
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                server = Serve(proc, http, logfile)
                server.wait_ready()
                yield server
        finally:
            stop_process(proc)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample's value from an exposition text (0 when absent)."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def run_serve(
    rig_: Rig,
    batches: int,
    work: Workload,
    warmup: bool,
    *,
    via: str = "api",
    concurrency: int | None = None,
) -> Run:
    """``batches`` batches of ``work`` into one ``forwarder serve`` (the API or the jobs topic)."""
    label = "serve" if via == "api" else "small-batches"
    names = rig_.names(label)
    topics = rig_.create(names, service=True)
    batch_ids = [f"{names['batch']}_{i}" for i in range(batches)]
    for batch_id in batch_ids:
        rig_.configure(batch_id, work)
    extra = {"FORWARDER_CONCURRENCY": str(concurrency)} if concurrency else {}
    total = batches * work.lines
    with serve(rig_, names, **extra) as server:
        fake0, broker0 = rig_.helpers_cpu()
        cpu0 = server.cpu
        window = LoadWindow()
        started = time.perf_counter()
        if via == "api":
            headers = {"Authorization": f"Bearer {API_TOKEN}"}
            for batch_id in batch_ids:
                response = server.http.post(
                    "/v1/batches", json={"batch_id": batch_id}, headers=headers
                )
                if response.status_code != 202:
                    raise BenchFailure(
                        f"POST /v1/batches {batch_id}: {response.status_code} {response.text[:500]}"
                    )
        else:
            jobs = [(b.encode(), b.encode()) for b in batch_ids]
            asyncio.run(produce_values(rig_.bootstrap, names["jobs"], jobs))
        done = asyncio.run(
            wait_for_records(rig_.bootstrap, names["results"], rig_.partitions, total, 600)
        )
        wall = done - started
        cpu = server.cpu - cpu0
        fake1, broker1 = rig_.helpers_cpu()
        fake_cpu = (fake1 or 0) - (fake0 or 0)
        broker_cpu = None if broker0 is None or broker1 is None else broker1 - broker0
        load = window.close(cpu + fake_cpu + (broker_cpu or 0), {*rig_.our_pids(), server.proc.pid})
        rss = proc_hwm_kb(server.proc.pid)
        forwarded = 0.0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = server.metrics()
            forwarded = metric_value(text, "forwarder_batches_total", 'outcome="forwarded"')
            if forwarded >= batches:
                break
            time.sleep(0.2)
        if forwarded != batches:
            raise BenchFailure(f"{label}: {forwarded:.0f} of {batches} batches forwarded")
    rig_.verify_topic(names, [n * batches for n in rig_.expected(work)], service=True)
    body = rig_.verify_streams(set(batch_ids), work.lines)
    rig_.delete(topics)
    return Run(
        label,
        total,
        body,
        wall,
        cpu,
        rss,
        warmup,
        fake_cpu_s=fake_cpu,
        broker_cpu_s=broker_cpu,
        load=load,
        detail={
            "batches": batches,
            "lines_per_batch": work.lines,
            "batches_per_s": batches / wall,
            "via": via,
            "concurrency": concurrency or "default",
        },
    )
