"""A downstream consumer of datagrid-forwarder's topics, done right (see docs/consumers.md).

What it shows (aiokafka for Kafka, SQLite from the standard library as the sink):

* reads the results and dead-letter topics in one consumer group with
  ``isolation_level="read_committed"`` (needed in exactly-once mode, harmless otherwise);
* writes each record to an idempotent sink keyed by the line's identity, the CloudEvents
  (``ce_source``, ``ce_id``) headers: a copy of a line (at-least-once redelivery, a replay)
  changes nothing, while two lines of one batch that share a ``custom_id`` are two results and
  both are stored. Records of a forwarder before 0.3 have no ``ce_*`` headers: they are keyed by
  (``datagrid-batch-id``, ``datagrid-line``), the same identity, and a copy of the same line
  written with and without the headers is still stored once;
* commits Kafka offsets only after the sink has committed (a crash re-reads, never loses);
* follows the compacted state topic to know when a batch is complete: its state says
  ``forwarded`` and this consumer has read the results and dead-letter partitions up to where
  they ended when that state was read (every line is written before its batch's state);
* tolerates format evolution: ignores unknown fields and headers, counts unknown statuses;
* logs in like a production consumer: TLS (``--ssl-cafile``, and ``--ssl-certfile`` with
  ``--ssl-keyfile`` for mutual TLS) and SASL PLAIN or SCRAM (``--sasl-*``; the password is best
  given in the environment variable ``KAFKA_SASL_PASSWORD``, which is never printed).

Run it::

    python examples/consumer.py --bootstrap localhost:9092 --until-complete bpred_1 bpred_2

    KAFKA_SASL_PASSWORD=... python examples/consumer.py --bootstrap kafka:9093 \\
        --security-protocol SASL_SSL --sasl-mechanism SCRAM-SHA-512 --sasl-username reader \\
        --ssl-cafile ca.pem

It prints one line per completed or failed batch and exits 0 once every batch named by
``--until-complete`` is complete (1 if one failed or ``--timeout`` passed). Without
``--until-complete`` it runs until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.helpers import create_ssl_context

KNOWN_STATUSES = {"succeeded", "errored", "canceled", "expired"}
#: The SASL password comes from here unless --sasl-password is given (an option is visible to
#: every user of the machine in the process list; the environment is not).
PASSWORD_VARIABLE = "KAFKA_SASL_PASSWORD"  # noqa: S105 - a variable name, not a password


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
    login = p.add_argument_group("login (as the forwarder's FORWARDER_KAFKA_* settings)")
    login.add_argument(
        "--security-protocol",
        default="PLAINTEXT",
        choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"],
    )
    login.add_argument(
        "--sasl-mechanism",
        default="SCRAM-SHA-512",
        choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"],
    )
    login.add_argument("--sasl-username")
    login.add_argument(
        "--sasl-password",
        # Never the value as a default: --help would print it.
        help=f"SASL password (default: the environment variable {PASSWORD_VARIABLE})",
    )
    login.add_argument("--ssl-cafile", help="CA bundle (PEM) to verify the brokers with")
    login.add_argument("--ssl-certfile", help="client certificate (PEM), for mutual TLS")
    login.add_argument("--ssl-keyfile", help="the client certificate's private key (PEM)")
    args = p.parse_args(argv)
    if args.sasl_password is None:
        args.sasl_password = os.environ.get(PASSWORD_VARIABLE)
    if args.security_protocol.startswith("SASL") and not (
        args.sasl_username and args.sasl_password
    ):
        p.error(
            f"{args.security_protocol} needs --sasl-username and a password ({PASSWORD_VARIABLE})"
        )
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        p.error("--ssl-certfile and --ssl-keyfile go together")
    return args


def kafka_options(args: argparse.Namespace) -> dict[str, Any]:
    """aiokafka's connection and login arguments, the same for every client of this consumer."""
    options: dict[str, Any] = {
        "bootstrap_servers": args.bootstrap,
        "security_protocol": args.security_protocol,
    }
    if args.security_protocol in ("SSL", "SASL_SSL"):
        # Verifies the brokers' certificates and host names (the system CAs without --ssl-cafile).
        options["ssl_context"] = create_ssl_context(
            cafile=args.ssl_cafile, certfile=args.ssl_certfile, keyfile=args.ssl_keyfile
        )
    if args.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = args.sasl_mechanism
        options["sasl_plain_username"] = args.sasl_username
        options["sasl_plain_password"] = args.sasl_password
    return options


class Line:
    """Where a record comes from: its batch and line number, and its identity (source, id)."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.batch_id = headers["datagrid-batch-id"]
        self.number = int(headers["datagrid-line"])
        # The CloudEvents identity: unique per line within its source (the batch), the same on
        # every copy of the line. Without ce_* headers (a forwarder before 0.3), the documented
        # equivalent: the batch and the line number.
        self.source = headers.get("ce_source") or self.batch_id
        self.id = headers.get("ce_id") or str(self.number)


class Sink:
    """An idempotent sink: a second copy of a line is a no-op, so duplicates never count twice.

    Keyed by the line, never by ``custom_id``: a batch may hold two lines with the same
    ``custom_id``, and they are two results. The second key, (batch, line), is the same identity
    spelled without CloudEvents: it makes a copy written by an older forwarder (no ``ce_*``
    headers) and one written by a newer one (a replay after an upgrade) the same row.
    """

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path)
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS results (
                source TEXT, id TEXT, batch_id TEXT, line INTEGER, custom_id TEXT, status TEXT,
                output TEXT, PRIMARY KEY (source, id), UNIQUE (batch_id, line));
            CREATE TABLE IF NOT EXISTS dead_letters (
                source TEXT, id TEXT, batch_id TEXT, line INTEGER, reason TEXT, detail TEXT,
                value BLOB, PRIMARY KEY (source, id), UNIQUE (batch_id, line));
            """
        )
        self.duplicates: Counter[str] = Counter()

    def result(self, line: Line, custom_id: str, status: str, output: str) -> None:
        """Store one result line unless this line is already stored."""
        self._insert("results", line, custom_id, status, output)

    def dead_letter(self, line: Line, reason: str, detail: str, value: bytes) -> None:
        """Store one dead letter unless this line is already stored."""
        self._insert("dead_letters", line, reason, detail, value)

    def _insert(self, table: str, line: Line, *values: object) -> None:
        # ON CONFLICT DO NOTHING without a target: a clash on either key is a copy.
        cur = self.db.execute(
            f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",  # noqa: S608 - a fixed table name
            (line.source, line.id, line.batch_id, line.number, *values),
        )
        if cur.rowcount == 0:
            self.duplicates[line.batch_id] += 1

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
    line = Line(headers)
    if record.topic == results_topic:
        # The key is the line's custom_id; the value is Datagrid's JSON line, unknown fields
        # included. Read the fields you need and ignore the rest.
        custom_id = record.key.decode()
        line_status = headers["datagrid-status"]
        status = line_status if line_status in KNOWN_STATUSES else "other"
        output = json.loads(record.value).get("output")  # the prediction, if succeeded
        sink.result(line, custom_id, status, json.dumps(output))
    else:
        # A dead letter's value is raw bytes (maybe not JSON, maybe not UTF-8): keep it for a
        # human, with the reason; never parse it as a result.
        reason = headers["forwarder-error"]
        sink.dead_letter(line, reason, headers["forwarder-error-detail"], record.value)


class StateFollower:
    """The compacted state topic read from the beginning: the latest state of every batch."""

    def __init__(self, options: dict[str, Any], topic: str) -> None:
        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            topic,
            **options,
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
    options = kafka_options(args)
    consumer = AIOKafkaConsumer(
        args.results_topic,
        args.dead_letter_topic,
        **options,
        group_id=args.group,
        enable_auto_commit=False,  # commit after the sink, below
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    state = StateFollower(options, args.state_topic)
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
