"""Results and dead letters are CloudEvents (Kafka protocol binding, binary mode), read with the
`cloudevents` SDK from real records that `forwarder forward` wrote to the real broker."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable

from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event
from cloudevents.core.formats.json import JSONFormat

from forwarder.config import Settings
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.kafka_helpers import Record, read_topic
from tests.support.service_helpers import forwarder_env, run_forwarder

MakeSettings = Callable[..., Settings]


class _RawFormat(JSONFormat):
    """Dead letters' data is the raw line (application/octet-stream): kept as bytes."""

    def read_data(self, body: bytes, content_type: str | None) -> object:
        if content_type == "application/octet-stream":
            return body
        return super().read_data(body, content_type)


def _event(record: Record) -> object:
    message = KafkaMessage(headers=record.headers, key=record.key, value=record.value or b"")
    return from_binary_event(message, _RawFormat())


def test_every_record_is_a_cloudevent_with_stable_ids(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """Each results and dead-letter record parses with the SDK; ids are unique per record within
    the batch's source, and the same when the batch is forwarded a second time."""
    settings = make_settings()
    good = [
        json.dumps({"custom_id": f"c{n}", "batch_id": batch_id, "status": "succeeded"})
        for n in range(1, 9)
    ]
    fake_datagrid.configure(batch_id, lines=[*good[:4], "{not json", *good[4:], "[1, 2]"])
    env = forwarder_env(settings)
    for _ in range(2):
        done = run_forwarder(env, "forward", batch_id)
        assert done.returncode == 0, done.stdout + done.stderr

    results = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    dead = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.dead_letter_topic))
    assert len(results) == 16 and len(dead) == 4
    for records, kind in ((results, "result"), (dead, "dead_letter")):
        ids = Counter()
        for record in records:
            event = _event(record)
            assert event.get_specversion() == "1.0"
            assert event.get_type() == f"com.datagrid.batch_prediction.{kind}.v1"
            assert (
                event.get_source() == f"{settings.datagrid_base_url}/batch-predictions/{batch_id}"
            )
            line = record.headers["datagrid-line"].decode()
            assert event.get_id() == f"{batch_id}:{line}"
            assert event.get_time() is not None
            ids[event.get_id()] += 1
            if kind == "result":
                assert event.get_data() == json.loads(record.value or b"")
            else:
                assert event.get_data() == record.value
        # Two forwards: every id twice, and as many ids as distinct lines.
        assert set(ids.values()) == {2} and len(ids) == len(records) // 2
    # The time is the batch's, not the forward's: both copies of a line carry the same one.
    times = {(r.headers["ce_id"], r.headers["ce_time"]) for r in results}
    assert len(times) == 8


def test_cloudevents_can_be_turned_off(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """FORWARDER_CLOUDEVENTS=false: no ce_* header on results or dead letters, the rest as ever."""
    settings = make_settings(cloudevents=False)
    good = json.dumps({"custom_id": "c1", "batch_id": batch_id, "status": "succeeded"})
    fake_datagrid.configure(batch_id, lines=[good, "{not json"])
    done = run_forwarder(forwarder_env(settings), "forward", batch_id)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    (dead,) = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.dead_letter_topic))
    assert not [h for h in (*result.headers, *dead.headers) if h.startswith("ce_")]
    assert result.headers["datagrid-line"] == b"1" and dead.headers["datagrid-line"] == b"2"
