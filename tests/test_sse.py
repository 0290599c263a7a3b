"""The SSE line splitter and event decoder the upstream adapters read streams with.

Whatever the chunk boundaries (a CRLF split in two, a character's UTF-8 bytes split, a line
over many chunks), the lines are those of the whole body; a line over many chunks is kept
in pieces and joined once. CR CR at the end of a read was once taken for one CRLF.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from routerd.upstream.sse import LineSplitter, SSEDecoder


def _split(body: bytes, cuts: list[int]) -> list[str]:
    splitter = LineSplitter()
    lines: list[str] = []
    start = 0
    for cut in [*sorted(cuts), len(body)]:
        lines += splitter.feed(body[start:cut])
        start = cut
    return lines + splitter.flush()


def _reference(body: bytes) -> list[str]:
    lines = re.split(r"\r\n|\r|\n", body.decode("utf-8", errors="replace"))
    return lines if lines[-1] else lines[:-1]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["data: é", "x", "€", "\n", "\r", "\r\n", ": c", ""]), max_size=40),
    st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_lines_do_not_depend_on_where_the_chunks_break(pieces: list[str], cuts: list[int]) -> None:
    body = "".join(pieces).encode()
    cuts = [c for c in cuts if c <= len(body)]
    assert _split(body, cuts) == _reference(body)


def test_two_lone_crs_at_the_end_of_a_read_are_two_line_endings() -> None:
    # SSE lets a lone CR end a line: CR CR is a line and the blank line that ends its event.
    assert _split(b"data: a\r\rdata: b\r\r", []) == ["data: a", "", "data: b", ""]
    assert _split(b"data: a\r\rdata: b\r\r", [9]) == ["data: a", "", "data: b", ""]
    assert _split(b"data: a\r\n\r\n", [8]) == ["data: a", ""]


def test_a_line_over_many_chunks_is_counted_then_joined() -> None:
    splitter = LineSplitter()
    for _ in range(1000):
        assert splitter.feed(b"abcd") == []
    assert splitter.pending == 4000
    assert splitter.feed(b"e\nnext") == ["abcd" * 1000 + "e"]
    assert splitter.pending == 4
    assert splitter.flush() == ["next"]
    assert splitter.pending == 0


def test_the_decoder_counts_the_data_an_event_holds_until_it_ends() -> None:
    decoder = SSEDecoder()
    assert decoder.feed("event: delta") is None
    assert decoder.feed("data: 12345") is None
    assert decoder.feed(": a comment") is None
    assert decoder.feed("data:678") is None
    assert decoder.size == 8
    assert decoder.feed("") == ("delta", "12345\n678")
    assert decoder.size == 0
