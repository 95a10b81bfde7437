"""Baseline 2: aiokafka's batch API, ``create_batch()``/``send_batch()`` with our own partitioning.

One open ``BatchBuilder`` per partition; each line is appended to its key's partition (murmur2,
computed here, no cache); a full builder is handed to ``send_batch`` and a new one started.  One
future per batch (~800 lines), not per line.  Same producer settings and headers as the service.
"""

from __future__ import annotations

import asyncio
import sys

from aiokafka import AIOKafkaProducer

from bench._common import CONTENT_TYPE, PRODUCER_OPTIONS, decode_head, parser, stream_lines
from forwarder.kafka import partition_for


async def run(args: object) -> int:
    """Forward one batch; return the number of lines sent."""
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, **PRODUCER_OPTIONS)  # type: ignore[attr-defined]
    await producer.start()
    topic = args.topic  # type: ignore[attr-defined]
    sent = 0
    futures: list[asyncio.Future[object]] = []
    try:
        n_partitions = len(await producer.partitions_for(topic))
        builders = [producer.create_batch() for _ in range(n_partitions)]
        prefix = [("datagrid-batch-id", args.batch_id.encode()), CONTENT_TYPE]  # type: ignore[attr-defined]
        with_headers = not args.no_headers  # type: ignore[attr-defined]
        async for lines in stream_lines(args.base_url, args.api_key, args.batch_id):  # type: ignore[attr-defined]
            for line in lines:
                head = decode_head(line)
                key = head.custom_id.encode()
                sent += 1
                headers = (
                    [
                        *prefix,
                        ("datagrid-status", (head.status or "").encode()),
                        ("datagrid-line", str(sent).encode()),
                    ]
                    if with_headers
                    else []
                )
                p = partition_for(key, n_partitions)
                if builders[p].append(key=key, value=line, timestamp=None, headers=headers) is None:
                    futures.append(await producer.send_batch(builders[p], topic, partition=p))
                    builders[p] = producer.create_batch()
                    if (
                        builders[p].append(key=key, value=line, timestamp=None, headers=headers)
                        is None
                    ):
                        raise SystemExit(f"line {sent} does not fit an empty batch")
                # Keep memory bounded: let go of acknowledged batches now and then.
                if len(futures) > 64:
                    await futures[0]
                    futures = [f for f in futures if not f.done() or f.exception()]
        for p, builder in enumerate(builders):
            if builder.record_count():
                futures.append(await producer.send_batch(builder, topic, partition=p))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    sent = asyncio.run(run(args))
    print(f"sent {sent} lines", file=sys.stderr)


if __name__ == "__main__":
    main()
