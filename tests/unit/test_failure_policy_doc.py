"""docs/reliability.md's failure policy is the one the code classifies (generated, never stale)."""

from __future__ import annotations

from tests.failure_policy_doc import DOC, render, rewrite


def test_the_documented_policy_is_generated_from_the_classification() -> None:
    """Regenerating the table changes nothing: run `python -m tests.failure_policy_doc` if not."""
    text = DOC.read_text()
    assert render() in text
    assert rewrite(text) == text
