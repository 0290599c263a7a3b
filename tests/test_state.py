"""The state file: what survives a restart, and that no state file can stop a start."""

from __future__ import annotations

import math
import stat
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from routerd_client import AsyncClient

from routerd import state as state_file
from routerd.core.breaker import Breaker, BreakerState
from routerd.core.credential import CredentialState, Health
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

# The old process's clocks, and the new one's: 10 s of wall time later, a fresh monotonic.
OLD_MONO, OLD_WALL = 500.0, 1_700_000_000.0
NEW_MONO, NEW_WALL = 20.0, OLD_WALL + 10.0


def cred(label: str, provider: str = "p") -> CredentialState:
    return CredentialState(provider, label, f"sha256:{label}-fingerprint", 0)


def parked(label: str, provider: str = "p") -> CredentialState:
    """A credential out of quota for the next hour, as the old process knew it."""
    c = cred(label, provider)
    c.health, c.until, c.reason, c.uses = Health.PARKED, OLD_MONO + 3600.0, "no quota", 12
    c.requests.limit, c.requests.remaining, c.requests.reset_at = 100, 3, OLD_MONO + 30.0
    return c


def open_breaker(target: str) -> Breaker:
    b = Breaker(target, proven=True)
    b.state, b.until, b.opens, b.consecutive_failures = BreakerState.OPEN, OLD_MONO + 60.0, 2, 4
    return b


def saved_bytes(credentials: list[CredentialState], breakers: list[Breaker]) -> bytes:
    snap = state_file.snapshot(credentials, breakers, {"p": 7}, OLD_MONO, OLD_WALL)
    return state_file.encode(snap)


def as_plain(data: bytes) -> dict[str, Any]:
    """The file as plain maps and lists, to damage it the way a bad write or an edit would."""
    plain = msgspec.msgpack.decode(data)
    assert isinstance(plain, dict)
    return plain


def restore_into(
    path: Path, credentials: list[CredentialState], breakers: list[Breaker]
) -> dict[str, int]:
    saved = state_file.load(path)
    assert saved is not None
    rotations: dict[str, int] = {}
    state_file.restore(saved, credentials, breakers, rotations, NEW_MONO, NEW_WALL)
    return rotations


def skipped(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "state_entry_skipped"]


def test_round_trip_keeps_parks_windows_breakers_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "state.msgpack"
    state_file.save(
        path,
        state_file.snapshot([parked("a")], [open_breaker("p/m")], {"p": 7}, OLD_MONO, OLD_WALL),
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fresh, breaker = cred("a"), Breaker("p/m")
    rotations = restore_into(path, [fresh], [breaker])
    # 10 s of the hour passed while the daemon was down.
    assert fresh.current_health(NEW_MONO) is Health.PARKED
    assert fresh.until == pytest.approx(NEW_MONO + 3590.0)
    assert (fresh.reason, fresh.uses) == ("no quota", 12)
    assert fresh.requests.left(NEW_MONO) == 3
    assert breaker.position(NEW_MONO) is BreakerState.OPEN
    assert breaker.until == pytest.approx(NEW_MONO + 50.0)
    assert breaker.opens == 2
    assert rotations == {"p": 7}


def test_a_file_written_before_records_were_typed_still_loads(tmp_path: Path) -> None:
    # The layout the previous release wrote: states as plain strings, every field present.
    window = {"limit": None, "remaining": None, "reset_at": 0.0}
    old = {
        "version": 1,
        "saved_at": OLD_WALL,
        "credentials": [
            {
                "provider": "p",
                "label": "a",
                "fingerprint": "sha256:a-fingerprint",
                "health": "disabled",
                "until": OLD_WALL + 600.0,
                "reason": "invalid key",
                "backoff_level": 0,
                "long_lane_until": 0.0,
                "requests": window,
                "tokens": window,
                "uses": 3,
                "successes": 0,
                "failures": 3,
                "proven": False,
            }
        ],
        "breakers": [
            {
                "target": "p/m",
                "state": "half_open",
                "until": OLD_WALL,
                "opens": 1,
                "consecutive_failures": 3,
                "proven": True,
            }
        ],
        "rotations": {"p": 2},
    }
    path = tmp_path / "state.msgpack"
    path.write_bytes(msgspec.msgpack.encode(old))
    fresh, breaker = cred("a"), Breaker("p/m")
    assert restore_into(path, [fresh], [breaker]) == {"p": 2}
    assert fresh.current_health(NEW_MONO) is Health.DISABLED
    # The probe that was running at shutdown never finished: it is due again at once.
    assert breaker.position(NEW_MONO) is BreakerState.HALF_OPEN and breaker.admits(NEW_MONO)


def test_an_unknown_health_skips_that_credential_and_restores_the_others(
    tmp_path: Path,
) -> None:
    plain = as_plain(saved_bytes([parked("a"), parked("b"), parked("c", "q")], []))
    plain["credentials"][1]["health"] = "hibernating"  # written by some later version
    path = tmp_path / "state.msgpack"
    path.write_bytes(msgspec.msgpack.encode(plain))
    a, b, c = cred("a"), cred("b"), cred("c", "q")
    with structlog.testing.capture_logs() as logs:
        restore_into(path, [a, b, c], [])
    assert a.current_health(NEW_MONO) is Health.PARKED
    assert c.current_health(NEW_MONO) is Health.PARKED
    assert b.current_health(NEW_MONO) is Health.READY and b.uses == 0  # starts fresh
    (warning,) = skipped(logs)
    assert warning["log_level"] == "warning"
    assert (warning["entry"], warning["provider"], warning["label"]) == ("credential", "p", "b")
    assert "hibernating" in warning["error"]
    assert "fingerprint" not in repr(logs)


def test_an_unknown_breaker_state_skips_only_that_breaker(tmp_path: Path) -> None:
    plain = as_plain(saved_bytes([parked("a")], [open_breaker("p/m"), open_breaker("p/n")]))
    plain["breakers"][0]["state"] = "melted"
    path = tmp_path / "state.msgpack"
    path.write_bytes(msgspec.msgpack.encode(plain))
    a, m, n = cred("a"), Breaker("p/m"), Breaker("p/n")
    with structlog.testing.capture_logs() as logs:
        restore_into(path, [a], [m, n])
    assert m.position(NEW_MONO) is BreakerState.CLOSED and m.opens == 0
    assert n.position(NEW_MONO) is BreakerState.OPEN
    assert a.current_health(NEW_MONO) is Health.PARKED
    (warning,) = skipped(logs)
    assert (warning["entry"], warning["target"]) == ("breaker", "p/m")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("until", math.nan),
        ("until", math.inf),
        ("long_lane_until", -math.inf),
        ("uses", "many"),
        ("backoff_level", -3),
        ("requests", None),
        ("requests", {"limit": 10, "remaining": 2, "reset_at": math.inf}),
        ("label", 42),
    ],
)
def test_a_credential_with_a_wrong_type_or_a_nonsense_number_is_skipped(
    tmp_path: Path, field: str, value: object
) -> None:
    plain = as_plain(saved_bytes([parked("a"), parked("b")], []))
    plain["credentials"][0][field] = value
    path = tmp_path / "state.msgpack"
    path.write_bytes(msgspec.msgpack.encode(plain))
    a, b = cred("a"), cred("b")
    with structlog.testing.capture_logs() as logs:
        restore_into(path, [a, b], [])
    assert a.current_health(NEW_MONO) is Health.READY
    assert math.isfinite(a.until) and a.uses == 0
    assert b.current_health(NEW_MONO) is Health.PARKED
    (warning,) = skipped(logs)
    assert warning["entry"] == "credential" and warning["provider"] == "p"


def test_entries_that_are_not_records_at_all_are_skipped(tmp_path: Path) -> None:
    plain = as_plain(saved_bytes([parked("a")], [open_breaker("p/m")]))
    plain["credentials"].insert(0, ["not", "a", "record"])
    plain["breakers"] = "everything is fine"
    plain["rotations"] = {"p": -1, "q": 4, "r": 1.5}
    path = tmp_path / "state.msgpack"
    path.write_bytes(msgspec.msgpack.encode(plain))
    a, breaker = cred("a"), Breaker("p/m")
    with structlog.testing.capture_logs() as logs:
        rotations = restore_into(path, [a], [breaker])
    assert a.current_health(NEW_MONO) is Health.PARKED
    assert breaker.position(NEW_MONO) is BreakerState.CLOSED
    assert rotations == {"q": 4}
    events = [(e["event"], e["entry"]) for e in logs]
    assert events.count(("state_entry_skipped", "credential")) == 1
    assert events.count(("state_entries_skipped", "breaker")) == 1
    assert events.count(("state_entry_skipped", "rotation")) == 2


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"\xc1garbage\x00\xff", id="garbage"),
        pytest.param(lambda data: b'{"version": 1}', id="json"),
        pytest.param(lambda data: msgspec.msgpack.encode([1, 2, 3]), id="not-a-map"),
        pytest.param(lambda data: msgspec.msgpack.encode({"saved_at": 1.0}), id="no-version"),
        pytest.param(
            lambda data: b"\x82\xa7version\x01\xabcredentials" + b"\x91" * 100_000 + b"\xc0",
            id="nested-too-deep",
        ),
    ],
)
def test_a_file_that_does_not_decode_is_ignored_with_one_warning(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    path = tmp_path / "state.msgpack"
    path.write_bytes(damage(saved_bytes([parked("a")], [open_breaker("p/m")])))
    with structlog.testing.capture_logs() as logs:
        assert state_file.read(path) is None
    (warning,) = logs
    assert (warning["event"], warning["log_level"]) == ("state_unreadable", "warning")
    assert str(path) in warning["path"]
    with pytest.raises(ValueError, match="is damaged"):
        state_file.load(path)


def test_a_file_of_another_version_is_ignored_with_one_warning(tmp_path: Path) -> None:
    plain = as_plain(saved_bytes([parked("a")], []))
    plain["version"] = 99
    path = tmp_path / "state.msgpack"
    path.write_bytes(msgspec.msgpack.encode(plain))
    with structlog.testing.capture_logs() as logs:
        assert state_file.read(path) is None
    (warning,) = logs
    assert "version 99, expected 1" in warning["error"]


def test_no_file_or_an_unreadable_path_starts_fresh(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        assert state_file.read(tmp_path / "missing.msgpack") is None
        assert logs == []
        assert state_file.read(tmp_path) is None  # a directory where the file should be
    assert [e["event"] for e in logs] == ["state_unreadable"]


def test_save_writes_the_snapshot_not_the_live_state(tmp_path: Path) -> None:
    # The daemon takes the snapshot on the event loop and writes it in a worker thread,
    # while requests keep changing the live state.
    live = parked("a")
    snap = state_file.snapshot([live], [], {}, OLD_MONO, OLD_WALL)
    live.health, live.until, live.uses = Health.READY, 0.0, 99
    path = tmp_path / "deep" / "state.msgpack"
    state_file.save(path, snap)
    assert path.read_bytes() == state_file.encode(snap)
    fresh = cred("a")
    restore_into(path, [fresh], [])
    assert fresh.current_health(NEW_MONO) is Health.PARKED and fresh.uses == 12
    assert [p.name for p in path.parent.iterdir()] == ["state.msgpack"]  # no temporary left


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "state.msgpack"
    state_file.write_atomic(path, b"old")
    (tmp_path / "blocker").mkdir()
    with pytest.raises(IsADirectoryError):
        state_file.write_atomic(tmp_path / "blocker", b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "state.msgpack"]


async def test_the_daemon_starts_and_serves_on_a_state_file_it_cannot_fully_read(
    mock_provider: Callable[[MockSpec], MockProcess], daemon: DaemonFactory, short_dir: Path
) -> None:
    good, revoked = canary("good"), canary("revoked")
    mock = mock_provider(
        MockSpec(
            keys={good: KeySpec("good"), revoked: KeySpec("revoked", kind="invalid")},
            models={"m": ModelSpec()},
        )
    )
    state = short_dir / "state.msgpack"
    config = f"""
[server]
state_file = "{state}"

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [
  {{ label = "good", key_env = "KEY_GOOD" }},
  {{ label = "revoked", key_env = "KEY_REVOKED" }},
]

[routes.r]
chain = ["mock/m"]
"""
    env = {"KEY_GOOD": good, "KEY_REVOKED": revoked}
    first = daemon(config, env=env, name="first")
    async with AsyncClient(str(first.socket_path)) as client:
        for n in range(4):
            await client.chat("r", messages=[{"role": "user", "content": f"hi {n}"}])
    assert mock.stats()["calls"]["revoked"] == {"m": {"401": 1}}
    assert first.stop() == 0

    # What a later release (or a bad edit) could leave: states this version does not know.
    plain = as_plain(state.read_bytes())
    by_label = {c["label"]: c for c in plain["credentials"]}
    by_label["good"]["health"] = "hibernating"
    by_label["good"]["until"] = math.nan
    plain["breakers"][0]["state"] = "melted"
    state.write_bytes(msgspec.msgpack.encode(plain))

    mock.reset()
    second = daemon(config, env=env, name="second")
    async with AsyncClient(str(second.socket_path)) as client:
        for n in range(4):
            reply = await client.chat("r", messages=[{"role": "user", "content": f"again {n}"}])
            assert reply.credential == "good"
        report = await client.status()
    # The readable entry was restored: the revoked key is not tried again.
    assert {c.label: c.state for c in report.credentials}["revoked"] == "disabled"
    assert "revoked" not in mock.stats()["calls"]
    log = second.log_text()
    assert "Traceback" not in log
    warnings = [
        line
        for line in map(msgspec.json.decode, log.splitlines())
        if isinstance(line, dict) and line.get("event") == "state_entry_skipped"
    ]
    assert {(w["entry"], w.get("label") or w.get("target")) for w in warnings} == {
        ("credential", "good"),
        ("breaker", "mock/m"),
    }
    for key in (good, revoked):
        assert key not in log
