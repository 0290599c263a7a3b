"""Conversation affinity: a conversation stays on the credential whose prompt cache holds it.

Providers cache prompt prefixes per organisation (the account behind a key), so a
conversation that moves to another organisation's key pays full price for its whole prompt
again. A request may name its conversation (a session key); its turns then go to the
credential (and target) that served the turn before, while that one can take it now. When
it cannot (cooling, parked, disabled, its breaker open, no room in its windows, or gone),
the turn moves at once, preferring a key of the same cache group (keys of one
organisation, ``cache_group`` in the config), and the session moves with it.

Bounded: at most ``max_sessions`` conversations (least recently used go first), each
forgotten after ``idle_s`` without a turn. Session keys are kept as short hashes, never as
the client sent them (they may name a user).
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from routerd.core.plan import Candidate

# Why a conversation's turn went where it went, as metrics and status count them.
STICKY = "sticky"  # the credential that served the last turn
GROUP = "group"  # another key of the same cache group (the cache is shared)
NEW = "new"  # a conversation routerd had not seen (or had forgotten)
MOVED = "moved"  # elsewhere: the reason says why


@dataclass(slots=True)
class Held:
    """Where one conversation's last turn was served."""

    target: str
    provider: str
    label: str
    group: str | None
    last: float


def session_key(session: str) -> str:
    """The key a session is held under: a short hash, so no client string is kept."""
    return hashlib.blake2b(session.encode(), digest_size=12).hexdigest()


def session_in(body: dict[str, Any]) -> str | None:
    """The conversation a chat body names itself: OpenAI's ``prompt_cache_key``, else its
    ``user`` (where Anthropic's ``metadata.user_id`` lands in translation)."""
    for name in ("prompt_cache_key", "user"):
        value = body.get(name)
        if isinstance(value, str) and value:
            return value
    return None


class Affinity:
    """The conversations routerd keeps on their credentials."""

    def __init__(self, max_sessions: int = 10_000, idle_s: float = 3600.0) -> None:
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self._held: OrderedDict[str, Held] = OrderedDict()
        # Conversations held per (provider, label): a new one goes where fewest are, since
        # each brings its later turns along.
        self._load: Counter[tuple[str, str]] = Counter()
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (outcome, reason) -> turns

    def __len__(self) -> int:
        return len(self._held)

    @property
    def enabled(self) -> bool:
        return self.max_sessions > 0

    def held(self, key: str, now: float) -> Held | None:
        """Where the conversation ``key`` was last served; None when new or forgotten."""
        held = self._held.get(key)
        if held is not None and now - held.last > self.idle_s:
            self._forget(key)
            return None
        return held

    def _expire(self, now: float) -> None:
        """Forget the conversations idle past ``idle_s`` (the oldest are first in line)."""
        while self._held:
            key, held = next(iter(self._held.items()))
            if now - held.last <= self.idle_s:
                return
            self._forget(key)

    def _forget(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._load[(held.provider, held.label)] -= 1

    def _least_held(self, candidates: Sequence[Candidate]) -> Candidate:
        """Among the keys of the plan's first target, the one holding the fewest
        conversations (the plan's order breaks ties): the chain's order still decides the
        target, a fallback is not taken to spread conversations."""
        first = candidates[0].target
        return min(
            (c for c in candidates if c.target is first),
            key=lambda c: self._load[(c.credential.provider, c.credential.label)],
        )

    def choose(
        self,
        key: str,
        candidates: Sequence[Candidate],
        check: Callable[[Held], tuple[Candidate | None, str]],
        now: float,
    ) -> tuple[Candidate, str, str]:
        """The candidate for this turn, with its outcome and reason.

        ``candidates`` is the plan in order (not empty); ``check`` gives the held pair as a
        candidate when it can take this turn now (the plan may list only its first
        candidate), else None and why not.
        """
        held = self.held(key, now)
        if held is None:
            # Held there at once, so conversations starting together spread out.
            chosen = self._least_held(candidates)
            self.served(key, chosen, now)
            return chosen, NEW, ""
        found, reason = check(held)
        if found is not None:
            return found, STICKY, ""
        if held.group is not None:
            for candidate in candidates:
                credential = candidate.credential
                if credential.provider == held.provider and credential.cache_group == held.group:
                    return candidate, GROUP, reason
        chosen = self._least_held(candidates)
        self.served(key, chosen, now)
        return chosen, MOVED, reason

    def served(self, key: str, candidate: Candidate, now: float) -> None:
        """A turn of ``key`` was served by ``candidate``: the conversation is held there."""
        credential = candidate.credential
        held = Held(
            candidate.target.name,
            credential.provider,
            credential.label,
            credential.cache_group,
            now,
        )
        self._hold(key, held)

    def _hold(self, key: str, held: Held) -> None:
        """Hold ``key`` at ``held``, newest last, dropping the oldest past ``max_sessions``."""
        self._forget(key)
        self._held[key] = held
        self._load[(held.provider, held.label)] += 1
        while len(self._held) > self.max_sessions:
            self._forget(next(iter(self._held)))

    def count(self, outcome: str, reason: str) -> None:
        self.outcomes[(outcome, reason)] += 1

    def per_credential(self, now: float) -> Counter[tuple[str, str]]:
        """How many live conversations each (provider, label) holds."""
        self._expire(now)
        return +self._load  # without the credentials that hold none

    def entries(self) -> Iterable[tuple[str, Held]]:
        """Every conversation held, oldest first (for the state file)."""
        return self._held.items()

    def restore(self, key: str, held: Held) -> None:
        """Take back one conversation from the state file."""
        if self.enabled:
            self._hold(key, held)
