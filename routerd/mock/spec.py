"""The mock provider's spec: which keys it accepts, which models it serves, how they misbehave."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

KeyKind = Literal["good", "invalid", "no_quota"]
Fault = Literal["503", "500", "529", "timeout", "reset", "midstream", "cut"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class KeySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One API key the mock knows.

    ``rpm`` and ``tpm`` are the limits of sliding windows ``window_s`` long (60 s like the
    real thing; tests shorten it so a full window drains within the test).
    """

    label: str
    kind: KeyKind = "good"
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    window_s: PositiveFloat = 60.0


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One model the mock serves; ``fault`` applies to every request for it."""

    context_window: PositiveInt = 128000
    fault: Fault | None = None
    latency_ms: NonNegativeFloat | None = None


class MockSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The whole mock provider: keys by their secret string, models by name."""

    keys: dict[str, KeySpec]
    models: dict[str, ModelSpec]
    latency_ms: NonNegativeFloat = 5


def decode_spec(data: bytes | str) -> MockSpec:
    """Decode and validate a MockSpec from JSON (raises msgspec.ValidationError)."""
    return msgspec.json.decode(data, type=MockSpec)
