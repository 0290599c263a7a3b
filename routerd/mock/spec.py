"""The mock provider's spec: which keys it accepts, which models it serves, how they misbehave."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

KeyKind = Literal["good", "invalid", "no_quota", "spend_limit"]
Fault = Literal["503", "500", "529", "timeout", "reset", "midstream", "cut"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class KeySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One API key the mock knows.

    ``rpm`` and ``tpm`` are the limits of sliding windows ``window_s`` long (60 s like the
    real thing; tests shorten it so a full window drains within the test).

    The rest is read by the Anthropic dialect only: ``itpm``/``otpm`` are Anthropic's
    separate input and output token windows; ``long_context_rpm`` is a window of its own for
    long-context requests (which count in the other windows too), and ``long_context``
    False refuses such requests outright. Kind "spend_limit" is Anthropic's monthly spend
    cap; the OpenAI dialect serves that kind like a good key.
    """

    label: str
    kind: KeyKind = "good"
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    window_s: PositiveFloat = 60.0
    itpm: PositiveInt | None = None
    otpm: PositiveInt | None = None
    long_context_rpm: PositiveInt | None = None
    long_context: bool = True
    # The organisation behind the key: keys of one organisation share a prompt cache.
    org: str | None = None


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One model the mock serves; ``fault`` applies to every request for it.

    ``long_context_window``, when set, is the larger window a request may use with the
    long-context beta (Anthropic dialect only; the OpenAI dialect ignores it).
    """

    context_window: PositiveInt = 128000
    fault: Fault | None = None
    latency_ms: NonNegativeFloat | None = None
    long_context_window: PositiveInt | None = None

    def __post_init__(self) -> None:
        # A long window no larger than the normal one could never apply: surely a typo.
        if self.long_context_window is not None and self.long_context_window <= self.context_window:
            raise ValueError("long_context_window must exceed context_window")


class MockSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The whole mock provider: keys by their secret string, models by name."""

    keys: dict[str, KeySpec]
    models: dict[str, ModelSpec]
    latency_ms: NonNegativeFloat = 5


def decode_spec(data: bytes | str) -> MockSpec:
    """Decode and validate a MockSpec from JSON (raises msgspec.ValidationError)."""
    return msgspec.json.decode(data, type=MockSpec)
