"""The state file: cooldowns, parks, disabled keys, learned limits, rotation and breakers.

Written atomically (temporary file, fsync, rename) and read back at start, so a restart
neither re-hits an exhausted key nor forgets the rotation. Credentials are matched by
provider, label and key fingerprint: a replaced key starts fresh. Times are stored as wall
clock and turned back into monotonic time on load. No secret is ever written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import msgspec

from routerd.breaker import Breaker, BreakerState
from routerd.credential import CredentialState, Health, LearnedWindow

STATE_VERSION = 1


class WindowRecord(msgspec.Struct, frozen=True):
    """A learned window, its reset as wall-clock time."""

    limit: int | None
    remaining: int | None
    reset_at: float


class CredentialRecord(msgspec.Struct, frozen=True):
    """What a credential's state needs to survive a restart."""

    provider: str
    label: str
    fingerprint: str
    health: str
    until: float
    reason: str
    backoff_level: int
    long_lane_until: float
    requests: WindowRecord
    tokens: WindowRecord
    uses: int
    successes: int
    failures: int
    proven: bool = False


class BreakerRecord(msgspec.Struct, frozen=True):
    """A target breaker, its reopening as wall-clock time."""

    target: str
    state: str
    until: float
    opens: int
    consecutive_failures: int
    proven: bool = False


class StateFile(msgspec.Struct, frozen=True):
    """The whole file."""

    version: int
    saved_at: float
    credentials: list[CredentialRecord]
    breakers: list[BreakerRecord]
    rotations: dict[str, int]


_decoder = msgspec.msgpack.Decoder(StateFile)
_encoder = msgspec.msgpack.Encoder()


def _to_wall(mono: float, now_mono: float, now_wall: float) -> float:
    return now_wall + (mono - now_mono) if mono > 0 else 0.0


def _to_mono(wall: float, now_mono: float, now_wall: float) -> float:
    return now_mono + (wall - now_wall) if wall > 0 else 0.0


def _window(window: LearnedWindow, now_mono: float, now_wall: float) -> WindowRecord:
    return WindowRecord(
        window.limit, window.remaining, _to_wall(window.reset_at, now_mono, now_wall)
    )


def snapshot(
    credentials: Iterable[CredentialState],
    breakers: Iterable[Breaker],
    rotations: dict[str, int],
    now_mono: float,
    now_wall: float,
) -> StateFile:
    """Capture the state that should outlive this process."""
    return StateFile(
        version=STATE_VERSION,
        saved_at=now_wall,
        credentials=[
            CredentialRecord(
                provider=c.provider,
                label=c.label,
                fingerprint=c.fingerprint,
                health=c.health.value,
                until=_to_wall(c.until, now_mono, now_wall),
                reason=c.reason,
                backoff_level=c.backoff_level,
                long_lane_until=_to_wall(c.long_lane_until, now_mono, now_wall),
                requests=_window(c.requests, now_mono, now_wall),
                tokens=_window(c.tokens, now_mono, now_wall),
                uses=c.uses,
                successes=c.successes,
                failures=c.failures,
                proven=c.proven,
            )
            for c in credentials
        ],
        breakers=[
            BreakerRecord(
                target=b.target,
                state=b.state.value,
                until=_to_wall(b.until, now_mono, now_wall),
                opens=b.opens,
                consecutive_failures=b.consecutive_failures,
                proven=b.proven,
            )
            for b in breakers
        ],
        rotations=dict(rotations),
    )


def restore(
    saved: StateFile,
    credentials: Iterable[CredentialState],
    breakers: Iterable[Breaker],
    rotations: dict[str, int],
    now_mono: float,
    now_wall: float,
) -> int:
    """Apply a saved state to freshly built objects; returns how many credentials matched."""
    records = {(r.provider, r.label, r.fingerprint): r for r in saved.credentials}
    matched = 0
    for cred in credentials:
        record = records.get((cred.provider, cred.label, cred.fingerprint))
        if record is None:
            continue
        matched += 1
        cred.health = Health(record.health)
        cred.until = _to_mono(record.until, now_mono, now_wall)
        cred.reason = record.reason
        cred.backoff_level = record.backoff_level
        cred.long_lane_until = _to_mono(record.long_lane_until, now_mono, now_wall)
        for window, saved_window in (
            (cred.requests, record.requests),
            (cred.tokens, record.tokens),
        ):
            window.limit = saved_window.limit
            window.remaining = saved_window.remaining
            window.reset_at = _to_mono(saved_window.reset_at, now_mono, now_wall)
        cred.uses = record.uses
        cred.successes = record.successes
        cred.failures = record.failures
        cred.proven = record.proven
    by_target = {r.target: r for r in saved.breakers}
    for breaker in breakers:
        saved_breaker = by_target.get(breaker.target)
        if saved_breaker is None:
            continue
        state = BreakerState(saved_breaker.state)
        # A probe that was running when the daemon stopped never finished: probe again.
        breaker.state = BreakerState.OPEN if state is BreakerState.HALF_OPEN else state
        breaker.until = _to_mono(saved_breaker.until, now_mono, now_wall)
        breaker.opens = saved_breaker.opens
        breaker.consecutive_failures = saved_breaker.consecutive_failures
        breaker.proven = saved_breaker.proven
    rotations.update(saved.rotations)
    return matched


def save(path: Path, state: StateFile) -> None:
    """Write the state atomically: a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _encoder.encode(state)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> StateFile | None:
    """Read the state file; None when there is none. A damaged file raises ValueError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        saved = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"state file {path} is damaged: {exc}") from None
    if saved.version != STATE_VERSION:
        raise ValueError(f"state file {path} has version {saved.version}, expected {STATE_VERSION}")
    return saved
