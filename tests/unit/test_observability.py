"""Metric label sets stay closed (``forwarder.observability``), whatever the upstream sends."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from forwarder.observability import Metrics, upstream_code_label
from forwarder.state import MAX_PROBLEM_BYTES, bounded_problem


def test_odd_upstream_statuses_are_counted_by_class() -> None:
    """200 odd statuses give at most a handful of series, not 200."""
    metrics = Metrics(CollectorRegistry(), process=False)
    for code in range(100, 600):
        metrics.on_upstream_response(str(code), 0.01)
    metrics.on_upstream_response("error", 0.01)
    labels = {
        sample.labels["code"]
        for family in metrics.registry.collect()
        if family.name == "forwarder_upstream_requests"
        for sample in family.samples
    }
    assert {"200", "404", "429", "503", "error"} <= labels
    assert len(labels) <= 30 and "418" not in labels and "4xx" in labels
    assert upstream_code_label("999") == "other" and upstream_code_label("abc") == "other"


def test_an_upstream_problem_is_bounded_in_the_state_record() -> None:
    """A huge problem+json keeps its standard members, cut short; a small one is kept whole."""
    small = {"type": "about:blank", "title": "Gone", "status": 410}
    assert bounded_problem(small) == small
    huge = {"title": "x" * 10_000, "status": 500, "blob": ["y" * 1000] * 100}
    kept = bounded_problem(huge)
    assert kept == {"title": "x" * 200, "status": 500, "truncated": True}
    assert len(str(kept)) < MAX_PROBLEM_BYTES
    assert bounded_problem("not a dict") is None
