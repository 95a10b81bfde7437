"""Baseline 1: the plain aiokafka loop, one ``await producer.send()`` per line.

Streams the results with httpx, splits lines on bytes, decodes ``custom_id``/``status`` with msgspec
(the same decoder the service uses) and sends each line with the service's headers.  Delivery is
checked with one done-callback per future (no per-line awaiting, no resume bookkeeping), then
``flush()``.  aiokafka's own partitioner (murmur2) picks the partition.
"""

from __future__ import annotations

import asyncio
import sys

from aiokafka import AIOKafkaProducer

from bench._common import CONTENT_TYPE, PRODUCER_OPTIONS, decode_head, parser, stream_lines


async def run(args: object) -> int:
    """Forward one batch; return the number of lines sent."""
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, **PRODUCER_OPTIONS)  # type: ignore[attr-defined]
    await producer.start()
    failures: list[BaseException] = []

    def on_done(future: asyncio.Future[object]) -> None:
        if future.exception() is not None:
            failures.append(future.exception())  # type: ignore[arg-type]

    sent = 0
    topic = args.topic  # type: ignore[attr-defined]
    prefix = [("datagrid-batch-id", args.batch_id.encode()), CONTENT_TYPE]  # type: ignore[attr-defined]
    with_headers = not args.no_headers  # type: ignore[attr-defined]
    try:
        async for lines in stream_lines(args.base_url, args.api_key, args.batch_id):  # type: ignore[attr-defined]
            for line in lines:
                head = decode_head(line)
                sent += 1
                headers = (
                    [
                        *prefix,
                        ("datagrid-status", (head.status or "").encode()),
                        ("datagrid-line", str(sent).encode()),
                    ]
                    if with_headers
                    else None
                )
                future = await producer.send(
                    topic, line, key=head.custom_id.encode(), headers=headers
                )
                future.add_done_callback(on_done)
        await producer.flush()
    finally:
        await producer.stop()
    if failures:
        raise SystemExit(f"{len(failures)} sends failed, first: {failures[0]!r}")
    return sent


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    sent = asyncio.run(run(args))
    print(f"sent {sent} lines", file=sys.stderr)


if __name__ == "__main__":
    main()
