"""Prompt directives: ``[[mock:...]]`` markers that make a single request misbehave."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, cast, get_args

FailDirective = Literal["503", "500", "529", "timeout", "reset", "midstream", "cut", "context"]

# ``[[mock:name=value]]``, or ``[[mock:name]]`` for a flag.
_DIRECTIVE = re.compile(r"\[\[mock:([a-z_]+)(?:=([^\]]*))?\]\]")
_FAILS: frozenset[str] = frozenset(get_args(FailDirective))


class DirectiveError(ValueError):
    """A ``[[mock:...]]`` marker the mock does not understand (a typo in a test)."""


@dataclass(frozen=True, slots=True)
class Directives:
    """What the last user message asked of the mock."""

    fail: FailDirective | None = None
    sleep_ms: float | None = None
    tool: str | None = None
    # Anthropic streams: send one event of a type no client knows yet ("future_event").
    unknown_event: bool = False


def parse_directives(text: str) -> Directives:
    """Read every ``[[mock:...]]`` marker in ``text``; raise DirectiveError on a bad one."""
    fail: FailDirective | None = None
    sleep_ms: float | None = None
    tool: str | None = None
    unknown_event = False
    for match in _DIRECTIVE.finditer(text):
        name, raw = match.group(1), match.group(2)
        value = raw.strip() if raw is not None else None
        if name == "unknown_event" and value is None:
            unknown_event = True
        elif value is None:
            raise DirectiveError(f"Unknown mock directive {match.group(0)!r}.")
        elif name == "fail" and value in _FAILS:
            fail = cast(FailDirective, value)
        elif name == "sleep" and _is_number(value):
            sleep_ms = float(value)
        elif name == "tool" and value:
            tool = value
        else:
            raise DirectiveError(f"Unknown mock directive {match.group(0)!r}.")
    return Directives(fail=fail, sleep_ms=sleep_ms, tool=tool, unknown_event=unknown_event)


def strip_directives(text: str) -> str:
    """``text`` without its markers, so replies echo only what the user actually wrote."""
    return _DIRECTIVE.sub("", text).strip()


def _is_number(value: str) -> bool:
    try:
        number = float(value)
    except ValueError:
        return False
    return math.isfinite(number) and number >= 0
