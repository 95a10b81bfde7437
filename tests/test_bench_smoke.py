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
