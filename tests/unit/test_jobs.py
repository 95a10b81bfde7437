"""Job parsing (``forwarder.jobs``): any record that is no job is an InvalidJob, never a crash."""

from __future__ import annotations

import pytest

from forwarder.errors import InvalidJob
from forwarder.jobs import MAX_EVENT_ID, Job, parse_job

HOSTILE = [
    None,
    b"",
    b"   ",
    b"[" * 3000 + b"]" * 3000,  # nests deeper than any decoder's recursion
    b'{"batch_id":' + b"[" * 2000 + b"]" * 2000 + b"}",
    b"\xff\xfe\x00garbage",
    b'{"batch_id": "bpred_1", "replay": "yes"}',
    b'{"batch_id": "bpred_1", "event_id": "' + b"e" * (MAX_EVENT_ID + 1) + b'"}',
    b'{"batch_id": "bpred_1", "source": "' + b"s" * 65 + b'"}',
    b'{"batch_id": "../../etc/passwd"}',
    b'{"batch_id": "bpred_1"' + b" " * 5000 + b"}",  # over the size bound
    b'"\\ud800"',
    b'{"no_batch_id": true}',
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_anything_that_is_no_job_is_an_invalid_job(value: bytes | None) -> None:
    """Undecodable, too deep, too long, wrong types, bad ids: InvalidJob, whatever the cause."""
    with pytest.raises(InvalidJob):
        parse_job(value)


def test_jobs_and_bare_ids_parse() -> None:
    """A JSON job, a bare id and a JSON string id are jobs; the deployment field round-trips."""
    job = Job(batch_id="bpred_1", source="webhook", event_id="evt_1", deployment="g/r")
    assert parse_job(job.encode()) == job
    assert parse_job(b"bpred_2") == Job(batch_id="bpred_2")
    assert parse_job(b'"bpred_3"') == Job(batch_id="bpred_3")


def test_a_decoder_that_recurses_too_deep_gives_an_invalid_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever the decoder raises (RecursionError on a deep record, with another decoder or
    version), parse_job answers InvalidJob, so the worker commits past it."""

    def recurse(_data: bytes) -> Job:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("forwarder.jobs._decode_job", recurse)
    with pytest.raises(InvalidJob, match="RecursionError"):
        parse_job(b'{"batch_id": "bpred_1"}')
