"""`docs/asyncapi.yaml` is valid AsyncAPI 3.0 and describes what the forwarder writes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
from aiokafka import TopicPartition

from forwarder.config import Settings, setting_fields
from forwarder.jobs import Job
from forwarder.observability import LINE_STATUSES
from forwarder.state import BatchState
from forwarder.topics import topic_specs
from tests.asyncapi_records import (
    Contract,
    RawRecord,
    load_document,
    read_records,
    topic_partitions,
)
from tests.conftest import REPO
from tests.support.fake_datagrid import FakeDatagrid, generate_lines
from tests.support.service_helpers import forwarder_env, run_forwarder

VENDOR = REPO / "tests" / "vendor" / "asyncapi"
MakeSettings = Callable[..., Settings]


def official_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((VENDOR / "asyncapi-3.0.0.schema.json").read_text())
    return schema


def test_document_validates_against_the_official_asyncapi_3_schema() -> None:
    """The document is AsyncAPI 3.0.0 and the official JSON Schema finds no error in it."""
    doc = load_document()
    assert doc["asyncapi"] == "3.0.0"
    errors = [
        f"{list(e.absolute_path)}: {e.message[:300]}"
        for e in jsonschema.Draft7Validator(official_schema()).iter_errors(doc)
    ]
    assert errors == []


def test_official_schema_rejects_a_broken_document() -> None:
    """The vendored schema really checks: a channel with an unknown field is refused."""
    doc = load_document()
    doc["channels"]["results"]["partitionCount"] = 3
    assert not jsonschema.Draft7Validator(official_schema()).is_valid(doc)


def test_vendored_schema_is_the_one_named_in_its_provenance() -> None:
    """The vendored file's sha256 is the one PROVENANCE.md records for @asyncapi/specs."""
    digest = hashlib.sha256((VENDOR / "asyncapi-3.0.0.schema.json").read_bytes()).hexdigest()
    provenance = (VENDOR / "PROVENANCE.md").read_text()
    assert f"`{digest}`" in provenance
    assert (VENDOR / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_channels_are_the_default_topic_names() -> None:
    """Each channel's address (and Kafka topic binding) is the topic's default setting."""
    defaults = {name: field.default for name, field in setting_fields().items()}
    channels = load_document()["channels"]
    expected = {
        "results": defaults["results_topic"],
        "deadLetters": defaults["dead_letter_topic"],
        "state": defaults["state_topic"],
        "jobs": defaults["jobs_topic"],
    }
    assert {name: channels[name]["address"] for name in expected} == expected
    assert {name: channels[name]["bindings"]["kafka"]["topic"] for name in expected} == expected


def test_examples_match_their_message_schemas() -> None:
    """Every example in the document validates against its own message's schemas."""
    contract = Contract()
    checked = 0
    for name, message in contract.doc["components"]["messages"].items():
        for example in message.get("examples", []):
            for part in ("payload", "headers"):
                if part in example:
                    errors = contract.errors(contract.message(name, part), example[part])
                    assert errors == [], (name, example["name"], part)
                    checked += 1
    assert checked >= 8


def _record(topic: str, value: bytes | None, key: bytes | None, **headers: str) -> RawRecord:
    return RawRecord(
        topic,
        0,
        0,
        key,
        value,
        tuple(
            (k if k.startswith("ce_") else k.replace("_", "-"), v.encode())
            for k, v in headers.items()
        ),
    )


def _cloudevent(kind: str, line: str) -> dict[str, str]:
    """The CloudEvents headers of batch b1's line ``line``."""
    return {
        "ce_specversion": "1.0",
        "ce_id": f"b1:{line}",
        "ce_source": "https://api.datagrid.com/v1/batch-predictions/b1",
        "ce_type": f"com.datagrid.batch_prediction.{kind}.v1",
        "ce_time": "2026-05-02T08:10:00.120Z",
    }


def test_contract_flags_records_that_drift() -> None:
    """The record checks are not vacuous: each kind of drift is reported."""
    contract = Contract()
    good_line = (
        b'{"object":"batch_prediction.result","batch_id":"b1","custom_id":"c1",'
        b'"status":"succeeded","output":{"x":1},"error":null}'
    )
    result_headers = {
        "datagrid_batch_id": "b1",
        "datagrid_status": "succeeded",
        "datagrid_line": "1",
        "content_type": "application/json",
        **_cloudevent("result", "1"),
    }
    ok = _record("results-0123456789", good_line, b"c1", **result_headers)
    assert contract.problems("results", ok) == []
    drifted = {
        "key is not custom_id": _record("r", good_line, b"c2", **result_headers),
        "unknown status": _record(
            "r", good_line.replace(b'"succeeded"', b'"weird"'), b"c1", **result_headers
        ),
        "output on an errored line": _record(
            "r",
            good_line.replace(b'"succeeded"', b'"errored"'),
            b"c1",
            **{**result_headers, "datagrid_status": "errored"},
        ),
        "line number 0": _record("r", good_line, b"c1", **{**result_headers, "datagrid_line": "0"}),
        "CloudEvents without an id": _record(
            "r", good_line, b"c1", **{k: v for k, v in result_headers.items() if k != "ce_id"}
        ),
        "an id without the other attributes": _record(
            "r", good_line, b"c1", **{k: v for k, v in result_headers.items() if k != "ce_time"}
        ),
        "a dead letter's type": _record(
            "r",
            good_line,
            b"c1",
            **{**result_headers, "ce_type": "com.datagrid.batch_prediction.dead_letter.v1"},
        ),
        "no custom_id": _record("r", b'{"status":"succeeded"}', b"c1", **result_headers),
    }
    for what, record in drifted.items():
        assert contract.problems("results", record), what
    dlq_headers = {
        "datagrid_batch_id": "b1",
        "datagrid_line": "2",
        "forwarder_error": "invalid_json",
        "forwarder_error_detail": "x",
        "content_type": "application/octet-stream",
        **_cloudevent("dead_letter", "2"),
    }
    assert contract.problems("dlq", _record("d", b"\xff", b"b1", **dlq_headers)) == []
    bad_reason = {**dlq_headers, "forwarder_error": "too_long"}
    assert contract.problems("dlq", _record("d", b"\xff", b"b1", **bad_reason))
    state = {"batch_id": "b1", "status": "forwarded", "lines": {"succeeded": 1}}
    assert contract.problems("state", _record("s", json.dumps(state).encode(), b"b1")) == []
    assert contract.problems("state", _record("s", None, b"b1")) == []  # tombstone
    for change in ({"status": "done"}, {"new_field": 1}, {"lines": {"weird": 1}}):
        value = json.dumps({**state, **change}).encode()
        assert contract.problems("state", _record("s", value, b"b1")), change
    assert contract.problems("jobs", _record("j", b'{"batch_id":"b1"}', b"b1")) == []
    assert contract.problems("jobs", _record("j", b"  b1\n", b"b1")) == []
    assert contract.problems("jobs", _record("j", b"{not json", b"bad")) == []  # refused by both
    assert contract.problems("jobs", _record("j", b'{"batch_id":"b1"}', b"other"))


def _read(settings: Settings, *topics: str) -> list[RawRecord]:
    async def read() -> list[RawRecord]:
        known = await topic_partitions(settings.kafka_bootstrap_servers)
        tps = [TopicPartition(t, p) for t in topics for p in known[t]]
        return await read_records(settings.kafka_bootstrap_servers, tps)

    return asyncio.run(read())


def test_forwarded_batch_matches_the_document(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str, tmp_path: Path
) -> None:
    """A batch with lines of every status and every dead-letter reason, its state and its job:
    every record on the four topics validates against its channel's schemas."""
    settings = make_settings()
    statuses = {"statuses": ["succeeded", "errored", "canceled", "expired"]}
    good = [
        line.decode()
        for line in generate_lines(batch_id, {"count": 8, "line_bytes": 200, **statuses})
    ]
    bad = [
        '{"custom_id": "broken"',  # invalid_json
        "[1, 2]",  # not_an_object
        '{"status": "succeeded"}',  # missing_custom_id
        '{"custom_id": "c", "batch_id": "bpred_other"}',  # batch_id_mismatch
        '{"custom_id": "huge", "pad": "' + "x" * 1_100_000 + '"}',  # too_large (1 MB topics)
    ]
    fake_datagrid.configure(batch_id, lines=[*good[:4], *bad, "", *good[4:]])
    env = forwarder_env(settings)
    done = run_forwarder(env, "forward", batch_id)  # creates the topics; enqueue does not
    assert done.returncode == 0, done.stdout + done.stderr
    enqueued = run_forwarder(env, "enqueue", batch_id)
    assert enqueued.returncode == 0, enqueued.stderr

    contract = Contract()
    counts: Counter[str] = Counter()
    for kind, topic in (
        ("results", settings.results_topic),
        ("dlq", settings.dead_letter_topic),
        ("state", settings.state_topic),
        ("jobs", settings.jobs_topic),
    ):
        for record in _read(settings, topic):
            assert contract.problems(kind, record) == [], record.where()
            counts[kind] += 1
    assert counts == {"results": 8, "dlq": 5, "state": 1, "jobs": 1}
    reasons = {
        dict(r.headers)["forwarder-error"] for r in _read(settings, settings.dead_letter_topic)
    }
    assert reasons == {
        b"invalid_json",
        b"not_an_object",
        b"missing_custom_id",
        b"batch_id_mismatch",
        b"too_large",
    }
    assert re.search(
        rb'"status":"forwarded"', _read(settings, settings.state_topic)[0].value or b""
    )


def test_schemas_name_the_same_fields_as_the_code() -> None:
    """BatchState and Job (the code) and their schemas (the document) name the same fields, and
    the state's line counts use the metric's status labels."""
    schemas = load_document()["components"]["schemas"]
    for struct, schema in ((BatchState, "BatchState"), (Job, "Job")):
        fields = {f.encode_name for f in msgspec.structs.fields(struct)}
        assert fields == set(schemas[schema]["properties"]), schema
    labels = schemas["BatchState"]["properties"]["lines"]["propertyNames"]["enum"]
    assert set(labels) == {*LINE_STATUSES, "other"}


def test_state_channel_has_the_topic_config_the_forwarder_creates() -> None:
    """The state channel's cleanup policy and retention are what start-up creates by default."""
    settings = Settings()  # every default: Settings reads no environment itself
    created = topic_specs(settings)[settings.state_topic]
    documented = load_document()["channels"]["state"]["bindings"]["kafka"]["topicConfiguration"]
    assert ",".join(documented["cleanup.policy"]) == created["cleanup.policy"]
    assert str(documented["retention.ms"]) == created["retention.ms"]
