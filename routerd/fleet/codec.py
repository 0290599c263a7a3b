"""The shared facts on the wire: one msgpack message per fact, and the server's key names.

A credential is named by provider and key fingerprint, never by its key or label (labels
differ between hosts' configs; the fingerprint is the key's identity).
"""

from __future__ import annotations

import msgspec

from routerd.core.shared import BreakerFact, HealthFact, SpendFact, WindowFact

Fact = HealthFact | WindowFact | BreakerFact | SpendFact


class Message(msgspec.Struct, omit_defaults=True):
    """One fact and the host that learned it (so a host skips its own)."""

    origin: str
    at: float
    health: HealthFact | None = None
    window: WindowFact | None = None
    breaker: BreakerFact | None = None
    spend: SpendFact | None = None

    @property
    def fact(self) -> Fact | None:
        """The fact this message carries."""
        return self.health or self.window or self.breaker or self.spend


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(origin: str, at: float, fact: Fact) -> bytes:
    """The bytes of one fact, learned by ``origin`` at wall-clock time ``at``."""
    if isinstance(fact, HealthFact):
        return _encoder.encode(Message(origin, at, health=fact))
    if isinstance(fact, WindowFact):
        return _encoder.encode(Message(origin, at, window=fact))
    if isinstance(fact, SpendFact):
        return _encoder.encode(Message(origin, at, spend=fact))
    return _encoder.encode(Message(origin, at, breaker=fact))


def decode(data: bytes) -> Message | None:
    """A message, or None for bytes that are none (another version, another program)."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None


def fact_key(prefix: str, fact: Fact) -> str:
    """The server key that holds the latest fact of its kind about one thing."""
    if isinstance(fact, HealthFact):
        return f"{prefix}:health:{fact.provider}:{fact.fingerprint}"
    if isinstance(fact, WindowFact):
        return f"{prefix}:window:{fact.provider}:{fact.fingerprint}:{fact.window}"
    if isinstance(fact, SpendFact):
        return f"{prefix}:spend:{fact.provider}:{fact.fingerprint}"
    return f"{prefix}:breaker:{fact.target}"


def fact_ttl_ms(fact: HealthFact | WindowFact | BreakerFact, now_wall: float) -> int:
    """How long the server keeps a fact: while it matters, plus a day for what a host that
    starts later should still learn (a key proven, a breaker that closed)."""
    if isinstance(fact, WindowFact):
        return max(1, int((fact.reset_at - now_wall) * 1000))
    until = fact.until if fact.until > now_wall else now_wall
    return int((until - now_wall + 86_400) * 1000)


def probe_key(prefix: str, provider: str, fingerprint: str) -> str:
    """The claim of the host trying an unproven key first."""
    return f"{prefix}:probe:{provider}:{fingerprint}"


def ledger_key(prefix: str, provider: str, fingerprint: str, kind: str) -> str:
    """One of a key's ledgers ("window", "rpm", "tpm") or its leases ("leases"); a key's
    ledgers share one hash tag, as a script that changes them together needs in a cluster."""
    return f"{prefix}:{{{provider}:{fingerprint}}}:{kind}"


def channel(prefix: str) -> str:
    """The pub/sub channel every fact is published on."""
    return f"{prefix}:facts"
