"""A minimal incremental server-sent-events decoder, fed one line at a time.

It follows the WHATWG rules an API client needs: ``data:`` lines accumulate and a blank line
dispatches; ``event:`` names the event; comment lines (``: OPENROUTER PROCESSING``, keep-alives)
and ``id:``/``retry:`` are ignored.
"""

from __future__ import annotations

__all__ = ["SSEDecoder"]


class SSEDecoder:
    """Turns lines into ``(event, data)`` pairs; ``event`` is None when the server named none."""

    __slots__ = ("_data", "_event")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None

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
        # Nearly every event is one data line; skip the join for it.
        return event, data[0] if len(data) == 1 else "\n".join(data)
