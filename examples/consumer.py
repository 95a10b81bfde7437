"""A downstream consumer of datagrid-forwarder's topics, done right (see docs/consumers.md).

What it shows (aiokafka for Kafka, SQLite from the standard library as the sink):

* reads the results and dead-letter topics in one consumer group with
  ``isolation_level="read_committed"`` (needed in exactly-once mode, harmless otherwise);
* writes each result to an idempotent sink: a SQLite table whose primary key is
  (``datagrid-batch-id`` header, record key), so duplicates (at-least-once redelivery, replays)
  change nothing; dead letters are keyed by (batch id, ``datagrid-line``);
* commits Kafka offsets only after the sink has committed (a crash re-reads, never loses);
* follows the compacted state topic to know when a batch is complete: its state says
  ``forwarded`` and this consumer has read the results and dead-letter partitions up to where
  they ended when that state was read (every line is written before its batch's state);
* tolerates format evolution: ignores unknown fields and headers, counts unknown statuses.

Run it::

    python examples/consumer.py --bootstrap localhost:9092 --until-complete bpred_1 bpred_2

It prints one line per completed or failed batch and exits 0 once every batch named by
``--until-complete`` is complete (1 if one failed or ``--timeout`` passed). Without
``--until-complete`` it runs until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

KNOWN_STATUSES = {"succeeded", "errored", "canceled", "expired"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; topic defaults are the forwarder's defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", default="localhost:9092", help="Kafka bootstrap servers")
    p.add_argument("--results-topic", default="datagrid.batch-results")
    p.add_argument("--dead-letter-topic", default="datagrid.batch-results.dlq")
    p.add_argument("--state-topic", default="datagrid.batch-state")
    p.add_argument("--group", default="example-results-consumer", help="consumer group id")
    p.add_argument("--db", default=":memory:", help="SQLite file of the sink (default: memory)")
    p.add_argument("--until-complete", nargs="*", default=[], metavar="BATCH_ID")
    p.add_argument("--timeout", type=float, default=0, help="give up after SECONDS (0: never)")
    return p.parse_args(argv)


class Sink:
    """An idempotent sink: a second copy of a line is a no-op, so duplicates never count twice."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path)
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS results (
                batch_id TEXT, custom_id TEXT, status TEXT, line INTEGER, output TEXT,
                PRIMARY KEY (batch_id, custom_id));
            CREATE TABLE IF NOT EXISTS dead_letters (
                batch_id TEXT, line INTEGER, reason TEXT, detail TEXT, value BLOB,
                PRIMARY KEY (batch_id, line));
            """
        )
        self.duplicates: Counter[str] = Counter()

    def result(self, batch_id: str, custom_id: str, status: str, line: int, output: str) -> None:
        """Store one result line unless this (batch, custom_id) is already stored."""
        cur = self.db.execute(
            "INSERT INTO results VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (batch_id, custom_id, status, line, output),
        )
        if cur.rowcount == 0:
            self.duplicates[batch_id] += 1

    def dead_letter(self, batch_id: str, line: int, reason: str, detail: str, value: bytes) -> None:
        """Store one dead letter unless this (batch, line) is already stored."""
        cur = self.db.execute(
            "INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (batch_id, line, reason, detail, value),
        )
        if cur.rowcount == 0:
            self.duplicates[batch_id] += 1

    def summary(self, batch_id: str) -> tuple[Counter[str], Counter[str]]:
        """Stored lines by status and dead letters by reason, for one batch."""
        q = "SELECT {0}, COUNT(*) FROM {1} WHERE batch_id = ? GROUP BY {0}"
        lines = Counter(dict(self.db.execute(q.format("status", "results"), (batch_id,))))
        dead = Counter(dict(self.db.execute(q.format("reason", "dead_letters"), (batch_id,))))
        return lines, dead

    def commit(self) -> None:
        """Make the writes durable (before the Kafka offsets are committed)."""
        self.db.commit()


def headers_of(record: Any) -> dict[str, str]:
    """Headers as text; unknown ones are kept and simply not used."""
    return {k: v.decode("utf-8", "replace") for k, v in record.headers}


def handle(sink: Sink, record: Any, results_topic: str) -> None:
    """Write one results or dead-letter record to the sink."""
    headers = headers_of(record)
    batch_id = headers["datagrid-batch-id"]
    line = int(headers["datagrid-line"])
    if record.topic == results_topic:
        # The key is the line's custom_id; the value is Datagrid's JSON line, unknown fields
        # included. Read the fields you need and ignore the rest.
        custom_id = record.key.decode()
        line_status = headers["datagrid-status"]
        status = line_status if line_status in KNOWN_STATUSES else "other"
        output = json.loads(record.value).get("output")  # the prediction, if succeeded
        sink.result(batch_id, custom_id, status, line, json.dumps(output))
    else:
        # A dead letter's value is raw bytes (maybe not JSON, maybe not UTF-8): keep it for a
        # human, with the reason; never parse it as a result.
        reason = headers["forwarder-error"]
        sink.dead_letter(batch_id, line, reason, headers["forwarder-error-detail"], record.value)


class StateFollower:
    """The compacted state topic read from the beginning: the latest state of every batch."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=None,  # no group: every partition, in every instance
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",  # no committed offsets: always from the beginning
        )
        self.states: dict[str, dict[str, Any] | None] = {}

    async def poll(self) -> list[str]:
        """Read what is new; return the batch ids whose state changed."""
        changed = []
        for records in (await self.consumer.getmany(timeout_ms=200)).values():
            for record in records:
                batch_id = record.key.decode()
                # A null value is a tombstone: the batch's state was deleted.
                self.states[batch_id] = json.loads(record.value) if record.value else None
                changed.append(batch_id)
        return changed


class Completion:
    """Which batches this consumer has seen all of, from the state topic and its positions.

    Every line of a batch is written before the batch's terminal state record. So when that
    record is read, note where our results and dead-letter partitions end; once our positions
    reach those offsets, we have every line of the batch. (With several instances in the group,
    each one knows this for its own partitions.)
    """

    def __init__(self) -> None:
        self.terminal: set[str] = set()  # latest state forwarded or failed, not reported yet
        self.marks: dict[str, dict[TopicPartition, int]] = {}  # batch -> end offsets to reach
        self.done: dict[str, str] = {}  # batch -> its final status, once reported

    def state_changed(self, batch_id: str, record: dict[str, Any] | None) -> None:
        """A new state record (or tombstone) for ``batch_id``."""
        self.marks.pop(batch_id, None)  # a newer state (a replay) needs a new mark
        if record and record["status"] in ("forwarded", "failed"):
            self.terminal.add(batch_id)
            self.done.pop(batch_id, None)
        else:
            self.terminal.discard(batch_id)

    async def complete(self, consumer: AIOKafkaConsumer) -> list[str]:
        """The terminal batches whose lines we have now all read."""
        assigned = consumer.assignment()
        if not assigned:
            return []  # not in the group yet: nothing to compare with
        for batch_id in self.terminal:
            if batch_id not in self.marks or not self.marks[batch_id].keys() <= assigned:
                self.marks[batch_id] = await consumer.end_offsets(sorted(assigned))
        finished = []
        for batch_id, ends in list(self.marks.items()):
            if all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                del self.marks[batch_id]
                self.terminal.discard(batch_id)
                finished.append(batch_id)
        return finished


async def run(args: argparse.Namespace) -> int:
    """Consume until every ``--until-complete`` batch is done (or forever without any)."""
    sink = Sink(args.db)
    consumer = AIOKafkaConsumer(
        args.results_topic,
        args.dead_letter_topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,  # commit after the sink, below
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    state = StateFollower(args.bootstrap, args.state_topic)
    completion = Completion()
    wanted = set(args.until_complete)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout if args.timeout else None
    try:
        await consumer.start()
        await state.consumer.start()
        while not wanted or not wanted <= completion.done.keys():
            if deadline is not None and loop.time() > deadline:
                missing = sorted(wanted - completion.done.keys())
                print(f"timeout: not complete: {missing}", flush=True)
                return 1
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batches.values():
                for record in records:
                    handle(sink, record, args.results_topic)
            sink.commit()
            if batches:
                await consumer.commit()  # only now: the sink has the records
            for batch_id in await state.poll():
                completion.state_changed(batch_id, state.states[batch_id])
            for batch_id in await completion.complete(consumer):
                completion.done[batch_id] = report(batch_id, state.states[batch_id] or {}, sink)
        return 0 if all(completion.done[b] == "forwarded" for b in wanted) else 1
    finally:
        await state.consumer.stop()
        await consumer.stop()


def report(batch_id: str, record: dict[str, Any], sink: Sink) -> str:
    """Print one line about a finished batch; return its status."""
    status: str = record["status"]
    if status == "failed":
        error = record.get("error") or {}
        print(f"{batch_id}: failed: {error.get('code')}: {error.get('detail')}", flush=True)
        return status
    lines, dead = sink.summary(batch_id)
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(lines.items()))
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(dead.items()))
    print(
        f"{batch_id}: complete: {sum(lines.values())} results ({by_status}), "
        f"{sum(dead.values())} dead letters ({by_reason}), "
        f"{sink.duplicates[batch_id]} duplicates ignored",
        flush=True,
    )
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    try:
        return asyncio.run(run(parse_args(argv)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
