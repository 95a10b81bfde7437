"""A real Prometheus for tests: Debian's ``prometheus`` binary scraping one target every second.

::

    with PrometheusRig("127.0.0.1:8080") as prom:   # job="forwarder", scrape every 1 s
        prom.wait_for_scrape()                       # target up, scraped at least twice
        ...                                          # make the target change its metrics
        prom.wait_for_fresh_scrape()                 # a scrape that began after the change
        prom.query('sum(forwarder_lines_forwarded_total)')  # -> [{"metric": {}, "value": [t, "3"]}]

Several targets, each with its own labels (as Kubernetes service discovery would label pods of
installs in different namespaces), are given as a mapping ``{"host:port": {"namespace": ...}}``;
a ``job`` label there overrides the scrape job's name.

Prometheus 2.x applies new scrape targets on a 5 s tick, so the first scrape comes about 5 s after
start: start one rig per module or session, not per test. Each rig owns a temporary directory
(config, TSDB, log) and a private ``127.0.0.1`` port; ``stop`` kills the process and removes the
directory. Nothing is skipped when the binary is missing: the rig raises
:class:`PrometheusRigError`, so CI fails loudly (``apt-get install prometheus``).

:func:`serve_registry` serves a ``prometheus_client`` registry for the rig to scrape. Also here,
because the dashboard and rule tests share them: :func:`referenced_metrics`, the metric names a
PromQL expression reads, and :func:`exported_metric_names`, every series name a registry exposes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from prometheus_client import CollectorRegistry, start_http_server

HOST = "127.0.0.1"

Vector = list[dict[str, Any]]


class PrometheusRigError(RuntimeError):
    """Prometheus could not be started, did not become ready, or did not scrape in time."""


class PrometheusQueryError(PrometheusRigError):
    """Prometheus refused a query (bad PromQL, timeout); the message is Prometheus's own."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_registry(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` at ``/metrics`` on a kernel-chosen loopback port; yield ``host:port``."""
    server, thread = start_http_server(0, HOST, registry)
    try:
        yield f"{HOST}:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class PrometheusRig:
    """One Prometheus process scraping ``target`` (``host:port``) as job ``job``.

    ``target`` may also map several ``host:port`` to the labels their series get.

    ``rule_files`` are loaded too (evaluated every ``scrape_interval``), so a test can also check
    that rules evaluate without errors via :meth:`rules`.
    """

    def __init__(
        self,
        target: str | Mapping[str, Mapping[str, str]],
        *,
        job: str = "forwarder",
        scrape_interval: float = 1.0,
        metrics_path: str = "/metrics",
        rule_files: Sequence[str | os.PathLike[str]] = (),
        binary: str = "prometheus",
    ) -> None:
        if isinstance(target, str):
            target = {target: {}}
        self.labelled_targets = {address: dict(labels) for address, labels in target.items()}
        self.target = next(iter(self.labelled_targets))
        self.job = job
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.rule_files = [Path(f).resolve() for f in rule_files]
        self.binary = binary
        self.port: int | None = None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:41234``."""
        if self.port is None:
            raise PrometheusRigError("the rig is not started")
        return f"http://{HOST}:{self.port}"

    def config(self) -> str:
        """The ``prometheus.yml`` this rig runs with (JSON is valid YAML, so no YAML writer)."""
        interval = f"{int(self.scrape_interval * 1000)}ms"
        cfg = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(f) for f in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [
                        {"targets": [address], **({"labels": labels} if labels else {})}
                        for address, labels in self.labelled_targets.items()
                    ],
                }
            ],
        }
        return json.dumps(cfg, indent=2) + "\n"

    def start(self, timeout: float = 30.0) -> Self:
        """Start Prometheus on a free port and wait until ``/-/ready`` answers 200."""
        if self._proc is not None:
            return self
        binary = shutil.which(self.binary)
        if binary is None:
            raise PrometheusRigError(
                f"{self.binary!r} not found on PATH: install it (apt-get install prometheus)"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="prometheus-rig-"))
        (self._dir / "prometheus.yml").write_text(self.config())
        self._http = httpx.Client(timeout=10.0, trust_env=False)  # no proxy for loopback
        try:
            # A port picked free can be taken before Prometheus binds it; try a few.
            for _ in range(3):
                self.port = free_port()
                if self._launch(binary, timeout):
                    return self
            raise PrometheusRigError(f"could not bind a free port:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self, binary: str, timeout: float) -> bool:
        """Run the binary; True once ready, False if it lost a race for its port."""
        assert self._dir is not None
        assert self._http is not None
        with (self._dir / "prometheus.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self._dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self._dir / 'data'}",
                    f"--web.listen-address={HOST}:{self.port}",
                    "--log.level=warn",
                ],
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                lost_race = "address already in use" in self.log_tail()
                self._proc = None
                if lost_race:
                    return False
                raise PrometheusRigError(f"prometheus exited at start:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if self._http.get(f"{self.url}/-/ready").status_code == 200:
                    return True
            time.sleep(0.05)
        raise PrometheusRigError(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and delete its files; safe to call twice."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def is_running(self) -> bool:
        """True while the Prometheus process this rig started is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines Prometheus logged (for error messages)."""
        if self._dir is None or not (self._dir / "prometheus.log").exists():
            return ""
        text = (self._dir / "prometheus.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- HTTP API ----------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raise on an error answer."""
        if self._http is None:
            raise PrometheusRigError("the rig is not started")
        response = self._http.get(f"{self.url}/api/v1/{path}", params=params)
        try:
            body = response.json()
        except ValueError:
            raise PrometheusQueryError(f"HTTP {response.status_code}: {response.text}") from None
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{body.get('errorType')}: {body.get('error')} ({params})")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> Vector:
        """Evaluate an instant query now (or at unix time ``at``); return the result list.

        A vector gives one ``{"metric": {...}, "value": [t, "v"]}`` per series; a scalar or
        string result is wrapped as one such item with empty labels, so callers see one shape.
        """
        params = {"query": expr}
        if at is not None:
            params["time"] = repr(at)
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float:
        """The single value of a query that must return exactly one series."""
        result = self.query(expr)
        if len(result) != 1:
            raise PrometheusQueryError(f"{expr!r} returned {len(result)} series, wanted 1")
        return float(result[0]["value"][1])

    def wait_for(
        self,
        expr: str,
        timeout: float = 30.0,
        until: Callable[[Vector], bool] = bool,
    ) -> Vector:
        """Poll ``expr`` until ``until(result)`` holds (default: a non-empty result); return it."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if until(result):
                return result
            if time.monotonic() > deadline:
                raise PrometheusRigError(
                    f"{expr!r} still {result!r} after {timeout}s; targets: {self.targets()}\n"
                    f"{self.log_tail()}"
                )
            if not self.is_running():
                raise PrometheusRigError(f"prometheus died:\n{self.log_tail()}")
            time.sleep(min(0.1, self.scrape_interval / 4))

    @property
    def _up(self) -> str:
        """``up`` of this rig's targets (it scrapes nothing else; the job may be relabelled)."""
        relabelled = any("job" in labels for labels in self.labelled_targets.values())
        return "up" if relabelled else f'up{{job="{self.job}"}}'

    def wait_for_scrape(
        self, scrapes: int = 2, timeout: float = 30.0, targets: int | None = None
    ) -> None:
        """Wait until the targets are up and have been scraped successfully ``scrapes`` times.

        Two successful scrapes are what ``rate()`` and ``increase()`` need to return anything.
        ``targets`` is how many must be up (default: all of them).
        """
        up = self._up
        self.wait_for(
            f"sum_over_time({up}[10m]) >= {scrapes} and {up} == 1",
            timeout=timeout,
            until=self._counts(targets),
        )

    def wait_for_fresh_scrape(self, timeout: float = 30.0, targets: int | None = None) -> None:
        """Wait until a scrape that started after this call has succeeded (on ``targets``).

        Queries then see the target as it is now: call it after changing what the target exports
        (forwarding batches, incrementing a counter) and before asserting on a query.
        """
        now = time.time()  # Prometheus stamps each sample with its scrape's start time
        up = self._up
        # timestamp() of a bare selector gives the sample's time (of "up == 1", the query's).
        self.wait_for(
            f"timestamp({up}) > {now:.3f} and {up} == 1",
            timeout=timeout,
            until=self._counts(targets),
        )

    def _counts(self, targets: int | None) -> Callable[[Vector], bool]:
        wanted = len(self.labelled_targets) if targets is None else targets
        return lambda result: len(result) >= max(wanted, 1)

    def targets(self) -> list[dict[str, Any]]:
        """The active targets with their health and last scrape error (for diagnostics)."""
        data = self.api("targets", state="active")
        return [
            {k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrape")}
            for t in data["activeTargets"]
        ]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its group, health and last evaluation error."""
        data = self.api("rules")
        return [{"group": g["name"], **rule} for g in data["groups"] for rule in g["rules"]]


# --- PromQL helpers shared by the dashboard and rules tests ------------------------------------

# Words in PromQL that are not metric names. Function names are recognised by the "(" after them.
_KEYWORDS = frozenset(
    {
        *("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"),
        *("and", "or", "unless", "inf", "nan"),
        *("sum", "min", "max", "avg", "count", "stddev", "stdvar", "group"),
        *("topk", "bottomk", "quantile", "count_values"),
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_COMMENT = re.compile(r"#[^\n]*")
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_BRACES = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def referenced_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (a lexical scan, enough for our own queries)."""
    text = _COMMENT.sub(" ", _STRING.sub('""', expr))  # strings first: "#" may be in one
    text = _LABEL_LISTS.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _RANGES.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue
        names.add(name)
    return names


def exported_metric_names(registry: CollectorRegistry) -> set[str]:
    """Every series name ``registry`` exposes or will expose once its labels are used.

    A labelled collector with no children yields no samples yet, so names are derived from each
    family's type as well (``_total``/``_created`` for counters, ``_bucket``/``_sum``/``_count``
    for histograms) and merged with the samples actually collected.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
        names.update(sample.name for sample in family.samples)
    return names
