"""NDJSON framing and the hot-path look-up of a result line's routing fields.

Lines are split on the byte ``\\n`` only (a trailing ``\\r`` is dropped), never on text: JSON
strings may
hold raw U+2028/U+0085, which ``str.splitlines`` and ``httpx``'s ``aiter_lines`` treat as line
breaks,
and a chunk boundary may fall inside a multi-byte character or between ``\\r`` and ``\\n``.

Memory is bounded: a line longer than ``max_line_bytes`` is not accumulated; its first bytes are
kept
(for the dead-letter record) and the rest only counted, as an :class:`Oversized` line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import msgspec

__all__ = [
    "UNSET",
    "LineHead",
    "LineSplitter",
    "Oversized",
    "classify",
    "decode_head",
    "is_blank",
    "is_complete_object",
    "without_bom",
]

_NL: Final = b"\n"
_CR: Final = b"\r"
#: What a blank line may hold (``is_blank``; the publisher inlines the same test).
WHITESPACE: Final = b" \t\r\n\f\v"


#: A UTF-8 byte order mark: not part of any JSON text (RFC 8259 lets a parser ignore one); some
#: exporters write one before the first line, which would otherwise dead-letter line 1.
BOM: Final = b"\xef\xbb\xbf"


async def without_bom(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream's chunks with a byte order mark at its very start removed (however the first
    chunks split it); nothing else is changed."""
    head: bytes | None = b""
    async for chunk in chunks:
        if head is None:
            yield chunk
            continue
        head += chunk
        if len(head) < len(BOM) and BOM.startswith(head):
            continue  # maybe a BOM still arriving
        yield head.removeprefix(BOM)
        head = None
    if head:
        yield head


def is_complete_object(line: bytes | Oversized) -> bool:
    """True when ``line`` is a whole JSON object: the last line of a close-delimited body is one
    unless the connection was cut (a cut object never parses)."""
    if isinstance(line, Oversized):
        return False
    try:
        return isinstance(msgspec.json.decode(line), dict)
    except (msgspec.DecodeError, RecursionError):
        return False


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line longer than the splitter keeps: its first bytes and its full length."""

    prefix: bytes
    size: int


class LineSplitter:
    """Turns arbitrary byte chunks into complete lines, terminator removed.

    ``feed`` returns the lines that a chunk completes; ``close`` returns the last line if the stream
    did not end with a newline.  Lines are ``bytes``, or :class:`Oversized` past ``max_line_bytes``.
    """

    __slots__ = ("_cr", "_max", "_overflow", "_parts", "_size")

    def __init__(self, max_line_bytes: int) -> None:
        self._max = max_line_bytes
        self._parts: list[bytes] = []  # pieces of the unfinished line
        self._size = 0  # bytes seen of the unfinished line (including those not kept)
        self._overflow = False
        self._cr = False  # the last byte seen of the unfinished line is "\r" (kept or not)

    def feed(self, chunk: bytes) -> list[bytes | Oversized]:
        """Add a chunk; return the lines it completes, in order."""
        pieces = chunk.split(_NL)
        if len(pieces) == 1:
            self._hold(chunk)
            return []
        tail = pieces.pop()
        if self._parts or self._overflow:
            self._hold(pieces[0])
        out: list[bytes | Oversized] = list(pieces)
        if self._parts or self._overflow:
            out[0] = self._take()
        max_line = self._max
        for index, line in enumerate(out):
            if type(line) is bytes:
                if line[-1:] == _CR:
                    line = out[index] = line[:-1]
                if len(line) > max_line:
                    out[index] = Oversized(line[:max_line], len(line))
        if tail:
            self._hold(tail)
        return out

    def close(self) -> list[bytes | Oversized]:
        """End of stream: the final line, if it had no newline."""
        if not self._parts and not self._overflow:
            return []
        line = self._take()
        if type(line) is bytes:
            if line[-1:] == _CR:
                line = line[:-1]
            if len(line) > self._max:
                return [Oversized(line[: self._max], len(line))]
        return [line]

    @property
    def buffered(self) -> int:
        """Bytes held for the unfinished line (bounded by ``max_line_bytes``)."""
        return sum(len(part) for part in self._parts)

    def _hold(self, piece: bytes) -> None:
        if not piece:
            return
        self._size += len(piece)
        self._cr = piece[-1:] == _CR
        if self._overflow:
            return
        kept = self._size - len(piece)
        if self._size > self._max:
            # Keep only what fits, and from now on count without storing.
            self._parts.append(piece[: self._max - kept])
            self._overflow = True
        else:
            self._parts.append(piece)

    def _take(self) -> bytes | Oversized:
        data = b"".join(self._parts)
        size, overflow, cr = self._size, self._overflow, self._cr
        self._parts, self._size, self._overflow, self._cr = [], 0, False, False
        if overflow:
            if cr:
                # A final "\r" is the terminator's (past the cap, so never kept), not content.
                size -= 1
                if size == self._max:
                    return data + _CR  # exactly the cap after all: a line (callers drop the \r)
            return Oversized(data, size)
        return data


def is_blank(line: bytes) -> bool:
    """Empty or whitespace-only lines are skipped, never dead-lettered."""
    return not line or (line[0] in WHITESPACE and not line.strip(WHITESPACE))


class LineHead(msgspec.Struct):
    """The three fields routing needs; the rest of the line is validated but not decoded."""

    custom_id: object = None
    status: object = None
    batch_id: object = msgspec.UNSET


# float_hook=float: a number too large for a double (1e400) is still JSON (inf), as in Python,
# rather than a ValidationError that would read as "not an object".
decode_head = msgspec.json.Decoder(LineHead, float_hook=float).decode
#: A head's ``batch_id`` when the line has none.
UNSET: Final = msgspec.UNSET
_decode_any = msgspec.json.Decoder(float_hook=float).decode


def classify(line: bytes, batch_id: str) -> tuple[str, str] | LineHead:
    """The line's routing head, or ``(reason, detail)`` when it must be dead-lettered."""
    try:
        head = decode_head(line)
    except msgspec.ValidationError:
        # The typed decoder stops at the first token that is not "{", so "[1,2" or "[" * 100_000
        # land here too: only a full parse (on this error path alone) tells them from real JSON.
        try:
            _decode_any(line)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            return "invalid_json", _short(str(exc))
        return "not_an_object", "line is JSON but not an object"
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        return "invalid_json", _short(str(exc))
    if not line.isascii():
        # msgspec skips the fields it does not decode without checking their UTF-8; JSON must be
        # UTF-8 (RFC 8259), and consumers will decode the whole value. isascii() keeps this cheap.
        try:
            line.decode()
        except UnicodeDecodeError as exc:
            return "invalid_json", _short(f"line is not valid UTF-8: {exc}")
    custom_id = head.custom_id
    if type(custom_id) is not str or not custom_id:
        return "missing_custom_id", "custom_id is missing, empty or not a string"
    if head.batch_id is not msgspec.UNSET and head.batch_id != batch_id:
        return "batch_id_mismatch", _short(f"line batch_id {head.batch_id!r} is not {batch_id!r}")
    return head


def _short(text: str, limit: int = 200) -> str:
    """Header-sized detail: one line, bounded."""
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
