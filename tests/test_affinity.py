"""Conversation affinity in the core: where a conversation's next turn goes, and why."""

from __future__ import annotations

from pathlib import Path

from routerd import state as state_file
from routerd.core.affinity import (
    GROUP,
    MOVED,
    NEW,
    STICKY,
    Affinity,
    Held,
    session_in,
    session_key,
)
from routerd.core.breaker import Breaker
from routerd.core.credential import CredentialState, Health
from routerd.core.plan import Candidate, Target, held_pair, plan

NOW = 1000.0


def pool(*groups: str | None) -> Target:
    creds = [
        CredentialState("p", f"k{n}", f"sha256:{n}", n, proven=True, cache_group=group)
        for n, group in enumerate(groups)
    ]
    return Target("p/m", "p", "m", "openai", "fill_first", Breaker("p/m", proven=True), creds)


def turn(affinity: Affinity, key: str, target: Target, now: float = NOW) -> tuple[str, str, str]:
    """Place one turn as the dispatcher does, serve it, and say where it went and why."""
    decision = plan([target], 100, now)

    def check(held: Held) -> tuple[Candidate | None, str]:
        return held_pair([target], held.target, held.provider, held.label, 100, now)

    candidate, outcome, reason = affinity.choose(key, decision.candidates, check, now)
    affinity.served(key, candidate, now)
    return candidate.credential.label, outcome, reason


def test_a_conversation_stays_on_its_key_and_moves_once_when_it_cools() -> None:
    target = pool(None, None, None, None)
    affinity = Affinity()
    key = session_key("conversation-1")
    assert turn(affinity, key, target) == ("k0", NEW, "")
    # fill_first would pick k0 anyway; make k1 the one that served it, and it stays there.
    affinity.served(key, Candidate(target, target.pool[1]), NOW)
    for _ in range(5):
        assert turn(affinity, key, target) == ("k1", STICKY, "")
    target.pool[1].health, target.pool[1].until = Health.COOLING, NOW + 30
    assert turn(affinity, key, target) == ("k0", MOVED, "cooling")
    target.pool[1].health = Health.READY
    # The session moved with the turn: it stays on k0 now, even with k1 back.
    assert turn(affinity, key, target) == ("k0", STICKY, "")


def test_a_move_prefers_a_key_of_the_same_cache_group() -> None:
    target = pool("org-a", "org-b", "org-b")
    affinity = Affinity()
    key = session_key("c")
    affinity.served(key, Candidate(target, target.pool[1]), NOW)
    target.pool[1].health, target.pool[1].until = Health.PARKED, NOW + 3600
    assert turn(affinity, key, target) == ("k2", GROUP, "parked")


def test_sessions_are_bounded_and_forgotten_when_idle() -> None:
    target = pool(None, None)
    affinity = Affinity(max_sessions=2, idle_s=60)
    for name in ("a", "b", "c"):
        turn(affinity, session_key(name), target)
    assert len(affinity) == 2 and affinity.held(session_key("a"), NOW) is None
    # New conversations went where fewest were held: a and c on k0, b on k1; a is gone.
    assert affinity.per_credential(NOW) == {("p", "k0"): 1, ("p", "k1"): 1}
    assert affinity.held(session_key("c"), NOW + 61) is None


def test_the_session_key_is_a_hash_and_bodies_name_their_conversation() -> None:
    assert session_key("alice@example.com") != "alice@example.com"
    assert "alice" not in session_key("alice@example.com")
    assert session_in({"prompt_cache_key": "pc", "user": "u"}) == "pc"
    assert session_in({"user": "u"}) == "u"
    assert session_in({"user": 7}) is None


def test_held_sessions_survive_the_state_file(tmp_path: Path) -> None:
    target = pool(None, "g")
    affinity = Affinity()
    affinity.served(session_key("alice@example.com"), Candidate(target, target.pool[1]), NOW)
    snap = state_file.snapshot(target.pool, [target.breaker], {}, NOW, 50_000.0, affinity)
    path = tmp_path / "state"
    state_file.save(path, snap)
    again = Affinity()
    loaded = state_file.load(path)
    assert loaded is not None
    state_file.restore(loaded, target.pool, [target.breaker], {}, 10.0, 50_010.0, again)
    held = again.held(session_key("alice@example.com"), 10.0)
    assert held is not None and (held.label, held.group) == ("k1", "g")
    assert held.last == 0.0  # saved 10 s ago in wall time, so 10 s before now
    assert b"alice" not in path.read_bytes()  # only the hash is kept


def test_cache_group_and_long_context_reach_the_credential_from_the_config() -> None:
    from routerd.build import credential_state
    from routerd.config.load import parse_config
    from routerd.config.secrets import resolve_secrets

    config = parse_config(
        """
[providers.a]
kind = "anthropic"
base_url = "https://api.anthropic.com"
credentials = [
  { label = "team", key_env = "K1", cache_group = "org-1" },
  { label = "solo", key_env = "K2", long_context = false },
]

[routes.r]
chain = ["a/claude"]
"""
    )
    secrets = resolve_secrets(
        config, environ={"K1": "sk-ant-aaaaaaaaaaaa1", "K2": "sk-ant-bbbbbbbbbbbb2"}
    )
    team, solo = (credential_state(s, config, n) for n, s in enumerate(secrets))
    assert (team.cache_group, team.long_context) == ("org-1", True)
    assert (solo.cache_group, solo.long_context) == (None, False)


def test_new_conversations_spread_over_the_first_target_not_to_a_fallback() -> None:
    primary = pool(None, None)
    backup = Target(
        "b/m",
        "b",
        "m",
        "openai",
        "fill_first",
        Breaker("b/m", proven=True),
        [CredentialState("b", "only", "sha256:b", 0, proven=True)],
    )
    affinity = Affinity()
    placed = []
    for name in ("a", "b", "c", "d"):
        decision = plan([primary, backup], 100, NOW)
        candidate, outcome, _ = affinity.choose(
            session_key(name), decision.candidates, lambda h: (None, ""), NOW
        )
        assert outcome == NEW
        placed.append((candidate.target.name, candidate.credential.label))
    assert placed == [("p/m", "k0"), ("p/m", "k1"), ("p/m", "k0"), ("p/m", "k1")]
