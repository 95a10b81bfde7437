"""Baseline 3: confluent-kafka (librdkafka), what a performance-minded user would write instead.

Streams the results with httpx, splits lines on bytes, decodes ``custom_id``/``status`` with msgspec
(the same decoder as the other baselines) and hands each line to ``Producer.produce`` with the
service's four headers.  librdkafka does the rest in C on its own threads: murmur2 partitioning
(``murmur2_random``: Java's partitioner), batching (linger 5 ms, 256 KiB batches), idempotence,
``acks=all``.  One delivery callback per line counts failures; ``flush()`` waits for every ack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import httpx
from confluent_kafka import KafkaError, Message, Producer

from bench._common import CONTENT_TYPE, decode_head


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every baseline takes (as ``bench._common.parser``)."""
    p = argparse.ArgumentParser(description=description)
    for name in ("--base-url", "--api-key", "--batch-id", "--bootstrap", "--topic"):
        p.add_argument(name, required=True)
    return p


def _stream_lines(url: str, headers: dict[str, str]) -> Iterator[list[bytes]]:
    """The results stream as lists of complete lines (``\\n`` split on bytes, ``\\r`` dropped)."""
    with httpx.Client(timeout=60) as client, client.stream("GET", url, headers=headers) as response:
        response.raise_for_status()
        tail = b""
        for chunk in response.iter_bytes():
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            yield [line[:-1] if line[-1:] == b"\r" else line for line in lines if line]
        if tail.strip():
            yield [tail.rstrip(b"\r")]


def run(args: Any) -> int:
    """Forward one batch; return the number of lines sent."""
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "client.id": "bench-confluent",
            "partitioner": "murmur2_random",
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "batch.size": 262_144,
            "message.max.bytes": 1_048_588 + 512,
        }
    )
    failures: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error)

    topic = args.topic
    prefix = [("datagrid-batch-id", args.batch_id.encode()), CONTENT_TYPE]
    url = f"{args.base_url.rstrip('/')}/batch-predictions/{args.batch_id}/results"
    request_headers = {"Authorization": f"Bearer {args.api_key}", "Accept": "application/x-ndjson"}
    sent = 0
    produce = producer.produce
    for lines in _stream_lines(url, request_headers):
        for line in lines:
            head = decode_head(line)
            sent += 1
            headers = [
                *prefix,
                ("datagrid-status", (head.status or "").encode()),
                ("datagrid-line", str(sent).encode()),
            ]
            while True:
                try:
                    produce(
                        topic,
                        line,
                        head.custom_id.encode(),
                        headers=headers,
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:  # librdkafka's queue is full: serve acks, then retry
                    producer.poll(0.05)
        producer.poll(0)  # serve delivery callbacks once per chunk
    if producer.flush(60):
        raise SystemExit("flush timed out with messages still in the queue")
    if failures:
        raise SystemExit(f"{len(failures)} deliveries failed, first: {failures[0]}")
    return sent


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    sent = run(args)
    print(f"sent {sent} lines", file=sys.stderr)


if __name__ == "__main__":
    main()
