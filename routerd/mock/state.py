"""The mock provider's mutable state: models, per-key rate-limit windows and call counts.

Dialect-neutral: the OpenAI module (and any later dialect) asks it questions and renders
the answers in its own wire format. Every method is synchronous, so a check-and-admit can
never interleave with another request's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from routerd.mock.cache import PromptCache
from routerd.mock.limits import SlidingWindow, WindowState
from routerd.mock.spec import KeySpec, MockSpec, ModelSpec

WindowName = Literal["requests", "tokens", "input_tokens", "output_tokens", "long_requests"]
Rejection = Literal[
    "requests", "tokens", "input_tokens", "output_tokens", "long_requests", "too_large"
]


@dataclass(frozen=True, slots=True)
class Admission:
    """A key's windows after asking them to take one request.

    ``rejected`` names the window that refused (``too_large``: the request alone exceeds
    a token window's limit, so waiting will not help; ``refused_by`` then names that
    window); ``used`` is the refusing window's use, for the error message. A rejected
    request leaves the windows untouched.
    """

    requests: WindowState | None
    tokens: WindowState | None
    rejected: Rejection | None = None
    retry_after_s: float = 0.0
    used: int = 0
    input_tokens: WindowState | None = None
    output_tokens: WindowState | None = None
    long_requests: WindowState | None = None
    refused_by: WindowName | None = None


class Stats(msgspec.Struct, frozen=True):
    """Chat calls by key label, then model, then status (an HTTP code, "timeout" or "reset")."""

    calls: dict[str, dict[str, dict[str, int]]]
    total: int


class MockState:
    """Everything the mock remembers between requests; ``clock`` is injectable for tests."""

    def __init__(self, spec: MockSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.models: dict[str, ModelSpec] = dict(spec.models)
        self._clock = clock
        self._windows: dict[str, dict[WindowName, SlidingWindow]] = {}
        self._calls: dict[str, dict[str, dict[str, int]]] = {}
        self._total = 0
        self.cache = PromptCache()

    def cached_tokens(self, key: KeySpec, parts: Sequence[tuple[bytes, int]]) -> int:
        """The prompt tokens this key's organisation has cached (see mock/cache.py)."""
        return self.cache.read(key.org or key.label, parts)

    def key(self, secret: str) -> KeySpec | None:
        """The spec of the key with this secret, None for a key the mock never issued."""
        return self.spec.keys.get(secret)

    def latency_s(self, model: ModelSpec) -> float:
        """How long a reply from ``model`` takes before its first byte."""
        ms = model.latency_ms if model.latency_ms is not None else self.spec.latency_ms
        return ms / 1000

    def _windows_of(self, secret: str, key: KeySpec) -> dict[WindowName, SlidingWindow]:
        windows = self._windows.get(secret)
        if windows is None:
            limits: dict[WindowName, int | None] = {
                "requests": key.rpm,
                "tokens": key.tpm,
                "input_tokens": key.itpm,
                "output_tokens": key.otpm,
                "long_requests": key.long_context_rpm,
            }
            windows = {
                name: SlidingWindow(limit, key.window_s)
                for name, limit in limits.items()
                if limit is not None
            }
            self._windows[secret] = windows
        return windows

    def peek(self, secret: str, key: KeySpec) -> Admission:
        """The key's windows as they stand, for responses that never reach admission."""
        now = self._clock()
        windows = self._windows_of(secret, key)
        return _admission(windows, now)

    def admit(self, secret: str, key: KeySpec, tokens: int) -> Admission:
        """Admit one request of ``tokens`` estimated tokens, or say which window refuses."""
        return self.admit_amounts(secret, key, {"requests": 1, "tokens": tokens})

    def admit_amounts(
        self, secret: str, key: KeySpec, amounts: Mapping[WindowName, int]
    ) -> Admission:
        """Admit one request taking ``amounts`` from the named windows, or say which refuses.

        Windows the key lacks, and windows not named, are not consulted. A request too large
        for a window outright is refused first (it will never fit); otherwise the first
        full window in ``amounts`` order refuses.
        """
        now = self._clock()
        windows = self._windows_of(secret, key)
        present = [
            (name, amount, windows[name]) for name, amount in amounts.items() if name in windows
        ]
        for name, amount, window in present:
            if amount > window.limit:
                return _admission(windows, now, "too_large", refused_by=name)
        for name, amount, window in present:
            wait = window.wait_for(amount, now)
            if wait > 0:
                used = window.used(now)
                return _admission(windows, now, name, wait, used, refused_by=name)
        for _, amount, window in present:
            window.add(amount, now)
        return _admission(windows, now)

    def record(self, label: str, model: str, outcome: str) -> None:
        """Count one chat call under its key label, model and outcome."""
        by_model = self._calls.setdefault(label, {}).setdefault(model, {})
        by_model[outcome] = by_model.get(outcome, 0) + 1
        self._total += 1

    def stats(self) -> Stats:
        """A copy of the call counts."""
        calls = {
            label: {model: dict(outcomes) for model, outcomes in models.items()}
            for label, models in self._calls.items()
        }
        return Stats(calls=calls, total=self._total)

    def reset(self) -> None:
        """Forget call counts and empty every window (models keep their current spec)."""
        self._calls.clear()
        self._total = 0
        self._windows.clear()
        self.cache.clear()

    def set_model(self, name: str, model: ModelSpec) -> None:
        """Replace (or add) one model's spec, e.g. to start or end an outage."""
        self.models[name] = model


def _admission(
    windows: Mapping[WindowName, SlidingWindow],
    now: float,
    rejected: Rejection | None = None,
    retry_after_s: float = 0.0,
    used: int = 0,
    *,
    refused_by: WindowName | None = None,
) -> Admission:
    def state(name: WindowName) -> WindowState | None:
        window = windows.get(name)
        return window.state(now) if window is not None else None

    return Admission(
        requests=state("requests"),
        tokens=state("tokens"),
        rejected=rejected,
        retry_after_s=retry_after_s,
        used=used,
        input_tokens=state("input_tokens"),
        output_tokens=state("output_tokens"),
        long_requests=state("long_requests"),
        refused_by=refused_by,
    )
