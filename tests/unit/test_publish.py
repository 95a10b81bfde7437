"""Dead letters as a pure function (``forwarder.publish``): value, headers, and what fits."""

from __future__ import annotations

import pytest

from forwarder.errors import KafkaConfigProblem, Retry
from forwarder.publish import DeadLetterTarget, dead_letter, headers_size

CE = (
    ("ce_specversion", b"1.0"),
    ("ce_source", b"https://x/b1"),
    ("ce_time", b"2026-01-01T00:00:00Z"),
)


def target(room: int) -> DeadLetterTarget:
    return DeadLetterTarget("dlq", b"b1", room, CE, b"b1:")


def test_a_dead_letter_carries_its_place_reason_and_cloudevent() -> None:
    """Headers name the batch, line, reason and detail; the value is the line, whole."""
    value, headers = dead_letter(b"\xffraw", 7, "invalid_json", "not JSON", target(10_000))
    assert value == b"\xffraw"
    named = dict(headers)
    assert named["datagrid-line"] == b"7" and named["forwarder-error"] == b"invalid_json"
    assert named["ce_id"] == b"b1:7" and named["ce_type"].endswith(b".dead_letter.v1")
    assert named["forwarder-error-detail"] == b"not JSON"
    assert named["content-type"] == b"application/octet-stream"


@pytest.mark.parametrize("room", [900, 1500, 3000])
def test_a_line_too_large_is_cut_to_fit_and_says_so(room: int) -> None:
    """Value plus headers never exceed the room; the detail names the kept length, in UTF-8."""
    line = b"x" * 50_000
    value, headers = dead_letter(line, 1, "too_large", "é" * 2000, target(room))
    assert len(value) + headers_size(headers) <= room
    detail = dict(headers)["forwarder-error-detail"].decode()  # whole characters only
    assert detail.endswith(f"; value truncated to the first {len(value)} bytes")
    assert line.startswith(value)


def test_a_topic_too_small_for_the_headers_is_a_configuration_problem() -> None:
    """Never a negative truncation: the dead-letter topic must be mended, nothing is lost."""
    with pytest.raises(KafkaConfigProblem) as caught:
        dead_letter(b"{}", 1, "not_an_object", "x", target(100))
    assert caught.value.retry is Retry.CONFIG and caught.value.topic == "dlq"
