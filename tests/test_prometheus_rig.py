"""Self-test of the Prometheus rig (tests/prometheus_rig.py) against a real ``prometheus`` binary.

The target is a plain ``prometheus_client`` exporter, so these tests prove the rig before (and
independently of) the service: the end-to-end tests point the same rig at ``forwarder serve``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from tests.prometheus_rig import (
    PrometheusQueryError,
    PrometheusRig,
    PrometheusRigError,
    free_port,
    serve_registry,
)


@dataclass
class Exporter:
    target: str
    gauge: Gauge
    counter: Counter


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    """A /metrics endpoint on a kernel-chosen loopback port, serving a private registry."""
    registry = CollectorRegistry()
    gauge = Gauge("rig_temperature", "A gauge the test sets.", ["room"], registry=registry)
    counter = Counter("rig_events", "A counter the test increments.", registry=registry)
    with serve_registry(registry) as target:
        yield Exporter(target, gauge, counter)


RULES = """
groups:
  - name: rig
    rules:
      - record: rig:events:rate1m
        expr: sum(rate(rig_events_total[1m]))
      - alert: RigTooHot
        expr: rig_temperature > 40
        labels: {severity: warning}
"""


@pytest.fixture(scope="module")
def prom(exporter: Exporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusRig]:
    """One Prometheus scraping the exporter every second, with a small rule file loaded."""
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text(RULES)
    with PrometheusRig(exporter.target, job="forwarder", rule_files=[rules]) as rig:
        yield rig


def test_config_scrapes_the_target_every_second() -> None:
    """The generated config names the job and target and scrapes and evaluates every second."""
    rig = PrometheusRig("127.0.0.1:9999", job="forwarder", rule_files=["/x/rules.yaml"])
    config = json.loads(rig.config())  # JSON is YAML: this is exactly what Prometheus reads
    assert config["global"] == {
        "scrape_interval": "1000ms",
        "scrape_timeout": "1000ms",
        "evaluation_interval": "1000ms",
    }
    assert config["rule_files"] == ["/x/rules.yaml"]
    [job] = config["scrape_configs"]
    assert job == {
        "job_name": "forwarder",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": ["127.0.0.1:9999"]}],
    }


def test_config_labels_each_target_of_a_mapping() -> None:
    """Targets given as a mapping get one static config each, with their own labels."""
    rig = PrometheusRig(
        {"127.0.0.1:1": {"namespace": "a", "job": "svc"}, "127.0.0.1:2": {"namespace": "b"}}
    )
    [job] = json.loads(rig.config())["scrape_configs"]
    assert job["static_configs"] == [
        {"targets": ["127.0.0.1:1"], "labels": {"namespace": "a", "job": "svc"}},
        {"targets": ["127.0.0.1:2"], "labels": {"namespace": "b"}},
    ]
    assert rig.target == "127.0.0.1:1"


def test_query_returns_the_scraped_value(exporter: Exporter, prom: PrometheusRig) -> None:
    """After wait_for_scrape, an instant query returns the exporter's value and target labels."""
    exporter.gauge.labels(room="lab").set(42)
    prom.wait_for_scrape()
    [series] = prom.wait_for('rig_temperature{room="lab"}')
    assert series["metric"] == {
        "__name__": "rig_temperature",
        "room": "lab",
        "job": "forwarder",
        "instance": exporter.target,
    }
    assert float(series["value"][1]) == 42
    exporter.gauge.labels(room="lab").set(7)
    prom.wait_for_fresh_scrape(timeout=10)
    assert prom.value('sum(rig_temperature{room="lab"})') == 7


def test_rate_of_a_counter_has_data_after_two_scrapes(
    exporter: Exporter, prom: PrometheusRig
) -> None:
    """rate() over a counter the exporter exposes returns a series once two scrapes happened."""
    prom.wait_for_scrape(scrapes=2)
    exporter.counter.inc(5)
    prom.wait_for_fresh_scrape(timeout=10)
    assert prom.value("rig_events_total") >= 5
    assert prom.value("sum(rate(rig_events_total[1m]))") > 0
    assert prom.value("scalar(up)") == 1  # scalars come back in the same shape as vectors


def test_rule_files_are_loaded_and_evaluated(exporter: Exporter, prom: PrometheusRig) -> None:
    """Recording and alerting rules from rule_files run every second and report healthy."""
    exporter.gauge.labels(room="boiler").set(90)
    prom.wait_for("rig:events:rate1m")
    [alert] = prom.wait_for('ALERTS{alertname="RigTooHot", alertstate="firing"}', timeout=15)
    assert alert["metric"]["room"] == "boiler"
    rules = prom.rules()
    assert {(r["group"], r["name"]) for r in rules} == {
        ("rig", "rig:events:rate1m"),
        ("rig", "RigTooHot"),
    }
    assert {r["health"] for r in rules} == {"ok"}


def test_bad_promql_raises_prometheus_message(prom: PrometheusRig) -> None:
    """A query Prometheus cannot parse raises PrometheusQueryError with its parse error."""
    with pytest.raises(PrometheusQueryError, match=r"bad_data: .*parse error"):
        prom.query("sum(rate(rig_events_total[1m])")


def test_missing_binary_fails_loudly() -> None:
    """Without the binary the rig raises (so CI fails) and says how to install it."""
    rig = PrometheusRig("127.0.0.1:9", binary="prometheus-not-installed-here")
    with pytest.raises(PrometheusRigError, match="apt-get install prometheus"):
        rig.start()
    assert not rig.is_running()


def test_wait_times_out_with_diagnostics_and_stop_cleans_up() -> None:
    """An unscraped target makes wait_for_scrape fail at its deadline; stop is safe twice."""
    rig = PrometheusRig(f"127.0.0.1:{free_port()}", job="nothing-here")
    with rig:
        with pytest.raises(PrometheusRigError, match=r"still \[\] after 0.5s; targets"):
            rig.wait_for_scrape(timeout=0.5)
        workdir = rig._dir
        assert workdir is not None
        assert workdir.exists()
        assert rig.is_running()
    assert not rig.is_running()
    assert not workdir.exists()
    rig.stop()
