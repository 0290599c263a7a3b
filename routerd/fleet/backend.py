"""The connection to the shared state server (Redis >= 7 or Valkey), kept off the request path.

What a host learns goes into an outbox (latest fact per key wins, so a burst of changes
costs one write each) that one task writes with SET and PUBLISH in a pipeline; another
task listens on the channel and hands each fact from another host to ``apply``. On
connect the host subscribes first, then reads every stored fact, then re-publishes what
it knows itself, so nothing learned while the server was away is lost either way.

When the server is down, slow or restarting, nothing waits on it: requests run on local
state, one warning is logged per outage, and the task reconnects with a jittered backoff.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from routerd.config.schema import StateConfig
from routerd.core.credential import RPM_WINDOW_S
from routerd.core.shared import FleetAsk, SpendFact, WindowFact
from routerd.fleet.codec import (
    Fact,
    channel,
    decode,
    encode,
    fact_key,
    fact_ttl_ms,
    ledger_key,
    probe_key,
)
from routerd.fleet.scripts import ADMIT, CLAIM, RECORD

log = structlog.get_logger("routerd.shared_state")

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
# An idle connection is checked this often, so an outage shows even without traffic.
PING_S = 1.0
# Facts waiting for the server, at most (one per credential window, health and breaker).
OUTBOX_MAX = 100_000
_SCAN_CHUNK = 500
# Counts of requests and learned windows (each request changes them) wait this long for
# company, so a busy host writes them a batch at a time; health and breakers go at once.
COUNTS_DELAY_S = 0.005
# A request that found every lease of a key taken looks again after this long.
LEASE_RETRY_S = 0.05
_LEDGERS = ("window", "rpm", "tpm", "leases")
# The ledger dates a request when it takes its place, a little before the provider counts
# it: it keeps each request this much longer than the window, so it never frees one early.
LEDGER_MARGIN_S = 0.05


def _ledger_ms(window_s: float) -> int:
    return int((window_s + LEDGER_MARGIN_S) * 1000)


# What a broken, slow or restarted server raises through redis-py and anyio.
_DOWN = (RedisError, OSError, TimeoutError)


@dataclass(slots=True)
class SharedStats:
    """What ``routerd status`` and /metrics show of the shared state."""

    connected: bool = False
    errors: int = 0
    published: int = 0
    received: int = 0
    dropped: int = 0
    reconnects: int = 0
    lag_s: float | None = None
    lag_max_s: float = 0.0


class SharedState:
    """One host's link to the shared state server; ``run`` it under the root task group."""

    def __init__(
        self,
        config: StateConfig,
        password: str | None,
        *,
        apply: Callable[[Fact, str], None],
        local_facts: Callable[[], list[Fact]],
        windows: Callable[[str, str], list[WindowFact]] = lambda provider, fingerprint: [],
        on_link: Callable[[bool], None] = lambda up: None,
        wall: Callable[[], float] = time.time,
        host: str | None = None,
    ) -> None:
        if config.url is None:
            raise ValueError('[state] backend = "redis" needs a url')
        self.url = config.url
        self.prefix = config.prefix
        self.timeout_s = config.timeout_s
        self.host = host or f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.stats = SharedStats()
        self._password = password
        self._apply = apply
        self._local_facts = local_facts
        self._wall = wall
        self._outbox: dict[str, Fact] = {}
        # Per credential: [sent, tokens sent, answered, tokens answered] since the last write.
        self._spends: dict[tuple[str, str], list[int]] = {}
        # Requests sent on each key since the last write, with its window's length in s.
        self._ledger: dict[tuple[str, str], tuple[int, float]] = {}
        self._sequence = 0
        # Leases given back since the last write: (key, member).
        self._released: list[tuple[str, str]] = []
        # Credentials whose windows changed: read (``windows``) when written, not before.
        self._dirty: set[tuple[str, str]] = set()
        self._windows = windows
        self._on_link = on_link
        self._wake = anyio.Event()
        self._client: Redis | None = None
        self._outage = False
        self._was_up = False

    # ---- the request path: never waits on the server ------------------------------------

    def publish(self, fact: Fact) -> None:
        """Queue a fact for the other hosts; the newest fact about one thing replaces older."""
        key = fact_key(self.prefix, fact)
        if key not in self._outbox and len(self._outbox) >= OUTBOX_MAX:
            self.stats.dropped += 1
            return
        self._outbox[key] = fact
        self._wake.set()

    def windows_changed(self, provider: str, fingerprint: str) -> None:
        """A credential's learned windows changed: the next write shares them as they are."""
        self._dirty.add((provider, fingerprint))
        self._wake.set()

    def spend(self, provider: str, fingerprint: str, counts: tuple[int, int, int, int]) -> None:
        """Add requests sent or answered on a credential to what the next write tells.

        Only while connected: counts from an outage would be stale by the time they arrive.
        """
        if not self.stats.connected:
            return
        total = self._spends.get((provider, fingerprint))
        if total is None:
            self._spends[(provider, fingerprint)] = list(counts)
        else:
            for i, count in enumerate(counts):
                total[i] += count
        self._wake.set()

    def record(self, provider: str, fingerprint: str, window_s: float) -> None:
        """Add one request sent on a key to the fleet's ledger of its window, at the next
        write (a request sent while the window has room: ``reserve`` is for the rest)."""
        if not self.stats.connected:
            return
        name = (provider, fingerprint)
        count, _ = self._ledger.get(name, (0, window_s))
        self._ledger[name] = (count + 1, window_s)
        self._wake.set()

    async def admit(
        self, provider: str, fingerprint: str, ask: FleetAsk
    ) -> tuple[float | None, str | None]:
        """Admit one request on a key against the fleet-wide limits ``ask`` names.

        Returns (None, lease): it goes (``lease`` names the place it holds when
        max_concurrent applies: ``release`` it when done); also when the server cannot
        tell in time, and local state decides. (seconds, None): not before then.
        """
        client = self._client
        if client is None or not self.stats.connected:
            return None, None
        keys = [ledger_key(self.prefix, provider, fingerprint, kind) for kind in _LEDGERS]
        member = self._member()
        args = (
            member,
            ask.window_limit,
            _ledger_ms(ask.window_s),
            ask.rpm,
            ask.tpm,
            ask.tokens,
            ask.max_concurrent,
            int(ask.lease_s * 1000),
            _ledger_ms(RPM_WINDOW_S),
        )
        try:
            with anyio.fail_after(self.timeout_s):
                wait_ms, leases_full = await client.eval(ADMIT, len(keys), *keys, *args)
        except _DOWN as exc:
            self._lost(exc)
            return None, None
        if leases_full:
            return max(float(wait_ms) / 1000, LEASE_RETRY_S), None
        if wait_ms:
            return float(wait_ms) / 1000, None
        return None, member if ask.max_concurrent else None

    def release(self, provider: str, fingerprint: str, lease: str) -> None:
        """Give a lease back at the next write (one that is never given back expires)."""
        if self.stats.connected:
            self._released.append((ledger_key(self.prefix, provider, fingerprint, "leases"), lease))
            self._wake.set()

    def _member(self) -> str:
        self._sequence += 1
        return f"{self.host}:{self._sequence}"

    async def claim(self, provider: str, fingerprint: str, ttl_s: float) -> float | None:
        """Claim the first try of an unproven key for this host.

        None: go ahead (the claim is this host's, or the server cannot tell in time, and
        local state decides); a number: another host holds it for that many seconds more.
        """
        client = self._client
        if client is None or not self.stats.connected:
            return None
        key = probe_key(self.prefix, provider, fingerprint)
        try:
            with anyio.fail_after(self.timeout_s):
                held = await client.eval(CLAIM, 1, key, self.host, int(ttl_s * 1000))
        except _DOWN as exc:
            self._lost(exc)
            return None
        return float(held) / 1000 if held else None

    # ---- the connection ------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled: reconnect with backoff whenever the link breaks."""
        task_status.started()
        backoff = BACKOFF_MIN_S
        while True:
            try:
                await self._session()
            except* _DOWN as group:
                self._lost(group.exceptions[0])
            if self._was_up:
                backoff = BACKOFF_MIN_S
            await anyio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _connect(self) -> Redis:
        return Redis.from_url(
            self.url,
            password=self._password,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0),
            client_name="routerd",
        )

    async def _session(self) -> None:
        self._was_up = False
        client = self._connect()
        try:
            pubsub = client.pubsub()
            try:
                with anyio.fail_after(self.timeout_s * 5):
                    # Subscribe before reading: a fact published in between is not lost.
                    await pubsub.subscribe(channel(self.prefix))
                    loaded = await self._load(client)
                for fact in self._local_facts():
                    self._outbox.setdefault(fact_key(self.prefix, fact), fact)
                self._wake.set()
                self._up(client, loaded)
                async with anyio.create_task_group() as group:
                    group.start_soon(self._listen, pubsub)
                    await self._write(client)
            finally:
                with anyio.move_on_after(1, shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
        finally:
            self._client = None
            self.stats.connected = False
            self._spends.clear()
            self._ledger.clear()
            self._released.clear()
            with anyio.move_on_after(1, shield=True):
                await client.aclose()

    def _up(self, client: Redis, loaded: int) -> None:
        self._was_up = True
        self._client = client
        self.stats.connected = True
        self._on_link(True)
        if self._outage:
            self.stats.reconnects += 1
            log.warning("shared_state_reconnected", url=self.url, facts_loaded=loaded)
        else:
            log.info("shared_state_connected", url=self.url, facts_loaded=loaded)
        self._outage = False

    async def _load(self, client: Redis) -> int:
        """Apply every fact the server holds; returns how many."""
        stored = tuple(f"{self.prefix}:{kind}:" for kind in ("health", "window", "breaker"))
        keys = [
            key
            async for key in client.scan_iter(match=f"{self.prefix}:*", count=_SCAN_CHUNK)
            if key.decode(errors="replace").startswith(stored)
        ]
        loaded = 0
        for start in range(0, len(keys), _SCAN_CHUNK):
            for data in await client.mget(keys[start : start + _SCAN_CHUNK]):
                if isinstance(data, bytes) and self._receive(data, count_lag=False):
                    loaded += 1
        return loaded

    async def _write(self, client: Redis) -> None:
        while True:
            with anyio.move_on_after(PING_S):
                await self._wake.wait()
            self._wake = anyio.Event()
            if not (self._outbox or self._spends or self._dirty or self._ledger or self._released):
                with anyio.fail_after(self.timeout_s):
                    await client.ping()
                continue
            if not self._outbox:
                # Only counts of requests and windows to tell: gather more into one write.
                await anyio.sleep(COUNTS_DELAY_S)
            batch, self._outbox = self._outbox, {}
            dirty, self._dirty = self._dirty, set()
            try:
                await self._write_batch(client, batch, dirty)
            except BaseException:
                # Kept for the next connection, unless a newer fact replaced it meanwhile.
                for key, fact in batch.items():
                    self._outbox.setdefault(key, fact)
                self._dirty |= dirty
                raise
            self.stats.published += len(batch)

    async def _write_batch(
        self, client: Redis, batch: dict[str, Fact], dirty: set[tuple[str, str]]
    ) -> None:
        """Spends first, then windows read now, then the rest: a host that did not know a
        window yet takes the figure, which already counts the spends before it."""
        spends, self._spends = self._spends, {}
        ledger, self._ledger = self._ledger, {}
        released, self._released = self._released, []
        now = self._wall()
        facts: list[Fact] = [SpendFact(p, f, *counts) for (p, f), counts in spends.items()]
        for name in dirty:
            facts.extend(self._windows(*name))
        facts.extend(batch.values())
        topic = channel(self.prefix)
        pipe = client.pipeline(transaction=False)
        for key, lease in released:
            pipe.zrem(key, lease)
        for (provider, fingerprint), (count, window_s) in ledger.items():
            members = [self._member() for _ in range(count)]
            key = ledger_key(self.prefix, provider, fingerprint, "window")
            pipe.eval(RECORD, 1, key, _ledger_ms(window_s), count, *members)
        for fact in facts:
            data = encode(self.host, now, fact)
            if not isinstance(fact, SpendFact):
                pipe.set(fact_key(self.prefix, fact), data, px=fact_ttl_ms(fact, now))
            pipe.publish(topic, data)
        with anyio.fail_after(self.timeout_s):
            await pipe.execute()

    async def _listen(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=PING_S)
            if message is not None and message.get("type") == "message":
                data = message.get("data")
                if isinstance(data, bytes):
                    self._receive(data, count_lag=True)

    def _receive(self, data: bytes, *, count_lag: bool) -> bool:
        message = decode(data)
        if message is None or message.origin == self.host:
            return False
        fact = message.fact
        if fact is None:
            return False
        if count_lag:
            lag = max(0.0, self._wall() - message.at)
            self.stats.lag_s = lag
            self.stats.lag_max_s = max(self.stats.lag_max_s, lag)
        self.stats.received += 1
        try:
            self._apply(fact, message.origin)
        except Exception:
            log.exception("shared_fact_failed")
            return False
        return True

    def _lost(self, exc: BaseException) -> None:
        """The server broke off: count it and, once per outage, say so."""
        self.stats.errors += 1
        self.stats.connected = False
        self._client = None
        if self._outage:
            return
        self._on_link(False)
        self._outage = True
        error = f"{type(exc).__name__}: {exc}"
        if self._password:
            error = error.replace(self._password, "***")
        log.warning(
            "shared_state_unavailable",
            url=self.url,
            error=error,
            action="serving on local state; reconnecting",
        )
