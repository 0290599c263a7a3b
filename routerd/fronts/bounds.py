"""What both fronts accept in a request's values before routing it: JSON-shaped, bounded.

A request travels on to a provider as JSON, so it must be JSON-shaped: maps with string
keys, lists, strings, booleans, null, finite floats, and integers that JSON parsers built on
doubles read exactly. Its nesting is bounded too, so nothing downstream (token estimates,
translation, the JSON and msgpack encoders) recurses without limit. The check walks the
value with an explicit stack: a hostile request cannot make the checker itself recurse.
"""

from __future__ import annotations

import math
from typing import Any

#: Containers inside a request, the request itself being level 1. Real requests (messages,
#: content parts, tool schemas) stay far below this.
MAX_DEPTH = 64
#: JSON parsers that read numbers as doubles (JavaScript's among them) are exact up to 2**53.
MAX_INT = 2**53

_SCALARS = (str, bool, type(None))
_NONE = type(None)


def check_request(request: dict[Any, Any]) -> str | None:
    """Why this request map cannot be sent on, naming the top-level key at fault; None when
    it can. One pass, level by level, over every container (the common case); the key is
    looked for only when something is wrong."""
    level: list[Any] = [request]
    depth = 1
    while level:
        deeper: list[Any] = []
        for container in level:
            if type(container) is dict:
                for key in container:
                    if type(key) is not str:
                        return _fault(request)
                items = container.values()
            else:
                items = container
            for item in items:
                kind = type(item)
                if kind is str or kind is bool or kind is _NONE:
                    continue
                if kind is dict or kind is list:
                    deeper.append(item)
                elif kind is int:
                    if not -MAX_INT <= item <= MAX_INT:
                        return _fault(request)
                elif kind is not float or not math.isfinite(item):
                    return _fault(request)
        depth += 1
        if deeper and depth > MAX_DEPTH:
            return _fault(request)
        level = deeper
    return None


def _fault(request: dict[Any, Any]) -> str:
    for key in request:
        if type(key) is not str:
            return f"map keys must be strings, got {type(key).__name__}"
    for key, value in request.items():
        problem = check_value(value)
        if problem is not None:
            return f"{key}: {problem}"
    return "a value cannot be sent to a provider as JSON"


def check_value(value: Any) -> str | None:
    """Why ``value``, one value of a request's top-level map, cannot be sent on; None when
    it can."""
    # Level 2: the request map is level 1 and this is one of its values.
    stack: list[tuple[Any, int]] = [(value, 2)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is int:
            if not -MAX_INT <= item <= MAX_INT:
                return f"the integer {item} is out of range (at most ±2**53, what JSON carries)"
        elif kind is float:
            if not math.isfinite(item):
                return f"{item} is not a number JSON can carry"
        elif kind is list or kind is dict:
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            if kind is dict:
                for key in item:
                    if type(key) is not str:
                        return f"map keys must be strings, got {type(key).__name__}"
                children = item.values()
            else:
                children = item
            stack.extend((child, depth + 1) for child in children)
        else:
            return f"{kind.__name__} values cannot be sent to a provider as JSON"
    return None
