"""Two installs on one Prometheus stay apart: the chart's alert rules and the dashboard.

One real Prometheus scrapes the pods of three installs of release ``fwd``, labelled as the
prometheus-operator labels what the chart's ServiceMonitor finds (``namespace``, ``pod``, and
``job`` = the Service's name): ``staging`` (one pod up, one down), ``production`` (one pod up) and
``dev`` (its only pod down). Each pod that is up is a :class:`Metrics` registry driven to a known
state. The rules loaded are the PrometheusRules ``helm template`` renders for the release in each
of the three namespaces, exactly as the operator would hand them to Prometheus.

The states are chosen so that merging would show: production forwards many batches and staging
fails half of its few, so a fleet-wide failure ratio (3%) would stay silent while staging's own
(50%) fires; production's errored-line ratio (5%) is under the threshold while staging's (50%)
is far above it; the lags differ, so a merged dashboard sum would be neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forwarder.observability import Metrics
from tests.prometheus_rig import PrometheusRig, free_port, serve_registry
from tests.test_dashboard import dashboard_queries, load_dashboard, substitute, variable_queries
from tests.test_helm import only, render

RELEASE_JOB = "fwd-forwarder"  # the Service's name for release "fwd": the ServiceMonitor's job
NAMESPACES = ("staging", "production", "dev")
#: staging's rules carry a routing label, to show each install's tuning stays its own.
STAGING_TEAM = "prometheusRule.alertLabels.team=staging-team"


def _rules_for(namespace: str, directory: Path) -> Path:
    """The PrometheusRule the chart renders for release fwd in ``namespace``, as a rule file."""
    sets = ["prometheusRule.enabled=true"]
    if namespace == "staging":
        sets.append(STAGING_TEAM)
    objects = render("default-values.yaml", sets=tuple(sets), namespace=namespace)
    spec = only(objects, "PrometheusRule")["spec"]
    path = directory / f"{namespace}-rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _round(staging: Metrics, production: Metrics) -> None:
    """One round of traffic: staging fails half its batches; production is busy and healthy."""
    staging.batches.labels(outcome="forwarded").inc()
    staging.batches.labels(outcome="failed").inc()
    staging.lines_forwarded.labels(status="succeeded").inc(5)
    staging.lines_forwarded.labels(status="errored").inc(5)
    production.batches.labels(outcome="forwarded").inc(30)
    production.lines_forwarded.labels(status="succeeded").inc(95)
    production.lines_forwarded.labels(status="errored").inc(5)
    production.dead_letters.labels(reason="too_large").inc()
    production.webhooks.labels(outcome="unavailable").inc()


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusRig]:
    """Prometheus scraping the three installs, with each install's chart-rendered rules loaded."""
    directory = tmp_path_factory.mktemp("rules")
    rule_files = [_rules_for(namespace, directory) for namespace in NAMESPACES]
    staging, production = Metrics(), Metrics()
    staging.jobs_lag.labels(partition="0").set(3)
    production.jobs_lag.labels(partition="0").set(7)
    for metrics in (staging, production):
        metrics.ready.set(1)

    def labels(namespace: str, pod: str) -> dict[str, str]:
        return {"namespace": namespace, "job": RELEASE_JOB, "pod": f"{RELEASE_JOB}-{pod}"}

    with (
        serve_registry(staging.registry) as staging_a,
        serve_registry(production.registry) as production_a,
    ):
        staging_b, dev_a = (f"127.0.0.1:{free_port()}" for _ in range(2))  # nothing listens
        targets = {
            staging_a: labels("staging", "a"),
            staging_b: labels("staging", "b"),  # down
            production_a: labels("production", "a"),
            dev_a: labels("dev", "a"),  # dev's only pod: down
        }
        with PrometheusRig(targets, rule_files=rule_files) as rig:
            rig.wait_for_scrape(targets=2)
            _round(staging, production)
            rig.wait_for_fresh_scrape(targets=2)
            _round(staging, production)
            rig.wait_for_fresh_scrape(targets=2)
            yield rig


def _alerts(prom: PrometheusRig, name: str) -> list[dict[str, str]]:
    """The labels of every pending or firing instance of alert ``name`` (after rules ran)."""
    result = prom.wait_for(f'ALERTS{{alertname="{name}"}}', timeout=20)
    return sorted(
        (
            {k: v for k, v in r["metric"].items() if k not in ("__name__", "alertstate")}
            for r in result
        ),
        key=lambda labels: sorted(labels.items()),
    )


def _namespaces(alerts: list[dict[str, str]]) -> list[str | None]:
    return [alert.get("namespace") for alert in alerts]


def test_each_install_loads_only_its_own_rules(prom: PrometheusRig) -> None:
    """Every rendered rule is healthy, and each install's rules select only its namespace."""
    rules = prom.rules()
    assert rules and {r["health"] for r in rules} <= {"ok", "unknown"}, rules
    for rule in rules:
        namespaces = {ns for ns in NAMESPACES if f'namespace="{ns}"' in rule["query"]}
        assert len(namespaces) == 1, rule["query"]
        assert f'job="{RELEASE_JOB}"' in rule["query"]


def test_forwarder_down_warns_per_pod_and_pages_only_for_a_namespace_all_down(
    prom: PrometheusRig,
) -> None:
    """One pod down in staging warns; dev's only pod down also pages; production stays quiet."""
    alerts = _alerts(prom, "ForwarderDown")
    warnings = [a for a in alerts if a["severity"] == "warning"]
    pages = [a for a in alerts if a["severity"] == "critical"]
    assert sorted((a["namespace"], a["pod"]) for a in warnings) == [
        ("dev", f"{RELEASE_JOB}-a"),
        ("staging", f"{RELEASE_JOB}-b"),
    ]
    assert [(a["namespace"], a["job"]) for a in pages] == [("dev", RELEASE_JOB)]


def test_ratio_alerts_are_per_namespace_never_merged(prom: PrometheusRig) -> None:
    """staging's 50% failure and errored ratios fire for staging alone, with its own labels."""
    failing = _alerts(prom, "ForwarderBatchFailureRatioHigh")
    assert failing == [
        {
            "alertname": "ForwarderBatchFailureRatioHigh",
            "namespace": "staging",
            "job": RELEASE_JOB,
            "severity": "critical",
            "team": "staging-team",
        }
    ]
    assert _namespaces(_alerts(prom, "ForwarderErroredLinesRatioHigh")) == ["staging"]
    assert _namespaces(_alerts(prom, "ForwarderBatchesFailed")) == ["staging"]
    staging = 'forwarder_batches_total{namespace="staging"'
    ratio = prom.value(f'sum(rate({staging}, outcome="failed"}}[5m])) / sum(rate({staging}}}[5m]))')
    assert ratio == pytest.approx(0.5)


def test_production_alerts_stay_in_production(prom: PrometheusRig) -> None:
    """Production's dead letters and refused webhooks alert for production only, per label."""
    [dead] = _alerts(prom, "ForwarderDeadLetters")
    assert (dead["namespace"], dead["reason"]) == ("production", "too_large")
    assert "team" not in dead  # staging's routing label does not leak into production's rules
    [refused] = _alerts(prom, "ForwarderWebhooksRefused")
    assert (refused["namespace"], refused["outcome"]) == ("production", "unavailable")


def _panel(queries: dict[str, str], title: str) -> str:
    [expr] = [expr for key, expr in queries.items() if key.startswith(f"{title} [")]
    return expr


def test_dashboard_queries_return_only_the_chosen_namespace(prom: PrometheusRig) -> None:
    """With $namespace set, panels show that install's own numbers; an unknown one shows none."""
    expected = {
        # panel: (staging, production, dev); merged would be (2, 2, ...) or (10, ...)
        "Targets up": (1, 1, 0),
        "Ready": (1, 1, None),
        "Jobs lag": (3, 7, None),
        "Errored lines": (0.5, 0.05, None),
    }
    for i, namespace in enumerate(NAMESPACES):
        queries = dashboard_queries(namespace=namespace, job=RELEASE_JOB, rate_interval="5m")
        for title, values in expected.items():
            result = prom.query(_panel(queries, title))
            if values[i] is None:
                assert result == [], (namespace, title)
            else:
                [series] = result
                assert float(series["value"][1]) == pytest.approx(values[i]), (namespace, title)
    nowhere = dashboard_queries(namespace="nowhere", job=RELEASE_JOB)
    shown = {key: prom.query(expr) for key, expr in nowhere.items()}
    assert {key: result for key, result in shown.items() if result} == {}


def test_dashboard_variables_list_each_namespace_and_its_own_pods(prom: PrometheusRig) -> None:
    """$namespace lists the installs that report; $job and $pod list only the chosen one's."""
    queries = variable_queries(load_dashboard())

    def values(variable: str, **chosen: str) -> set[Any]:
        result = prom.query(substitute(queries[variable], {"cluster": "", **chosen}))
        return {r["metric"].get(variable) for r in result}

    assert values("namespace") == {"staging", "production"}  # dev has no pod reporting
    assert values("job", namespace="staging") == {RELEASE_JOB}
    assert values("pod", namespace="staging", job=RELEASE_JOB) == {f"{RELEASE_JOB}-a"}
    [instance] = values("instance", namespace="production", job=RELEASE_JOB, pod=".*")
    assert instance in prom.labelled_targets
    assert prom.labelled_targets[instance]["namespace"] == "production"
