"""The responses routerd answered, kept so a later turn can name one as previous_response_id.

Bounded three ways: a number of responses, a total size and an age; the least recently
used goes first. Each entry holds its own turn only (the input messages and the reply, in
chat shape) and the id of the turn before, so a long conversation costs its length once,
not once per turn; a turn's history is the chain walked back. Kept in memory and written
beside the state file (never a key: requests to routerd carry none of the providers').
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from routerd.config.schema import ServerConfig
from routerd.state import write_atomic

log = structlog.get_logger("routerd.responses")

STORE_VERSION = 1


class StoredResponse(msgspec.Struct):
    """One answered response: the object GET returns, and its turn for the next one."""

    id: str
    created_at: float  # wall clock, for the age bound
    previous: str | None
    messages: list[Any]  # this turn's input messages and the reply, as chat messages
    response: dict[str, Any]
    size: int = 0
    root: str | None = None  # the conversation's first response (None: this one)


class _File(msgspec.Struct):
    version: int
    responses: list[StoredResponse]


_encode = msgspec.msgpack.Encoder().encode
_decode_file = msgspec.msgpack.Decoder(_File).decode


class ResponseStore:
    """At most ``max_entries`` responses and ``max_bytes`` of them, none older than ``ttl_s``."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 256 * 1024 * 1024,
        ttl_s: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.dirty = False
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def put(
        self,
        rid: str,
        previous: str | None,
        messages: list[Any],
        response: dict[str, Any],
        root: str | None = None,
    ) -> None:
        """Keep one response (dropping the oldest past the bounds)."""
        if not self.enabled:
            return
        entry = StoredResponse(rid, self._clock(), previous, messages, response, root=root)
        entry.size = len(_encode(entry))
        if entry.size > self.max_bytes:
            log.warning("response_not_stored", response=rid, bytes=entry.size)
            return
        self._drop(rid)
        self._entries[rid] = entry
        self._bytes += entry.size
        self.dirty = True
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def get(self, rid: str) -> StoredResponse | None:
        """The response if it is kept and not expired; reading it makes it the most recent."""
        entry = self._entries.get(rid)
        if entry is None:
            return None
        if self._clock() - entry.created_at > self.ttl_s:
            self._drop(rid)
            return None
        self._entries.move_to_end(rid)
        return entry

    def history(self, rid: str) -> list[Any] | None:
        """The chat messages of the conversation up to and including ``rid``; None when it,
        or a turn before it, is no longer kept."""
        turns: list[list[Any]] = []
        seen: set[str] = set()
        current: str | None = rid
        while current is not None:
            entry = self.get(current)
            if entry is None or current in seen:
                return None
            seen.add(current)
            turns.append(entry.messages)
            current = entry.previous
        return [message for turn in reversed(turns) for message in turn]

    def root_of(self, rid: str) -> str | None:
        """The first response of the conversation ``rid`` belongs to (None: not kept)."""
        entry = self.get(rid)
        return None if entry is None else entry.root or entry.id

    def delete(self, rid: str) -> bool:
        """Forget one response; False if it was not kept."""
        if self.get(rid) is None:
            return False
        self._drop(rid)
        return True

    def _drop(self, rid: str) -> None:
        entry = self._entries.pop(rid, None)
        if entry is not None:
            self._bytes -= entry.size
            self.dirty = True

    # ---- the file beside the state file -----------------------------------------------

    def dump(self) -> bytes:
        """The store's bytes (on the event loop: the entries change between awaits)."""
        self.dirty = False
        return _encode(_File(STORE_VERSION, list(self._entries.values())))

    def load(self, path: Path) -> int:
        """Read back what a previous run kept; a missing file is an empty store, a damaged
        one is logged and ignored. Returns how many responses were restored."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("responses_unreadable", path=str(path), error=str(exc))
            return 0
        try:
            saved = _decode_file(data)
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("responses_unreadable", path=str(path), error=str(exc))
            return 0
        if saved.version != STORE_VERSION:
            log.warning("responses_unreadable", path=str(path), error="another version")
            return 0
        for entry in saved.responses:
            if self._clock() - entry.created_at <= self.ttl_s:
                self._entries[entry.id] = entry
                self._bytes += entry.size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self.dirty = False
        return len(self._entries)


class StoreFile:
    """The store's file: read back at start, written when the store changed, at most every
    ``interval_s`` (the file can be large, and a crash loses only turns a client can send
    again) and at shutdown."""

    def __init__(
        self,
        store: ResponseStore,
        path: Path,
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.path = path
        self.interval_s = interval_s
        self._clock = clock
        self._saved_at = -math.inf
        self._lock = anyio.Lock()

    @classmethod
    def beside(cls, state_path: Path, server: ServerConfig) -> StoreFile:
        """The store [server] bounds, in its file next to the state file."""
        store = ResponseStore(
            max_entries=server.responses_max,
            max_bytes=server.responses_max_bytes,
            ttl_s=server.responses_ttl_s,
        )
        return cls(store, path_beside(state_path))

    def restore(self) -> None:
        kept = self.store.load(self.path)
        if kept:
            log.info("responses_restored", path=str(self.path), responses=kept)

    async def save(self, *, force: bool = False) -> None:
        """Write the store if it changed (and the interval has passed, unless ``force``)."""
        if not self.store.dirty:
            return
        if not force and self._clock() - self._saved_at < self.interval_s:
            return
        self._saved_at = self._clock()
        data = self.store.dump()  # on the loop: the entries change between awaits
        async with self._lock:
            try:
                await anyio.to_thread.run_sync(write_atomic, self.path, data)
            except OSError as exc:
                self.store.dirty = True
                log.error("responses_save_failed", path=str(self.path), error=str(exc))


def path_beside(state_path: Path) -> Path:
    """Where the store lives: next to the state file."""
    return state_path.with_name(state_path.name + ".responses")
