"""What the baseline scripts share: producer settings, the NDJSON stream, partitioning, headers.

The baselines are what a competent engineer would write in an afternoon with the same libraries,
and deliberately do none of the service's work (validation, dead letters, re-stream bookkeeping,
state).  They produce the *same records* as the service: same topic, same key (``custom_id``),
same value (the line's bytes), same partition (Kafka's murmur2) and by default the same four
headers (batch id, content type, line status, line number).

The one thing the aiokafka baselines take from ``forwarder/`` is Kafka's partitioner,
``forwarder.kafka.partition_for`` (``bench.check_records`` compares it with aiokafka's murmur2),
imported where it is used, not here: it pulls in ``forwarder.config`` and aiokafka, which the
confluent-kafka baseline, whose librdkafka partitions by itself, does without.  They always
import it from the work tree, even under ``--ref``: see ``Rig.baseline_env``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

__all__ = [
    "CONTENT_TYPE",
    "PRODUCER_OPTIONS",
    "Head",
    "decode_head",
    "parser",
    "stream_lines",
]

#: The service's producer settings (``forwarder.kafka.make_producer`` with default Settings):
#: idempotent, acks=all, linger 5 ms, 256 KiB batches, requests up to the topic limit.
PRODUCER_OPTIONS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 5,
    "max_batch_size": 262_144,
    "max_request_size": 1_048_588 + 512,
    "request_timeout_ms": 30_000,
    "client_id": "bench-baseline",
}

CONTENT_TYPE = ("content-type", b"application/json")


class Head(msgspec.Struct):
    """The two fields a forwarder needs from a line (the rest is skipped, not decoded)."""

    custom_id: str
    status: str | None = None


decode_head = msgspec.json.Decoder(Head).decode


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every baseline takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--base-url", required=True, help="Datagrid base URL, up to /v1")
    p.add_argument("--api-key", required=True)
    p.add_argument("--batch-id", required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--no-headers", action="store_true", help="send key and value only")
    return p


async def stream_lines(base_url: str, api_key: str, batch_id: str) -> AsyncIterator[list[bytes]]:
    """The results stream as lists of complete lines (``\\n`` split on bytes, ``\\r`` dropped)."""
    url = f"{base_url.rstrip('/')}/batch-predictions/{batch_id}/results"
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/x-ndjson"}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        response.raise_for_status()
        tail = b""
        async for chunk in response.aiter_bytes():
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            yield [line[:-1] if line[-1:] == b"\r" else line for line in lines if line]
        if tail.strip():
            yield [tail.rstrip(b"\r")]
