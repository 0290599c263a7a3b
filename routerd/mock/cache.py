"""The mock's prompt cache: per organisation, the prompt prefixes it has seen.

Providers cache a prompt's prefix for the organisation behind the key, so a request that
repeats the start of an earlier one (the turns of a conversation) is billed less for that
part, and another organisation's key sees none of it. The mock keeps, per organisation
(``KeySpec.org``, else the key's label), the hash of every message-by-message prefix it was
sent; a request's cached tokens are those of its longest prefix seen before.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec

# Prefixes remembered per organisation, least recently used first out.
LIMIT = 50_000


class PromptCache:
    """Prefix hashes by organisation."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._seen: dict[str, OrderedDict[bytes, None]] = {}

    def read(self, org: str, parts: Sequence[tuple[bytes, int]]) -> int:
        """The tokens of the longest prefix of ``parts`` (each message's bytes and tokens)
        seen before for ``org``; every prefix of this prompt is remembered for the next."""
        seen = self._seen.setdefault(org, OrderedDict())
        digest = hashlib.blake2b(digest_size=16)
        cached = total = 0
        for data, tokens in parts:
            digest.update(len(data).to_bytes(8, "big") + data)
            total += tokens
            key = digest.copy().digest()
            if key in seen:
                seen.move_to_end(key)
                cached = total
            else:
                seen[key] = None
        while len(seen) > self.limit:
            seen.popitem(last=False)
        return cached

    def clear(self) -> None:
        self._seen.clear()


def read_parts(messages: Sequence[Any], prompt_tokens: int) -> list[tuple[bytes, int]]:
    """Each message's bytes and its even share of the prompt's tokens."""
    share = prompt_tokens // max(1, len(messages))
    return [(msgspec.json.encode(message), share) for message in messages]
