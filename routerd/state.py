"""The state file: cooldowns, parks, disabled keys, learned limits, rotation and breakers.

Written atomically (temporary file, fsync, rename) and read back at start, so a restart
neither re-hits an exhausted key nor forgets the rotation. Credentials are matched by
provider, label and key fingerprint: a replaced key starts fresh. Times are stored as wall
clock and turned back into monotonic time on load. No secret is ever written.

Reading is lenient, entry by entry: an entry this version cannot use (an unknown state, a
wrong type, a number that is not finite) is skipped with a warning and the rest restored,
so no state file keeps the daemon from starting.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import structlog

from routerd.core.affinity import Affinity, Held
from routerd.core.breaker import Breaker, BreakerState
from routerd.core.credential import CredentialState, Health, LearnedWindow

log = structlog.get_logger("routerd.state")

STATE_VERSION = 1

# Validated when read back (msgspec checks constraints on decoding, not on construction).
Count = Annotated[int, msgspec.Meta(ge=0)]
# Wall-clock seconds; 0 means "not set".
WallTime = Annotated[float, msgspec.Meta(ge=0)]
# A name shown in a warning is cut to this length: a damaged file may hold anything.
_NAME_MAX = 120


class WindowRecord(msgspec.Struct, frozen=True):
    """A learned window, its reset as wall-clock time."""

    limit: Count | None
    remaining: Count | None
    reset_at: WallTime


class CredentialRecord(msgspec.Struct, frozen=True):
    """What a credential's state needs to survive a restart."""

    provider: str
    label: str
    fingerprint: str
    health: Health
    until: WallTime
    reason: str
    backoff_level: Count
    long_lane_until: WallTime
    requests: WindowRecord
    tokens: WindowRecord
    uses: Count
    successes: Count
    failures: Count
    proven: bool = False


class BreakerRecord(msgspec.Struct, frozen=True):
    """A target breaker, its reopening as wall-clock time."""

    target: str
    state: BreakerState
    until: WallTime
    opens: Count
    consecutive_failures: Count
    proven: bool = False


class SessionRecord(msgspec.Struct, frozen=True):
    """A conversation held on a credential (its key is a hash, never the client's string)."""

    session: str
    target: str
    provider: str
    label: str
    group: str | None
    last_at: WallTime


class StateFile(msgspec.Struct, frozen=True):
    """The whole file."""

    version: int
    saved_at: float
    credentials: list[CredentialRecord]
    breakers: list[BreakerRecord]
    rotations: dict[str, int]
    sessions: list[SessionRecord] = msgspec.field(default_factory=list)


class _Envelope(msgspec.Struct):
    """The file's top level, its entries left undecoded so each can fail on its own."""

    version: int
    saved_at: Any = 0.0
    credentials: Any = msgspec.field(default_factory=list)
    breakers: Any = msgspec.field(default_factory=list)
    rotations: Any = msgspec.field(default_factory=dict)
    sessions: Any = msgspec.field(default_factory=list)


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_encoder = msgspec.msgpack.Encoder()

_Record = TypeVar("_Record", CredentialRecord, BreakerRecord, SessionRecord)


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
    affinity: Affinity | None = None,
) -> StateFile:
    """Capture the state that should outlive this process.

    Pure and quick: call it where the state lives (the event loop), then hand the result
    to ``save`` in a worker thread; the result shares nothing mutable with the live state.
    """
    return StateFile(
        version=STATE_VERSION,
        saved_at=now_wall,
        credentials=[
            CredentialRecord(
                provider=c.provider,
                label=c.label,
                fingerprint=c.fingerprint,
                health=c.health,
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
                state=b.state,
                until=_to_wall(b.until, now_mono, now_wall),
                opens=b.opens,
                consecutive_failures=b.consecutive_failures,
                proven=b.proven,
            )
            for b in breakers
        ],
        rotations=dict(rotations),
        sessions=[
            SessionRecord(
                key, h.target, h.provider, h.label, h.group, _to_wall(h.last, now_mono, now_wall)
            )
            for key, h in (affinity.entries() if affinity is not None else ())
        ],
    )


def restore(
    saved: StateFile,
    credentials: Iterable[CredentialState],
    breakers: Iterable[Breaker],
    rotations: dict[str, int],
    now_mono: float,
    now_wall: float,
    affinity: Affinity | None = None,
) -> int:
    """Apply a saved state to freshly built objects; returns how many credentials matched."""
    records = {(r.provider, r.label, r.fingerprint): r for r in saved.credentials}
    matched = 0
    for cred in credentials:
        record = records.get((cred.provider, cred.label, cred.fingerprint))
        if record is None:
            continue
        matched += 1
        cred.health = record.health
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
        state = saved_breaker.state
        # A probe that was running when the daemon stopped never finished: probe again.
        breaker.state = BreakerState.OPEN if state is BreakerState.HALF_OPEN else state
        breaker.until = _to_mono(saved_breaker.until, now_mono, now_wall)
        breaker.opens = saved_breaker.opens
        breaker.consecutive_failures = saved_breaker.consecutive_failures
        breaker.proven = saved_breaker.proven
    rotations.update(saved.rotations)
    if affinity is not None:
        for kept in saved.sessions:
            last = _to_mono(kept.last_at, now_mono, now_wall)
            held = Held(kept.target, kept.provider, kept.label, kept.group, last)
            affinity.restore(kept.session, held)
    return matched


def encode(state: StateFile) -> bytes:
    """The bytes of a state file."""
    return _encoder.encode(state)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new, never half.

    Blocking I/O (fsync included): run it in a worker thread from async code.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
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


def save(path: Path, state: StateFile) -> None:
    """Encode a snapshot and write it atomically; only encoding and I/O, no live state."""
    write_atomic(path, encode(state))


def decode(data: bytes) -> StateFile:
    """Read a state file's bytes, skipping with a warning each entry that cannot be used.

    Raises ValueError only when the bytes are no state file at all, or one of another
    version.
    """
    return _decode(data, "state file")


def load(path: Path) -> StateFile | None:
    """Read the state file; None when there is none.

    Entries that cannot be used are skipped with a warning; a file that is no state file
    at all (or of another version) raises ValueError.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return _decode(data, f"state file {path}")


def read(path: Path) -> StateFile | None:
    """Read the state file at start-up; never raises.

    None when there is none, or when it cannot be read or decoded at all: that is logged
    once as a warning, and the daemon starts with fresh state.
    """
    try:
        return load(path)
    except (ValueError, OSError) as exc:
        log.warning("state_unreadable", path=str(path), error=str(exc))
        return None


def _decode(data: bytes, name: str) -> StateFile:
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        # RecursionError: arrays nested deeper than msgspec follows, which no writer makes.
        raise ValueError(f"{name} is damaged: {exc}") from None
    if envelope.version != STATE_VERSION:
        raise ValueError(f"{name} has version {envelope.version}, expected {STATE_VERSION}")
    saved_at = envelope.saved_at
    finite = isinstance(saved_at, int | float) and math.isfinite(saved_at)
    return StateFile(
        version=envelope.version,
        saved_at=float(saved_at) if finite else 0.0,
        credentials=_records(envelope.credentials, CredentialRecord, "credential"),
        breakers=_records(envelope.breakers, BreakerRecord, "breaker"),
        rotations=_rotations(envelope.rotations),
        sessions=_records(envelope.sessions, SessionRecord, "session"),
    )


def _records(entries: object, kind: type[_Record], what: str) -> list[_Record]:
    """The entries of one list that convert to ``kind``; each other one is logged."""
    if not isinstance(entries, list):
        log.warning("state_entries_skipped", entry=what, error="not a list")
        return []
    records: list[_Record] = []
    for index, entry in enumerate(entries):
        try:
            record = msgspec.convert(entry, kind)
        except msgspec.ValidationError as exc:
            problem = str(exc)
        else:
            if _all_finite(record):
                records.append(record)
                continue
            problem = "a number is not finite"
        log.warning("state_entry_skipped", entry=what, index=index, **_names(entry), error=problem)
    return records


def _rotations(entries: object) -> dict[str, int]:
    if not isinstance(entries, dict):
        log.warning("state_entries_skipped", entry="rotation", error="not a map")
        return {}
    rotations: dict[str, int] = {}
    for provider, count in entries.items():
        try:
            rotations[msgspec.convert(provider, str)] = msgspec.convert(count, Count)
        except msgspec.ValidationError as exc:
            names = {"provider": _name(provider)} if isinstance(provider, str) else {}
            log.warning("state_entry_skipped", entry="rotation", **names, error=str(exc))
    return rotations


def _all_finite(record: msgspec.Struct) -> bool:
    """Whether no float in ``record`` is infinite (the constraints already refuse NaN)."""
    for value in msgspec.structs.astuple(record):
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, msgspec.Struct) and not _all_finite(value):
            return False
    return True


def _names(entry: object) -> dict[str, str]:
    """What names an entry in a warning: provider and label, or target (never a key)."""
    if not isinstance(entry, dict):
        return {}
    return {
        field: _name(entry[field])
        for field in ("provider", "label", "target")
        if isinstance(entry.get(field), str)
    }


def _name(value: str) -> str:
    return value if len(value) <= _NAME_MAX else value[:_NAME_MAX] + "…"
