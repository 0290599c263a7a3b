"""The mock provider's mutable state: models, per-key rate-limit windows and call counts.

Dialect-neutral: the OpenAI module (and any later dialect) asks it questions and renders
the answers in its own wire format. Every method is synchronous, so a check-and-admit can
never interleave with another request's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from routerd.mock.limits import SlidingWindow, WindowState
from routerd.mock.spec import KeySpec, MockSpec, ModelSpec

Rejection = Literal["requests", "tokens", "too_large"]


@dataclass(frozen=True, slots=True)
class Admission:
    """A key's windows after asking them to take one request.

    ``rejected`` names the window that refused (``too_large``: the request alone exceeds
    the token limit, so waiting will not help); ``used`` is that window's use, for the
    error message. A rejected request leaves the windows untouched.
    """

    requests: WindowState | None
    tokens: WindowState | None
    rejected: Rejection | None = None
    retry_after_s: float = 0.0
    used: int = 0


class Stats(msgspec.Struct, frozen=True):
    """Chat calls by key label, then model, then status (an HTTP code, "timeout" or "reset")."""

    calls: dict[str, dict[str, dict[str, int]]]
    total: int


@dataclass(slots=True)
class _KeyWindows:
    requests: SlidingWindow | None
    tokens: SlidingWindow | None


class MockState:
    """Everything the mock remembers between requests; ``clock`` is injectable for tests."""

    def __init__(self, spec: MockSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.models: dict[str, ModelSpec] = dict(spec.models)
        self._clock = clock
        self._windows: dict[str, _KeyWindows] = {}
        self._calls: dict[str, dict[str, dict[str, int]]] = {}
        self._total = 0

    def key(self, secret: str) -> KeySpec | None:
        """The spec of the key with this secret, None for a key the mock never issued."""
        return self.spec.keys.get(secret)

    def latency_s(self, model: ModelSpec) -> float:
        """How long a reply from ``model`` takes before its first byte."""
        ms = model.latency_ms if model.latency_ms is not None else self.spec.latency_ms
        return ms / 1000

    def _windows_of(self, secret: str, key: KeySpec) -> _KeyWindows:
        windows = self._windows.get(secret)
        if windows is None:
            windows = _KeyWindows(
                requests=SlidingWindow(key.rpm, key.window_s) if key.rpm else None,
                tokens=SlidingWindow(key.tpm, key.window_s) if key.tpm else None,
            )
            self._windows[secret] = windows
        return windows

    def peek(self, secret: str, key: KeySpec) -> Admission:
        """The key's windows as they stand, for responses that never reach admission."""
        now = self._clock()
        windows = self._windows_of(secret, key)
        return _admission(windows, now)

    def admit(self, secret: str, key: KeySpec, tokens: int) -> Admission:
        """Admit one request of ``tokens`` estimated tokens, or say which window refuses."""
        now = self._clock()
        windows = self._windows_of(secret, key)
        if windows.tokens is not None and tokens > windows.tokens.limit:
            return _admission(windows, now, "too_large")
        if windows.requests is not None:
            wait = windows.requests.wait_for(1, now)
            if wait > 0:
                used = windows.requests.used(now)
                return _admission(windows, now, "requests", wait, used)
        if windows.tokens is not None:
            wait = windows.tokens.wait_for(tokens, now)
            if wait > 0:
                used = windows.tokens.used(now)
                return _admission(windows, now, "tokens", wait, used)
        if windows.requests is not None:
            windows.requests.add(1, now)
        if windows.tokens is not None:
            windows.tokens.add(tokens, now)
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

    def set_model(self, name: str, model: ModelSpec) -> None:
        """Replace (or add) one model's spec, e.g. to start or end an outage."""
        self.models[name] = model


def _admission(
    windows: _KeyWindows,
    now: float,
    rejected: Rejection | None = None,
    retry_after_s: float = 0.0,
    used: int = 0,
) -> Admission:
    return Admission(
        requests=windows.requests.state(now) if windows.requests else None,
        tokens=windows.tokens.state(now) if windows.tokens else None,
        rejected=rejected,
        retry_after_s=retry_after_s,
        used=used,
    )
