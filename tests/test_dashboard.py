"""Checks of the Grafana dashboard (deploy/grafana/forwarder-dashboard.json).

Static checks: it imports anywhere (a ``${datasource}`` variable of type prometheus on every
panel and target, no ``__inputs`` that file provisioning would leave unresolved), it is laid out
cleanly, and every metric it reads is one :class:`forwarder.observability.Metrics` exports. Then
every panel query runs on a real Prometheus scraping a ``Metrics`` registry and must return data.

:func:`dashboard_queries` gives every panel query with Grafana's variables substituted, for the
end-to-end test that evaluates them against a Prometheus scraping ``forwarder serve``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder.observability import (
    DEAD_LETTER_REASONS,
    LINE_STATUSES,
    WEBHOOK_OUTCOMES,
    Metrics,
)
from tests.prometheus_rig import (
    PrometheusRig,
    exported_metric_names,
    referenced_metrics,
    serve_registry,
)

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "forwarder-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Series Prometheus itself adds to every scrape; the dashboard may read them too.
SCRAPE_SERIES = {"up"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def load_dashboard() -> dict[str, Any]:
    """The dashboard JSON as a dict."""
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _raw_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    }


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's ``$name``, ``${name}`` and ``${name:fmt}``; an unknown name raises."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(replace, expr)


def dashboard_queries(
    *,
    rate_interval: str = "1m",
    cluster: str = "",
    namespace: str = ".*",
    job: str = "forwarder",
    pod: str = ".*",
    instance: str = ".+",
) -> dict[str, str]:
    """Every panel target's PromQL, keyed ``"<panel title> [<refId>]"``, ready to evaluate.

    ``$__rate_interval`` becomes ``rate_interval``; ``$cluster``, ``$namespace``, ``$job``,
    ``$pod`` and ``$instance`` (regex matchers in the dashboard) become the given values. The
    defaults of ``pod`` and ``instance`` are what Grafana's "All" sends; ``""`` for ``cluster`` is
    what Grafana sends when no series has the label (its "None"), and like ``.*`` for
    ``namespace`` it matches series without the label (a Prometheus outside Kubernetes).
    """
    variables = {
        "__rate_interval": rate_interval,
        "cluster": cluster,
        "namespace": namespace,
        "job": job,
        "pod": pod,
        "instance": instance,
    }
    return {
        key: substitute(expr, variables) for key, expr in _raw_queries(load_dashboard()).items()
    }


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Each query variable's ``label_values(selector, label)`` as the PromQL Grafana runs."""
    out = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert match, f"variable {variable['name']} is not label_values(selector, label)"
        out[variable["name"]] = f"count by ({match.group(2)}) ({match.group(1)})"
    return out


# --- static checks -----------------------------------------------------------------------------


def test_dashboard_is_json_with_a_fixed_uid_and_unique_panel_ids() -> None:
    """The file parses, keeps its uid and schema version; panel ids and target refIds are unique."""
    dashboard = load_dashboard()
    assert dashboard["uid"] == "datagrid-forwarder"
    assert dashboard["schemaVersion"] == 39
    assert dashboard.get("id") is None  # a database id from an export would clash on import
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_datasource_is_a_prometheus_variable_not_an_import_input() -> None:
    """A ``datasource`` variable of type prometheus, and no ``__inputs`` provisioning can't fill."""
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "__inputs" not in dashboard
    assert "${DS_" not in DASHBOARD.read_text()


def test_every_panel_target_and_variable_uses_the_datasource_variable() -> None:
    """Every panel with queries, its targets and each query variable use ``${datasource}``."""
    dashboard = load_dashboard()
    with_targets = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert with_targets
    for panel in with_targets:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


#: The dashboard's filter variables, in the order each narrows the next.
FILTERS = ("cluster", "namespace", "job", "pod", "instance")


def test_every_selector_filters_by_cluster_namespace_job_pod_and_instance() -> None:
    """Each selector carries the $cluster, $namespace, $job, $pod and $instance matchers."""
    for key, expr in _raw_queries(load_dashboard()).items():
        selectors = _SELECTOR.findall(expr)
        assert {name for name, _ in selectors} == referenced_metrics(expr), key
        for name, matchers in selectors:
            for variable in FILTERS:
                assert f'{variable}=~"${variable}"' in matchers, (key, name, variable)


def test_filter_variables_chain_from_cluster_to_instance() -> None:
    """Cluster, then namespace (each one at a time) come first; each variable lists values within
    those before it."""
    variables = [v for v in load_dashboard()["templating"]["list"] if v["type"] == "query"]
    assert [v["name"] for v in variables] == list(FILTERS)
    for one_at_a_time in variables[:2]:  # "None" (no such label) sends "", matching its absence
        assert one_at_a_time["multi"] is False and one_at_a_time["includeAll"] is False
    assert variables[2]["multi"] is False, "one job at a time: panels sum over it"
    for i, variable in enumerate(variables):
        for earlier in FILTERS[:i]:
            assert f'{earlier}=~"${earlier}"' in variable["query"]["query"], variable["name"]
        assert variable["definition"] == variable["query"]["query"]
    # "All" pods must also match series without a pod label (no Kubernetes).
    assert variables[3]["allValue"] == ".*"


def test_legends_name_pods_not_instances() -> None:
    """A series per target is labelled with its pod (what kubectl knows), never its instance
    (the pod's IP and port); it is still grouped by instance, so targets without a pod label
    (outside Kubernetes) are not summed together."""
    per_target = 0
    for panel in _panels(load_dashboard()):
        for target in panel.get("targets", []):
            legend = target.get("legendFormat", "")
            assert "{{instance}}" not in legend, panel["title"]
            if "{{pod}}" in legend:
                per_target += 1
                assert re.match(r"\w+ by \(pod, instance(, \w+)*\) \(", target["expr"]), panel[
                    "title"
                ]
    assert per_target >= 5, "no per-pod legend found: the scan is broken"


def test_every_metric_read_is_exported_by_metrics() -> None:
    """Every metric a panel or variable reads is a series name Metrics() (or the scrape) exposes."""
    dashboard = load_dashboard()
    exported = exported_metric_names(Metrics().registry) | SCRAPE_SERIES
    exprs = [*_raw_queries(dashboard).values(), *variable_queries(dashboard).values()]
    read = set().union(*(referenced_metrics(e) for e in exprs))
    assert read, "no metric found: the PromQL scan is broken"
    assert read <= exported, sorted(read - exported)


def test_every_forwarder_metric_has_a_panel() -> None:
    """Each forwarder_* family Metrics() defines appears in at least one panel query."""
    read = set().union(*(referenced_metrics(e) for e in _raw_queries(load_dashboard()).values()))
    families = {f.name for f in Metrics(process=False).registry.collect()}
    missing = {f for f in families if not any(name.startswith(f) for name in read)}
    assert not missing, sorted(missing)


def test_rates_use_rate_interval_and_quantiles_aggregate_by_le() -> None:
    """rate() windows are $__rate_interval; histogram_quantile sums bucket rates by (..., le)."""
    for key, expr in _raw_queries(load_dashboard()).items():
        for window in re.findall(r"\brate\([^\[]*\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", key
        for inner in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,(.*)\)$", expr):
            assert re.match(r"\s*sum by \((\w+, )*le\) \(rate\(\w+_bucket\{", inner), key


def test_panels_fit_the_grid_without_overlapping() -> None:
    """Every panel lies within Grafana's 24 columns and no two panels cover the same cell."""
    taken: dict[tuple[int, int], str] = {}
    for panel in _panels(load_dashboard()):
        pos = panel["gridPos"]
        assert pos["w"] > 0, panel["title"]
        assert 0 <= pos["x"] <= pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, (panel["title"], taken.get((x, y)))
                taken[x, y] = panel["title"]


def test_dashboard_queries_substitute_every_variable() -> None:
    """dashboard_queries() leaves no Grafana variable and fills in the given values."""
    queries = dashboard_queries(
        rate_interval="2m", cluster="c1", namespace="ns", job="fw", pod="fw-0", instance="a:1"
    )
    assert len(queries) == len(_raw_queries(load_dashboard())) >= 20
    for expr in queries.values():
        assert "$" not in expr
        matchers = (
            'cluster=~"c1"',
            'namespace=~"ns"',
            'job=~"fw"',
            'pod=~"fw-0"',
            'instance=~"a:1"',
        )
        for matcher in matchers:
            assert matcher in expr
    assert any("[2m]" in expr for expr in queries.values())
    with pytest.raises(KeyError, match=r"\$missing"):
        substitute("up{a=$missing}", {})


# --- against a real Prometheus -----------------------------------------------------------------


def _exercise(metrics: Metrics) -> None:
    """Touch every label set a busy service would: lines, dead letters, failures, webhooks."""
    for status in LINE_STATUSES:
        metrics.lines_forwarded.labels(status=status).inc(10)
    for reason in DEAD_LETTER_REASONS:
        metrics.dead_letters.labels(reason=reason).inc()
    for outcome in ("forwarded", "failed", "duplicate"):
        metrics.batches.labels(outcome=outcome).inc()
    for outcome in WEBHOOK_OUTCOMES:
        metrics.webhooks.labels(outcome=outcome).inc()
    for code in ("200", "503", "error"):
        metrics.on_upstream_response(code, 0.02)
    metrics.retries.labels(reason="upstream_unavailable").inc()
    metrics.stream_restarts.inc()
    metrics.blank_lines.inc()
    metrics.forward_delay.observe(42)
    metrics.batch_duration.observe(1.5)
    metrics.produce_latency.observe(0.004)
    metrics.jobs_lag.labels(partition="0").set(3)
    metrics.jobs_lag_seconds.set(12)
    metrics.batches_in_flight.set(1)
    metrics.batches_waiting.set(2)
    metrics.ready.set(1)
    metrics.state_batches.set(4)
    metrics.build_info.labels(version="0.0.0", revision="test").set(1)
    for route, code in (("/webhooks/datagrid", "202"), ("/webhooks/datagrid", "503")):
        metrics.http_requests.labels(route=route, method="POST", code=code).inc()
        metrics.http_duration.labels(route=route).observe(0.01)
    metrics.reconcile_runs.labels(outcome="ok").inc()
    metrics.reconcile_batches.inc()
    metrics.ratelimit_wait.inc(0.5)


@pytest.fixture(scope="module")
def scraped() -> Iterator[PrometheusRig]:
    """A real Prometheus that has scraped a busy Metrics() registry a few times."""
    metrics = Metrics()
    with serve_registry(metrics.registry) as target, PrometheusRig(target) as prom:
        _exercise(metrics)
        prom.wait_for_fresh_scrape()
        _exercise(metrics)  # again after a scrape, so rates and quantiles are not 0 or NaN
        prom.wait_for_fresh_scrape()
        yield prom


def test_every_panel_query_returns_finite_data(scraped: PrometheusRig) -> None:
    """Each panel query is valid PromQL and returns a finite value from the scraped registry."""
    empty, not_finite = [], []
    for key, expr in dashboard_queries().items():
        result = scraped.query(expr)
        if not result:
            empty.append(key)
        elif not any(math.isfinite(float(r["value"][1])) for r in result):
            not_finite.append(key)
    assert {"empty": empty, "not finite": not_finite} == {"empty": [], "not finite": []}


def test_variables_find_the_job_and_instance(scraped: PrometheusRig) -> None:
    """Outside Kubernetes the variables list the scraped job and instance, and no cluster or
    namespace."""
    queries = variable_queries(load_dashboard())
    values = {"cluster": "", "namespace": ".*", "job": "forwarder", "pod": ".*"}
    # count by (label) gives one series without the label: Grafana lists no value for it.
    [cluster] = scraped.query(substitute(queries["cluster"], values))
    assert cluster["metric"] == {}
    [namespace] = scraped.query(substitute(queries["namespace"], values))
    assert namespace["metric"] == {}
    [job] = scraped.query(substitute(queries["job"], values))
    assert job["metric"] == {"job": "forwarder"}
    [pod] = scraped.query(substitute(queries["pod"], values))
    assert pod["metric"] == {}
    [instance] = scraped.query(substitute(queries["instance"], values))
    assert instance["metric"]["instance"] == scraped.target
