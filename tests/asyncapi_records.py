"""Pytest plugin: every record the session wrote to the test broker matches ``docs/asyncapi.yaml``.

Registered by ``tests/conftest.py``. Every test that uses the session broker (``kafka_bootstrap``)
also gets a session fixture whose teardown, after the last such test, reads every per-test topic
created during the session (``results-<hex>``, ``dlq-<hex>``, ``state-<hex>``, ``jobs-<hex>``, see
``settings_for``), aborted transactions' records included (read_uncommitted: the forwarder wrote
those too), and checks each record against its channel's schemas. A mismatch is an error at that
teardown, which fails the run and names the offending records.

What must validate, and why:

* results: key, headers and payload, always. Only the forwarder writes there. A line that says
  ``"object": "batch_prediction.result"`` must also have Datagrid's documented shape (the fake's
  generated lines do); hand-written test lines without it only need what the forwarder checks.
  The key must be the payload's ``custom_id``, the headers must agree with the payload.
* dead letters: key and headers. The payload is the offending line's raw bytes by design.
* state: key and payload (a JSON state record or a tombstone); the key is the record's batch id.
* jobs: any producer may write there, and tests deliberately write garbage to check that the
  forwarder skips it. So the rule is agreement: a value the forwarder's parser accepts must
  validate against the ``job`` or ``bareBatchId`` message, and a value it refuses must not. That
  keeps the document and the parser describing the same language.

Topics on other brokers (the fault suite's private ones) are not read here.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from forwarder.errors import ForwarderError
from forwarder.jobs import parse_job

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
#: Per-test topics (``settings_for``), optionally with a tag appended by a test.
TOPIC = re.compile(r"^(results|dlq|state|jobs)-[0-9a-f]{10}(-[A-Za-z0-9._-]+)?$")
#: Problems listed in the failure message (all are counted).
SHOWN = 25
#: What the audit checked, for the terminal summary.
_SUMMARY: list[str] = []


@dataclass(frozen=True)
class RawRecord:
    """A record as Kafka holds it: headers as a list, so repeated names stay visible."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def where(self) -> str:
        """Topic, partition, offset and key, for a failure message."""
        return f"{self.topic}[{self.partition}]@{self.offset} key={self.key!r}"


class Contract:
    """The message schemas of ``docs/asyncapi.yaml``, ready to check records against.

    jsonschema-rs, not jsonschema: the suite writes tens of thousands of records, and the pure
    Python validator needs milliseconds for each (microseconds here).
    """

    def __init__(self, doc: dict[str, Any] | None = None) -> None:
        self.doc = doc if doc is not None else load_document()
        self._validators: dict[str, Any] = {}

    def _validator(self, pointer: str) -> Any:
        """A validator for the schema at ``pointer``, its $refs resolved within the document."""
        validator = self._validators.get(pointer)
        if validator is None:
            # The document itself is the root schema (so "#/components/..." resolves), with a
            # $ref to the part wanted; in draft 7 the keys beside a $ref are ignored.
            root = {**self.doc, "$ref": f"#{pointer}"}
            validator = jsonschema_rs.Draft7Validator(root)
            self._validators[pointer] = validator
        return validator

    def errors(self, pointer: str, instance: Any) -> list[str]:
        """Why ``instance`` does not match the schema at ``pointer`` (empty if it does)."""
        validator = self._validator(pointer)
        if validator.is_valid(instance):
            return []
        return [
            f"{'/'.join(map(str, e.instance_path)) or '<root>'}: {e.message[:200]}"
            for e in validator.iter_errors(instance)
        ]

    def message(self, name: str, part: str) -> str:
        """Pointer to a message's ``payload``, ``headers`` or ``key`` (Kafka binding) schema."""
        base = f"/components/messages/{name}"
        return f"{base}/bindings/kafka/key" if part == "key" else f"{base}/{part}"

    def problems(self, kind: str, record: RawRecord) -> list[str]:
        """What is wrong with ``record`` from a topic of ``kind`` (results/dlq/state/jobs)."""
        check = {
            "results": self._results,
            "dlq": self._dead_letter,
            "state": self._state,
            "jobs": self._job,
        }[kind]
        return check(record)

    def _key_and_headers(
        self, message: str, record: RawRecord
    ) -> tuple[str | None, dict[str, str], list[str]]:
        out: list[str] = []
        key = _text(record.key)
        if key is None:
            out.append("key: missing or not UTF-8")
        else:
            out += [f"key: {e}" for e in self.errors(self.message(message, "key"), key)]
        headers: dict[str, str] = {}
        for name, raw in record.headers:
            value = _text(raw)
            if value is None:
                out.append(f"header {name}: not UTF-8")
                continue
            if name in headers:
                out.append(f"header {name}: repeated")
            headers[name] = value
        if message in ("resultLine", "deadLetter"):
            pointer = self.message(message, "headers")
            out += [f"headers/{e}" for e in self.errors(pointer, headers)]
        return key, headers, out

    def _results(self, record: RawRecord) -> list[str]:
        key, headers, out = self._key_and_headers("resultLine", record)
        payload, error = _json(record.value)
        if error:
            return [*out, f"payload: {error}"]
        out += [f"payload/{e}" for e in self.errors(self.message("resultLine", "payload"), payload)]
        if isinstance(payload, dict):
            if key is not None and payload.get("custom_id") != key:
                out.append(f"key {key!r} is not the payload's custom_id")
            if "batch_id" in payload and payload["batch_id"] != headers.get("datagrid-batch-id"):
                out.append("payload batch_id is not the datagrid-batch-id header")
            status = payload.get("status")
            if headers.get("datagrid-status") != (status if isinstance(status, str) else ""):
                out.append("datagrid-status header is not the payload's status")
        return out + _cloudevent_agrees(headers)

    def _dead_letter(self, record: RawRecord) -> list[str]:
        key, headers, out = self._key_and_headers("deadLetter", record)
        if record.value is None:
            out.append("payload: null (a dead letter holds the line's bytes)")
        if key is not None and headers.get("datagrid-batch-id") != key:
            out.append("datagrid-batch-id header is not the key")
        return out + _cloudevent_agrees(headers)

    def _state(self, record: RawRecord) -> list[str]:
        key, _headers, out = self._key_and_headers("batchState", record)
        if record.value is None:  # a tombstone
            return out + self.errors(self.message("batchStateTombstone", "payload"), None)
        payload, error = _json(record.value)
        if error:
            return [*out, f"payload: {error}"]
        out += [f"payload/{e}" for e in self.errors(self.message("batchState", "payload"), payload)]
        if isinstance(payload, dict) and key is not None and payload.get("batch_id") != key:
            out.append("key is not the record's batch_id")
        return out

    def _job(self, record: RawRecord) -> list[str]:
        try:
            job = parse_job(record.value)
        except ForwarderError:
            accepted = None
        else:
            accepted = job.batch_id
        message, errors = self.job_errors(record.value)
        if accepted is not None and errors:
            return [f"the forwarder accepts this job but the {message} schema does not: {errors}"]
        if accepted is None and not errors:
            return [f"the forwarder refuses this job but it matches the {message} schema"]
        # The key should be the batch id; external producers may leave it out (documented).
        if accepted is not None and record.key is not None and _text(record.key) != accepted:
            return [f"key is not the job's batch id {accepted!r}"]
        return []

    def job_errors(self, value: bytes | None) -> tuple[str, list[str]]:
        """Which jobs message ``value`` is (``job`` or ``bareBatchId``) and why it does not match.

        How a jobs-topic value is read: surrounding ASCII whitespace is ignored; a value starting
        with ``{`` is a JSON job, one starting with ``"`` a JSON string, anything else plain text.
        """
        if value is None:
            return "bareBatchId", ["null value"]
        text = value.strip()
        if text[:1] == b"{":
            payload, error = _json(text)
            if error:
                return "job", [error]
            return "job", self.errors(self.message("job", "payload"), payload)
        if text[:1] == b'"':
            payload, error = _json(text)
            bare = payload if isinstance(payload, str) else None
            if bare is None:
                return "bareBatchId", [error or "not a JSON string"]
        else:
            bare = _text(text)
            if bare is None:
                return "bareBatchId", ["not UTF-8"]
        return "bareBatchId", self.errors(self.message("bareBatchId", "payload"), bare)


def load_document() -> dict[str, Any]:
    """``docs/asyncapi.yaml`` as data."""
    with DOC_PATH.open(encoding="utf-8") as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _json(raw: bytes | None) -> tuple[Any, str | None]:
    if raw is None:
        return None, "null value"
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"not UTF-8 JSON ({str(exc)[:100]})"


async def topic_partitions(bootstrap: str) -> dict[str, list[int]]:
    """Every topic on the cluster with its partition numbers."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = await admin.list_topics()
        described = await admin.describe_topics(names) if names else []
    finally:
        await admin.close()
    return {
        entry["topic"]: sorted(p["partition"] for p in entry["partitions"])
        for entry in described
        if entry["error_code"] == 0
    }


async def read_records(
    bootstrap: str, tps: list[TopicPartition], timeout: float = 120.0
) -> list[RawRecord]:
    """Every record of ``tps`` up to their current ends, aborted transactions' included."""
    if not tps:
        return []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_uncommitted",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[RawRecord] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = {tp for tp, end in ends.items() if end > 0}
        while pending:
            if loop.time() > deadline:
                raise TimeoutError(f"reading the session's topics: {len(pending)} unfinished")
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, records in batches.items():
                out.extend(
                    RawRecord(tp.topic, tp.partition, r.offset, r.key, r.value, tuple(r.headers))
                    for r in records
                    if r.offset < ends[tp]
                )
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


def kind_of(topic: str) -> str | None:
    """``results``/``dlq``/``state``/``jobs`` for a per-test topic name, else None."""
    match = TOPIC.match(topic)
    return match.group(1) if match else None


def audit(contract: Contract, records: list[RawRecord]) -> Iterator[str]:
    """One line per bad record: where it is and what is wrong."""
    for record in records:
        kind = kind_of(record.topic)
        if kind is None:
            continue
        problems = contract.problems(kind, record)
        if problems:
            yield f"{record.where()}: " + "; ".join(problems)


@pytest.fixture(scope="session")
def _asyncapi_records(kafka_bootstrap: str) -> Iterator[None]:
    """After the session's last broker test: every record on its topics matches the document."""
    contract = Contract()  # load (and fail on a broken document) before any test runs
    before = set(asyncio.run(topic_partitions(kafka_bootstrap)))
    yield
    now = asyncio.run(topic_partitions(kafka_bootstrap))
    topics = sorted(t for t in now if t not in before and kind_of(t))
    tps = [TopicPartition(t, p) for t in topics for p in now[t]]
    records = asyncio.run(read_records(kafka_bootstrap, tps))
    bad = list(audit(contract, records))
    _SUMMARY.append(f"{len(records) - len(bad)} of {len(records)} records on {len(topics)} topics")
    if bad:
        shown = "\n".join(bad[:SHOWN])
        more = f"\n... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        pytest.fail(
            f"{len(bad)} of {len(records)} records on {len(topics)} topics do not match "
            f"docs/asyncapi.yaml:\n{shown}{more}",
            pytrace=False,
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how much the audit checked, so a pass is visibly not vacuous."""
    for line in _SUMMARY:
        terminalreporter.write_line(f"asyncapi: {line} match docs/asyncapi.yaml")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test that uses the session broker the audit fixture (torn down before it)."""
    for item in items:
        names = getattr(item, "fixturenames", None)
        if names is not None and "kafka_bootstrap" in names and "_asyncapi_records" not in names:
            names.append("_asyncapi_records")


def _cloudevent_agrees(headers: dict[str, str]) -> list[str]:
    """The CloudEvents id and source name the same batch and line as the datagrid-* headers."""
    batch, line = headers.get("datagrid-batch-id"), headers.get("datagrid-line")
    out = []
    if headers.get("ce_id") != f"{batch}:{line}":
        out.append("ce_id is not <datagrid-batch-id>:<datagrid-line>")
    if not headers.get("ce_source", "").endswith(f"/batch-predictions/{batch}"):
        out.append("ce_source does not name the batch")
    return out
