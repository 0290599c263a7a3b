"""What the msgpack edge checks before it trusts a Chat: JSON-shaped, bounded requests
(``routerd.fronts.bounds``, as the HTTP front checks its bodies), a finite deadline and a
priority in range.

``peek_id`` finds the id of a frame too deeply nested for msgspec to decode, again without
recursion, so that request alone gets the error and its connection stays.
"""

from __future__ import annotations

import math

from routerd_client.protocol import Chat

from routerd.fronts.bounds import MAX_DEPTH, MAX_INT, check_request

__all__ = ["MAX_DEPTH", "check_chat", "check_messages", "peek_id"]


def check_chat(chat: Chat) -> str | None:
    """Why this Chat cannot be served as sent, or None when it is within bounds."""
    if chat.deadline is not None and not math.isfinite(chat.deadline):
        return f"deadline must be a finite number of seconds, got {chat.deadline}"
    if not -MAX_INT <= chat.priority <= MAX_INT:
        return f"priority {chat.priority} is out of range (at most ±2**53)"
    problem = check_request(chat.request)
    return None if problem is None else f"request.{problem}"


def check_messages(chat: Chat) -> str | None:
    """Why this Chat has nothing to send (no messages), or None when it has some."""
    messages = chat.request.get("messages")
    if not isinstance(messages, list) or not messages:
        return "request.messages must be a non-empty list"
    return None


# ---- the id of a frame msgspec could not decode ---------------------------------------------

# First byte -> bytes that follow it, for msgpack scalars of a fixed size.
_FIXED = {
    0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8,
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}  # fmt: skip
# str, bin and ext with a length field: first byte -> (width of the length, type bytes).
_SIZED = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),
}  # fmt: skip
# array16/32 and map16/32: first byte -> (width of the count, items per entry).
_COUNTED = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
_STR = frozenset({0xD9, 0xDA, 0xDB})

#: How many items peek_id reads before it gives up: it runs on the event loop.
PEEK_ITEMS = 100_000


class _Unreadable(Exception):
    """The bytes are not msgpack, or not worth reading further."""


def _head(buf: memoryview, pos: int) -> tuple[int, int | bytes | None, int]:
    """One item's header at ``pos``: (children that follow, int or str value, next pos)."""
    if pos >= len(buf):
        raise _Unreadable
    first = buf[pos]
    pos += 1
    value: int | bytes | None = None
    children = 0
    if first <= 0x7F:
        value = first
    elif first >= 0xE0:
        value = first - 0x100
    elif first <= 0x8F:
        children = 2 * (first & 0x0F)
    elif first <= 0x9F:
        children = first & 0x0F
    elif first <= 0xBF:
        end = pos + (first & 0x1F)
        value, pos = bytes(buf[pos:end]), end
    elif first in _FIXED:
        end = pos + _FIXED[first]
        if 0xCC <= first <= 0xD3:
            value = int.from_bytes(buf[pos:end], "big", signed=first >= 0xD0)
        pos = end
    elif first in _SIZED:
        width, extra = _SIZED[first]
        start = pos + width + extra
        end = start + int.from_bytes(buf[pos : pos + width], "big")
        if first in _STR and end - start <= 16:  # only short strings can be the key "id"
            value = bytes(buf[start:end])
        pos = end
    elif first in _COUNTED:
        width, per = _COUNTED[first]
        children = per * int.from_bytes(buf[pos : pos + width], "big")
        pos += width
    else:
        raise _Unreadable  # 0xc1: never used
    if pos > len(buf):
        raise _Unreadable
    return children, value, pos


def peek_id(body: bytes | bytearray) -> int | None:
    """The integer ``id`` of a top-level msgpack map, read without recursion; else None.

    Gives up (None) on bytes that are not msgpack and after reading ``PEEK_ITEMS`` items.
    """
    buf = memoryview(body)
    budget = PEEK_ITEMS
    try:
        if not buf or not (0x80 <= buf[0] <= 0x8F or buf[0] in (0xDE, 0xDF)):
            return None
        entries, _, pos = _head(buf, 0)
        for _ in range(entries // 2):
            children, key, pos = _head(buf, pos)
            if children == 0 and key == b"id":
                children, value, _ = _head(buf, pos)
                return value if children == 0 and type(value) is int else None
            # Skip the rest of the key (a map key may be a container), then its value.
            pending = children + 1
            while pending:
                children, _, pos = _head(buf, pos)
                pending += children - 1
                budget -= 1
                if budget < 0:
                    return None
    except _Unreadable:
        return None
    return None
