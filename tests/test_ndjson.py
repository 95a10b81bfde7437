"""NDJSON framing and line classification (pure unit tests)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.ndjson import LineHead, LineSplitter, Oversized, classify, is_blank


def split_all(chunks: list[bytes], max_line: int = 1 << 20) -> list[bytes | Oversized]:
    splitter = LineSplitter(max_line)
    out: list[bytes | Oversized] = []
    for chunk in chunks:
        out.extend(splitter.feed(chunk))
    out.extend(splitter.close())
    return out


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


STREAM = (
    '{"custom_id":"a","s":"caf\u00e9 \u2028 \u0085 \U0001f600"}\r\n'
    "\n"
    "   \t\r\n"
    '{"custom_id":"b"}\n'
    '{"custom_id":"c"}'
).encode()


def test_lf_and_crlf_are_stripped_and_nothing_else() -> None:
    """Each line's bytes come out exactly, minus its \\n or \\r\\n terminator."""
    lines = split_all([STREAM])
    assert lines == [
        '{"custom_id":"a","s":"caf\u00e9 \u2028 \u0085 \U0001f600"}'.encode(),
        b"",
        b"   \t",
        b'{"custom_id":"b"}',
        b'{"custom_id":"c"}',
    ]


def test_raw_u2028_does_not_split_a_line() -> None:
    """U+2028 and U+0085 inside a JSON string are content, not line breaks."""
    assert len(split_all([STREAM])[0].decode().splitlines()) == 3  # str.splitlines would split


def test_final_line_without_newline_is_kept() -> None:
    """A last line with no terminator is still a line."""
    assert split_all([b"x\ny"]) == [b"x", b"y"]
    assert split_all([b"x\n"]) == [b"x"]
    assert split_all([]) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_chunking_gives_the_same_lines(cuts: list[int]) -> None:
    """Chunk boundaries anywhere (inside UTF-8 characters, between \\r and \\n) change nothing."""
    assert split_all(chunked(STREAM, cuts)) == split_all([STREAM])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    st.sampled_from([b"\n", b"\r\n"]),
    st.lists(st.integers(min_value=0, max_value=2_000), max_size=30),
)
def test_arbitrary_bytes_round_trip(lines: list[bytes], ending: bytes, cuts: list[int]) -> None:
    """Any bytes (invalid UTF-8 included) split back into the lines that were joined."""
    lines = [line.rstrip(b"\r") for line in lines]
    data = b"".join(line + ending for line in lines)
    assert split_all(chunked(data, cuts)) == lines


def test_every_single_byte_chunking() -> None:
    """One-byte chunks reassemble every line."""
    assert split_all([bytes([b]) for b in STREAM]) == split_all([STREAM])


def test_oversized_line_is_bounded_and_reported() -> None:
    """A line past the cap keeps only its first bytes, and its neighbours are untouched."""
    big = b"x" * 100
    for chunks in ([b"a\n" + big + b"\nb\n"], [b"a\n", big[:30], big[30:], b"\r\nb\n"]):
        assert split_all(chunks, max_line=10) == [
            b"a",
            Oversized(b"x" * 10, 100),
            b"b",
        ]


def test_splitter_memory_is_bounded() -> None:
    """Feeding a newline-free stream never buffers more than the cap."""
    splitter = LineSplitter(1000)
    for _ in range(1000):
        assert splitter.feed(b"y" * 997) == []
        assert splitter.buffered <= 1000


def test_blank_lines() -> None:
    """Empty and whitespace-only lines are blank; anything else is not."""
    assert is_blank(b"") and is_blank(b"  \t") and is_blank(b"\r")
    assert not is_blank(b" {}") and not is_blank(b"x")


def test_classify_reasons() -> None:
    """Each dead-letter reason is recognised; valid lines give their routing head."""
    bid = "bpred_1"
    assert classify(b'{"custom_id":"a"', bid)[0] == "invalid_json"  # type: ignore[index]
    assert classify(b"\xff\xfe", bid)[0] == "invalid_json"  # type: ignore[index]
    assert classify(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", bid)[0] == "invalid_json"  # type: ignore[index]
    assert classify(b"[1,2]", bid)[0] == "not_an_object"  # type: ignore[index]
    assert classify(b'"text"', bid)[0] == "not_an_object"  # type: ignore[index]
    assert classify(b'{"status":"succeeded"}', bid)[0] == "missing_custom_id"  # type: ignore[index]
    assert classify(b'{"custom_id":""}', bid)[0] == "missing_custom_id"  # type: ignore[index]
    assert classify(b'{"custom_id":7}', bid)[0] == "missing_custom_id"  # type: ignore[index]
    assert classify(b'{"custom_id":"a","batch_id":"other"}', bid)[0] == "batch_id_mismatch"  # type: ignore[index]
    assert classify(b'{"custom_id":"a","batch_id":null}', bid)[0] == "batch_id_mismatch"  # type: ignore[index]
    head = classify(b'{"custom_id":"a","batch_id":"bpred_1","status":"errored","output":null}', bid)
    assert isinstance(head, LineHead) and head.custom_id == "a" and head.status == "errored"
    assert isinstance(classify(b'{"custom_id":"a"}', bid), LineHead)  # batch_id is optional


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_classify_never_raises(data: bytes) -> None:
    """Random bytes are classified (usually dead-lettered), never crash."""
    result = classify(data, "b")
    assert isinstance(result, (LineHead, tuple))
