"""A minimal incremental server-sent-events decoder, fed one line at a time, and the splitter
that turns a streamed body into those lines.

It follows the WHATWG rules an API client needs: ``data:`` lines accumulate and a blank line
dispatches; ``event:`` names the event; comment lines (``: OPENROUTER PROCESSING``, keep-alives)
and ``id:``/``retry:`` are ignored.
"""

from __future__ import annotations

import codecs

__all__ = ["LineSplitter", "SSEDecoder"]


class SSEDecoder:
    """Turns lines into ``(event, data)`` pairs; ``event`` is None when the server named none."""

    __slots__ = ("_data", "_event", "size")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self.size = 0  # characters of data the event being read holds so far

    def feed(self, line: str) -> tuple[str | None, str] | None:
        """Take one line (without its line ending); return an event when one is complete."""
        if not line:
            return self.flush()
        if line[0] == ":":
            return None
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self.size += len(value)
        elif name == "event":
            self._event = value
        return None

    def flush(self) -> tuple[str | None, str] | None:
        """Dispatch what has accumulated (also used at end of stream, for a missing blank line)."""
        data = self._data
        event = self._event
        self._event = None
        if not data:
            return None
        self._data = []
        self.size = 0
        # Nearly every event is one data line; skip the join for it.
        return event, data[0] if len(data) == 1 else "\n".join(data)


class LineSplitter:
    """Splits a byte stream into text lines as chunks arrive, whatever the chunk boundaries.

    A line ends at LF, CRLF or a lone CR (as SSE allows), which is not part of the line.
    Bytes are decoded as UTF-8 incrementally, so a character split across chunks survives.
    """

    __slots__ = ("_decoder", "_pending", "_trailing_cr", "pending")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The line not ended yet, in the pieces it came in (joined once, when it ends: a
        # long line over many chunks is not copied per chunk), and its length.
        self._pending: list[str] = []
        self.pending = 0
        self._trailing_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        """The lines this chunk completes."""
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if self._trailing_cr:
            # The last chunk ended on CR: a LF starting this one belongs to that CRLF.
            self._trailing_cr = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        # A CR that ends the chunk ends a line (the replace below makes it a LF); a LF that
        # starts the next chunk then belongs to it.
        self._trailing_cr = text[-1] == "\r"
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" not in text:
            self._pending.append(text)
            self.pending += len(text)
            return []
        lines = text.split("\n")
        pending = self._pending
        if pending:
            pending.append(lines[0])
            lines[0] = "".join(pending)
            pending.clear()
        rest = lines.pop()
        if rest:
            pending.append(rest)
        self.pending = len(rest)
        return lines

    def flush(self) -> list[str]:
        """What is left at the end of the stream, as a last line."""
        rest = "".join(self._pending) + self._decoder.decode(b"", final=True)
        self._pending.clear()
        self.pending = 0
        return [rest] if rest else []
