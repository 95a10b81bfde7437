"""Contenders that forward one batch and exit: the service's ``forward`` and the baselines.

| contender | what runs |
|---|---|
| ``service`` | ``forwarder forward BATCH_ID`` |
| ``confluent`` | ``bench/baseline_confluent.py``: confluent-kafka (librdkafka) |
| ``batch-api`` | ``bench/baseline_batch.py``: aiokafka ``create_batch``/``send_batch`` |
| ``send-loop`` | ``bench/baseline_send.py``: aiokafka, one ``send()`` per line |
| ``kcat`` | ``curl | mawk '{key TAB line}' | kcat -P`` |
| ``kcat-jq`` | ``curl | jq -R (key TAB line) | kcat -P`` |
"""

from __future__ import annotations

import contextlib
import json
import shutil
from typing import Any

from bench.data import Workload
from bench.harness import PY, BenchFailure, Run, forwarder_command, measure
from bench.machine import LoadWindow
from bench.testbed import API_KEY, Rig

ONESHOT = ("service", "confluent", "batch-api", "send-loop", "kcat", "kcat-jq")
SCRIPTS = {
    "send-loop": "bench.baseline_send",
    "batch-api": "bench.baseline_batch",
    "confluent": "bench.baseline_confluent",
}


def contender_command(
    rig_: Rig, contender: str, names: dict[str, str]
) -> tuple[list[list[str]], dict[str, str]]:
    """The command line(s) and environment of a contender that forwards one batch and exits."""
    if contender == "service":
        return [[*forwarder_command(), "forward", names["batch"]]], rig_.service_env(names)
    if contender in ("kcat", "kcat-jq"):
        return kcat_pipeline(rig_, names, jq=contender == "kcat-jq"), rig_.baseline_env(names)
    assert rig_.fake is not None
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
    return [[PY, "-m", SCRIPTS[contender], *base]], rig_.baseline_env(names)


def run_oneshot(
    rig_: Rig, contender: str, work: Workload, warmup: bool, label: str | None = None
) -> Run:
    """One run of a contender that is a process (or pipeline) forwarding one batch."""
    service = contender == "service"
    names = rig_.names(contender)
    topics = rig_.create(names, service=service)
    rig_.configure(names["batch"], work)
    commands, env = contender_command(rig_, contender, names)
    fake0, broker0 = rig_.helpers_cpu()
    window = LoadWindow()
    done = measure(commands, env, rig_.scratch)
    fake1, broker1 = rig_.helpers_cpu()
    fake_cpu = (fake1 or 0) - (fake0 or 0)
    broker_cpu = None if broker0 is None or broker1 is None else broker1 - broker0
    load = window.close(done.cpu_s + fake_cpu + (broker_cpu or 0), rig_.our_pids())
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
        fake_cpu_s=fake_cpu,
        broker_cpu_s=broker_cpu,
        load=load,
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


#: awk: not a JSON parser; takes the first "custom_id":"..." of the line, enough for this data.
AWK_KEY = (
    '{ i = index($0, "\\"custom_id\\":\\""); if (i == 0) next; '
    's = substr($0, i + 13); j = index(s, "\\""); print substr(s, 1, j - 1) "\\t" $0 }'
)
#: jq: a JSON parser; reads each line raw (-R) so the value is forwarded byte for byte.
JQ_KEY = '(fromjson | .custom_id) + "\\t" + .'


def kcat_pipeline(rig_: Rig, names: dict[str, str], *, jq: bool = False) -> list[list[str]]:
    """``curl | mawk-or-jq (key<TAB>line) | kcat -P``: the librdkafka floor for the same records.

    kcat cannot set per-message headers from stdin, so it sends the two constant headers only
    (batch id, content type); ``datagrid-status`` and ``datagrid-line`` are missing (~40 bytes less
    per record).
    """
    assert rig_.fake is not None
    tools = ("curl", "kcat", "jq") if jq else ("curl", "kcat")
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchFailure(f"{tool} is not installed (scripts/bootstrap.sh installs it)")
    if jq:
        keyer = ["jq", "-R", "-r", JQ_KEY]
    else:
        keyer = [shutil.which("mawk") or shutil.which("awk") or "awk", AWK_KEY]
    url = f"{rig_.fake.base_url}/batch-predictions/{names['batch']}/results"
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
        keyer,
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
