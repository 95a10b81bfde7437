"""NDJSON framing helpers (``forwarder.ndjson``): byte order marks and complete last lines."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from forwarder.ndjson import BOM, Oversized, is_complete_object, without_bom


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _joined(*parts: bytes) -> bytes:
    return b"".join([chunk async for chunk in without_bom(_chunks(*parts))])


@pytest.mark.parametrize(
    "parts",
    [
        (BOM + b'{"custom_id":"a"}\n',),
        (BOM[:1], BOM[1:2], BOM[2:] + b'{"custom_id":"a"}\n'),
        (BOM[:2], BOM[2:], b'{"custom_id":"a"}\n'),
    ],
)
async def test_a_bom_before_line_one_is_dropped_however_it_is_split(parts: tuple[bytes]) -> None:
    """The mark goes, wherever the chunk boundaries fall; the line is intact."""
    assert await _joined(*parts) == b'{"custom_id":"a"}\n'


async def test_only_a_leading_bom_is_dropped() -> None:
    """A BOM-like prefix that is not one, a BOM later in the body and short bodies pass as sent."""
    assert await _joined(b"\xef\xbb", b"x\n") == b"\xef\xbbx\n"
    assert await _joined(b"a\n" + BOM, b"b\n") == b"a\n" + BOM + b"b\n"
    assert await _joined(b"\xef") == b"\xef"
    assert await _joined() == b""


def test_a_cut_object_is_never_complete() -> None:
    """Every proper prefix of an object line fails; the whole line passes."""
    line = b'{"custom_id":"a","status":"succeeded","response":{"x":[1,2,{"y":"z"}]}}'
    assert is_complete_object(line)
    assert not any(is_complete_object(line[:cut]) for cut in range(len(line)))
    assert not is_complete_object(b"[1,2]") and not is_complete_object(Oversized(b"{", 10))
