"""The failure-policy table of ``docs/reliability.md``, generated from the classification itself
(``forwarder.errors`` and ``forwarder.kafka.CONFIG_PROBLEMS``), never written by hand.

``python -m tests.failure_policy_doc`` rewrites the part between the ``policy:begin`` and
``policy:end`` markers; ``tests/unit/test_failure_policy_doc.py`` fails when it is stale.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from forwarder import errors
from forwarder.errors import OUTCOMES, ForwarderError, Retry
from forwarder.kafka import CONFIG_PROBLEMS

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
BEGIN, END = "<!-- policy:begin -->", "<!-- policy:end -->"
_KIND = {
    Retry.BACKOFF: "retriable",
    Retry.NEVER: "permanent",
    Retry.CONFIG: "permanent (configuration)",
    Retry.LATER: "later",
    Retry.HAND_OFF: "hand-off",
}


def _tree(cls: type[ForwarderError], depth: int = 0) -> list[tuple[int, type[ForwarderError]]]:
    rows = [(depth, cls)]
    for sub in sorted(cls.__subclasses__(), key=lambda c: c.__name__):
        if sub.__module__ == errors.__name__:
            rows += _tree(sub, depth + 1)
    return rows


def _kind(cls: type[ForwarderError]) -> Retry:
    """The class's kind: its attribute, or what its constructor sets (Kafka errors)."""
    if cls is errors.KafkaError:
        return Retry.BACKOFF
    if issubclass(cls, errors.KafkaError):
        return cls(*(["x"] * _positional(cls))).retry
    return cls.retry


def _positional(cls: type) -> int:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return sum(1 for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")


def render() -> str:
    """The generated section: kinds, the error tree, then aiokafka's errors we translate."""
    lines = ["| kind | what the forwarder does |", "|---|---|"]
    lines += [f"| {_KIND[kind]} | {OUTCOMES[kind]} |" for kind in Retry]
    lines += ["", "| error | code | kind |", "|---|---|---|"]
    for depth, cls in _tree(ForwarderError):
        name = "&nbsp;&nbsp;" * depth + f"`{cls.__name__}`"
        lines.append(f"| {name} | `{cls.code}` | {_KIND[_kind(cls)]} |")
    lines += ["", "| Kafka's error (aiokafka) | translated to | why no retry can mend it |"]
    lines += ["|---|---|---|"]
    for kind, meaning in CONFIG_PROBLEMS.items():
        lines.append(f"| `{kind.__name__}` | `KafkaConfigProblem` (configuration) | {meaning} |")
    lines.append(
        "| any other (timeouts, leader changes, a lost connection) | `KafkaError` | retriable "
        "when aiokafka says so; a send to a topic that no longer exists is `TopicMissing` |"
    )
    return "\n".join([BEGIN, *lines, END])


def rewrite(text: str) -> str:
    """``text`` with its generated section replaced by :func:`render`'s."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + render() + tail


def main() -> int:
    DOC.write_text(rewrite(DOC.read_text()))
    print(f"rewrote the failure policy in {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
