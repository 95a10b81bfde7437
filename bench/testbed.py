"""The test bed every contender runs on: a Kafka broker, the fake Datagrid, fresh topic names.

``Rig`` starts a private broker with ``deploy/kafka/rig.py`` (or reuses the one that
``FORWARDER_KAFKA_BOOTSTRAP_SERVERS`` names) and the fake Datagrid from
``tests/support/fake_datagrid.py``,
hands out fresh topic names per run, builds the contenders' environments, and verifies a run's
records against what the data predicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from bench.data import CHUNK, Workload, expected_counts
from bench.harness import REPO, BenchFailure, log, proc_cpu
from bench.topics import create_topics, delete_topics, watermarks
from tests.support.fake_datagrid import FakeDatagrid, start_fake_datagrid
from tests.support.hotpath import build_compiled

sys.path.insert(0, str(REPO / "deploy" / "kafka"))
import rig

API_KEY = "dg_bench_key"
API_TOKEN = "bench-api-token"  # noqa: S105 - a throwaway token for a local, private server
WEBHOOK_SECRET = "whsec_bench_secret"  # noqa: S105 - same

#: Topic config that makes every record's timestamp the broker's append time (latency runs).
LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}


class Rig:
    """Broker, fake Datagrid, scratch dir and the expected partition counts."""

    def __init__(
        self, partitions: int, scratch: Path, ref: str | None = None, *, pure: bool = False
    ) -> None:
        self.partitions = partitions
        self.scratch = scratch
        src = scratch / "src"
        src.mkdir()
        self.pythonpath = f"{src}{os.pathsep}{REPO}"
        if ref:
            # Benchmark the forwarder package of a commit (e.g. HEAD while the work tree is being
            # edited, or main against a branch); bench/ and tests/ still come from the work tree.
            # Its hot path is the source's (pure Python): the compiled one is the work tree's.
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", ref, "forwarder"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            self.hotpath = "pure Python (--ref)"
        else:
            # What users run: the package as a wheel installs it, forwarder.hotpath compiled with
            # mypyc beside its source (the editable install in .venv imports the source alone).
            shutil.copytree(
                REPO / "forwarder", src / "forwarder", ignore=shutil.ignore_patterns("__pycache__")
            )
            self.hotpath = "pure Python (--pure)" if pure else "compiled (mypyc)"
            if not pure:
                for module in build_compiled().iterdir():
                    shutil.copy2(module, src / "forwarder" / module.name)
        self.broker: rig.Broker | None = None
        self.broker_pid: int | None = None
        self.bootstrap = ""
        self.fake: FakeDatagrid | None = None
        self.tag = uuid.uuid4().hex[:6]
        self.extra_env: dict[str, str] = {}
        self._seq = 0

    def start(self) -> None:
        """Start (or reach) the broker and start the fake."""
        given = os.environ.get("FORWARDER_KAFKA_BOOTSTRAP_SERVERS")
        if given:
            host, _, port = given.split(",")[0].rpartition(":")
            rig.probe_metadata(host, int(port))
            self.bootstrap = given
            log(f"reusing broker {given} (FORWARDER_KAFKA_BOOTSTRAP_SERVERS)")
        else:
            log("starting a private Kafka broker (deploy/kafka/rig.py)")
            self.broker = rig.Broker.on_free_ports(self.scratch / "kafka")
            self.broker.start(wait=120)
            self.bootstrap = self.broker.bootstrap
            self.broker_pid = self.broker.pid
        log("starting the fake Datagrid (tests/support/fake_datagrid.py)")
        self.fake = start_fake_datagrid(API_KEY)

    def stop(self) -> None:
        """Stop what :meth:`start` started."""
        if self.fake is not None:
            self.fake.stop()
        if self.broker is not None:
            self.broker.stop()

    @property
    def fake_pid(self) -> int | None:
        """The fake's process id (its CPU is reported beside each run's)."""
        return self.fake.process.pid if self.fake and self.fake.process else None

    def our_pids(self) -> set[int]:
        """Processes whose CPU a run accounts for itself (not 'others' in the load figures)."""
        return {pid for pid in (self.fake_pid, self.broker_pid) if pid is not None}

    def helpers_cpu(self) -> tuple[float | None, float | None]:
        """CPU seconds so far of the fake and of the broker (None when not ours)."""
        return proc_cpu(self.fake_pid), proc_cpu(self.broker_pid)

    def names(self, contender: str) -> dict[str, str]:
        """Fresh topic (and group and batch) names for one run."""
        self._seq += 1
        base = f"bench-{self.tag}-{self._seq:03d}-{contender}"
        return {
            "results": f"{base}.results",
            "dlq": f"{base}.dlq",
            "state": f"{base}.state",
            "jobs": f"{base}.jobs",
            "group": f"{base}.group",
            "batch": f"bpred_{self.tag}_{self._seq:03d}",
        }

    def create(
        self, names: dict[str, str], *, service: bool, results_config: dict[str, str] | None = None
    ) -> list[str]:
        """Create the run's topics: results, plus the service's dead-letter, jobs and state."""
        topics: dict[str, dict[str, str]] = {names["results"]: dict(results_config or {})}
        if service:
            topics[names["dlq"]] = {}
            topics[names["jobs"]] = {}
            topics[names["state"]] = {"cleanup.policy": "compact"}
        asyncio.run(create_topics(self.bootstrap, topics, self.partitions))
        return list(topics)

    def delete(self, topics: list[str]) -> None:
        """Delete a finished run's topics; never fails a run."""
        with contextlib.suppress(Exception):
            asyncio.run(delete_topics(self.bootstrap, topics))

    def configure(self, batch_id: str, work: Workload, **extra: object) -> None:
        """Make the fake serve ``work`` as batch ``batch_id``."""
        assert self.fake is not None
        self.fake.configure(batch_id, generate=work.spec(), chunk_size=CHUNK, **extra)

    def expected(self, work: Workload) -> list[int]:
        """Records per partition that murmur2 gives for the served custom_ids."""
        return list(expected_counts(work, self.partitions))

    def verify_topic(self, names: dict[str, str], want: list[int], *, service: bool) -> None:
        """Fail loudly unless the results topic's high watermarks are ``want``, and no DLQ."""
        got = asyncio.run(watermarks(self.bootstrap, names["results"], self.partitions))
        if got != want:
            raise BenchFailure(
                f"{names['results']}: high watermarks {got} (sum {sum(got)}), expected {want} "
                f"(sum {sum(want)})"
            )
        if service:
            dlq = asyncio.run(watermarks(self.bootstrap, names["dlq"], self.partitions))
            if sum(dlq):
                raise BenchFailure(f"{names['dlq']}: {sum(dlq)} dead letters, expected none")

    def verify_streams(self, batch_ids: set[str], lines: int) -> int:
        """Fail unless the fake served each batch whole, in one request; return body bytes."""
        assert self.fake is not None
        streams = [
            r
            for r in self.fake.requests()
            if r["batch_id"] in batch_ids and r["path"].endswith("/results")
        ]
        self.fake.clear_requests()
        complete = [r for r in streams if r["outcome"] == "complete" and r["lines_sent"] == lines]
        if len(streams) != len(batch_ids) or len(complete) != len(batch_ids):
            bad = [r for r in streams if r not in complete][:3]
            raise BenchFailure(
                f"fake saw {len(streams)} results requests for {len(batch_ids)} batches; "
                f"{len(complete)} complete; e.g. {bad}"
            )
        return sum(int(r["bytes_sent"]) for r in streams)

    def verify(self, names: dict[str, str], work: Workload, *, service: bool) -> int:
        """One batch run: exact records, no dead letters, one whole stream; return body bytes."""
        self.verify_topic(names, self.expected(work), service=service)
        return self.verify_streams({names["batch"]}, work.lines)

    def service_env(self, names: dict[str, str], **extra: str) -> dict[str, str]:
        """The service's environment for one run (its own topics and group)."""
        assert self.fake is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FORWARDER_", "DATAGRID_"))}
        # Let the warm-up write .pyc files (the image ships them compiled, UV_COMPILE_BYTECODE=1):
        # otherwise every run recompiles its imports and start-up CPU counts against the hot path.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(
            PYTHONPATH=self.pythonpath,
            DATAGRID_API_KEY=API_KEY,
            FORWARDER_DATAGRID_BASE_URL=self.fake.base_url,
            FORWARDER_KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            FORWARDER_RESULTS_TOPIC=names["results"],
            FORWARDER_DEAD_LETTER_TOPIC=names["dlq"],
            FORWARDER_STATE_TOPIC=names["state"],
            FORWARDER_JOBS_TOPIC=names["jobs"],
            FORWARDER_CONSUMER_GROUP=names["group"],
            FORWARDER_KAFKA_TOPIC_PARTITIONS=str(self.partitions),
            FORWARDER_KAFKA_REPLICATION_FACTOR="1",
            FORWARDER_LOG_FORMAT="json",
            # The fake has no rate limit, and the bench measures the forwarder: the client-side
            # limiter for Datagrid's 200 requests/min would cap many-batch runs at 3 batches/s.
            FORWARDER_DATAGRID_REQUESTS_PER_MINUTE="0",
        )
        env.update(self.extra_env)
        env.update(extra)
        return env

    def baseline_env(self, names: dict[str, str]) -> dict[str, str]:
        """The baselines' environment: the work tree's ``forwarder.kafka`` even under ``--ref``.

        They only borrow its partitioner (``forwarder.kafka.partition_for``), which commits
        before a4beb8e lack.
        """
        env = self.service_env(names)
        env["PYTHONPATH"] = str(REPO)
        return env
