"""Checks of the alerting rules (deploy/prometheus/forwarder-rules.yaml) and their runbooks.

``promtool`` (Debian's ``prometheus`` package) validates the rules and the example scrape config
and runs the rules' unit tests (forwarder-rules*.test.yaml). A missing promtool fails these tests:
CI installs it, and a skipped alerting check is a silent one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from forwarder.observability import Metrics
from tests.prometheus_rig import exported_metric_names, referenced_metrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "forwarder-rules.yaml"
RULE_TESTS = sorted(PROMETHEUS_DIR.glob("forwarder-rules*.test.yaml"))
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
SEVERITIES = {"critical", "warning"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool (failing the test if it is not installed) and return its result."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found on PATH: apt-get install prometheus")
    return subprocess.run(
        [binary, *args],
        cwd=PROMETHEUS_DIR,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _runbook_anchors() -> dict[str, str]:
    """GitHub's anchor for each ``##`` heading of the runbooks, mapped to the heading."""
    anchors = {}
    for heading in re.findall(r"^## (.+)$", RUNBOOKS.read_text(), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors[slug] = heading
    return anchors


def test_rules_pass_promtool_check() -> None:
    """promtool accepts the rule file: valid YAML, PromQL and templates."""
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_rules_pass_their_unit_tests() -> None:
    """Every promtool unit test passes: each alert fires when it should and only then."""
    assert len(RULE_TESTS) == 2, RULE_TESTS
    result = promtool("test", "rules", *(path.name for path in RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_example_scrape_config_passes_promtool_check() -> None:
    """The example prometheus.yml is valid, scrapes job "forwarder" and loads the rules."""
    result = promtool("check", "config", SCRAPE_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert config["rule_files"] == [RULES.name]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["forwarder"]


def test_every_alert_has_severity_annotations_and_its_runbook_section() -> None:
    """Each alert has a severity, summary, description and a runbook_url to its own section."""
    anchors = _runbook_anchors()
    for alert in _alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        assert annotations["runbook_url"] == f"docs/runbooks.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/runbooks.md has no section '## {name}'"


def test_every_runbook_alert_section_names_an_alert() -> None:
    """No runbook section for an alert that does not exist (renamed or removed)."""
    alerts = {alert["alert"] for alert in _alerts()}
    sections = {h for h in _runbook_anchors().values() if h.startswith("Forwarder")}
    assert sections == alerts


def test_every_alert_is_tested_firing_and_silent() -> None:
    """The unit tests expect each alert both to fire and to stay silent at some time."""
    fires: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        tests = yaml.safe_load(path.read_text())
        assert tests["rule_files"] == [RULES.name], path.name
        for case in tests["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {alert["alert"] for alert in _alerts()}
    assert alerts - fires == set(), "never expected to fire"
    assert alerts - silent == set(), "never expected to stay silent"


_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
_AGGREGATION = re.compile(r"\b(sum|min|max|avg|count)\s*(?:by\s*\(([^)]*)\))?\s*\(")
_THRESHOLD = re.compile(r"(?m)([^\s]*)\s*# threshold$")


def test_every_selector_carries_the_job_matcher() -> None:
    """Each metric selector carries job="forwarder", the matcher the chart scopes per install."""
    for rule in _rules():
        expr = rule["expr"]
        selectors = _SELECTOR.findall(expr)
        assert {name for name, _ in selectors} == referenced_metrics(expr), expr
        for name, matchers in selectors:
            assert 'job="forwarder"' in matchers, (rule.get("alert", rule.get("record")), name)


def test_every_aggregation_keeps_namespace_and_job() -> None:
    """Every sum/max/min/avg/count groups by namespace and job, so installs never merge."""
    found = 0
    for rule in _rules():
        for _, grouping in _AGGREGATION.findall(rule["expr"]):
            found += 1
            labels = {label.strip() for label in grouping.split(",")}
            assert {"namespace", "job"} <= labels, rule["expr"]
    assert found >= 10, "no aggregation found: the scan is broken"


def test_thresholds_are_marked_once_per_alert() -> None:
    """A tunable alert marks exactly one number with "# threshold" (what the chart replaces)."""
    marked = set()
    for alert in _alerts():
        numbers = _THRESHOLD.findall(alert["expr"])
        assert len(numbers) <= 1, alert["alert"]
        for number in numbers:
            float(number)  # the number itself, nothing else, ends the line
            marked.add(alert["alert"])
    assert len(marked) >= 9, marked


def test_every_metric_in_the_rules_is_exported() -> None:
    """Rules read only series Metrics() exports, the scrape's `up`, or the rules' own records."""
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    known = exported_metric_names(Metrics().registry) | {"up"} | recorded
    read = set().union(*(referenced_metrics(rule["expr"]) for rule in _rules()))
    assert read, "no metric found: the PromQL scan is broken"
    assert read <= known, sorted(read - known)
