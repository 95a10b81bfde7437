"""What the baseline scripts share: producer settings, the NDJSON stream, murmur2, headers.

The baselines are deliberately independent of ``forwarder/`` (they are what a competent engineer
would write in an afternoon), but they produce the *same records* as the service: same topic, same
key (``custom_id``), same value (the line's bytes), same partition (Kafka's murmur2), and by default
the same four headers (batch id, content type, line status, line number).
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

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


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), unsigned 32-bit.

    About 2x faster than ``aiokafka.partitioner.murmur2`` (one ``struct.unpack_from`` for all
    4-byte words instead of four indexings each); checked equal to it in ``bench/run.py --check``.
    """
    length = len(data)
    m = 0x5BD1E995
    h = 0x9747B28C ^ length
    n = length >> 2
    if n:
        for k in struct.unpack_from(f"<{n}I", data):
            k = (k * m) & 0xFFFFFFFF
            h = ((h * m) ^ ((k ^ (k >> 24)) * m)) & 0xFFFFFFFF
    n4 = n << 2
    rest = length - n4
    if rest:
        if rest == 3:
            h ^= data[n4 + 2] << 16
        if rest >= 2:
            h ^= data[n4 + 1] << 8
        h = ((h ^ data[n4]) * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner for a keyed record: ``toPositive(murmur2(key)) % n``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
