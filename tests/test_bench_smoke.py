"""The benchmark still runs: ``python -m bench --smoke`` on tiny sizes, against the test broker.

Not a timed test: it asserts only that every part ran, that every run's records were verified
(the bench exits 1 on any mismatch), and that the report, the JSON and the plots were written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Every contender, the small batches, start-up and latency run and check their records."""
    env = {**os.environ, "FORWARDER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = tmp_path.glob("results-*.json")
    data = json.loads(results.read_text())
    contenders = {row["contender"] for row in data["rows"]}
    assert contenders == {
        "service",
        "confluent",
        "batch-api",
        "kcat",
        "kcat-jq",
        "serve",
        "small-batches",
    }
    startup = {r["contender"] for r in data["runs"] if r["contender"].startswith("startup-")}
    assert startup == {"startup-service", "startup-confluent", "startup-batch-api"}
    (point,) = data["latency"]
    assert point["batches"] == len(point["latencies_s"]) == point["forward_delay"]["count"]
    assert all(run["load"]["others_cores"] >= 0 for run in data["runs"])
    assert "| service / confluent |" in done.stdout
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_bench_headers_smoke(kafka_bootstrap: str, tmp_path: Path) -> None:
    """`python -m bench.headers --smoke` sends the bench's lines with and without the CloudEvents
    headers (records and header names verified by the bench) and reports the ce_* bytes."""
    env = {**os.environ, "FORWARDER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    done = subprocess.run(
        [sys.executable, "-m", "bench.headers", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = tmp_path.glob("headers-*.json")
    data = json.loads(results.read_text())
    assert [(r["mode"], r["lines"]) for r in data["runs"]] == [("with", 2000), ("without", 2000)]
    summary = data["summary"]
    # The ce_* headers are about 190 bytes a record: more than a hundred, less than a kilobyte.
    extra = summary["with"]["bytes_per_record"] - summary["without"]["bytes_per_record"]
    assert 100 < extra < 1000, summary
    assert "| `datagrid-*` only |" in done.stdout
    assert "the 5% bar" in done.stdout


def test_bench_hotpath_smoke() -> None:
    """`python -m bench.hotpath --smoke` times the 0.3.0 loop, the pure-Python fallback and the
    compiled hot path on the same lines (no broker) and prints one row for each."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.hotpath", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {
        line.split("|")[1].strip()
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| variant")
    }
    assert rows == {"before", "pure", "compiled", "split"}
