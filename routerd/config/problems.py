"""Config problems: what is wrong, at which key and line, in words a person can act on.

Owns ConfigProblem and ConfigError, and the translation of tomllib's and msgspec's first
error into one ConfigProblem; routerd.config re-exports the public names.
"""

from __future__ import annotations

import ast
import copy
import difflib
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import msgspec

from routerd.config.tomlpos import KeyPath, TomlPositions, format_key

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "ProblemList",
    "schema_problem",
    "schema_problems",
    "syntax_problem",
]

# A file with more schema problems than this is reported in part (the rest after a fix).
SCHEMA_PROBLEMS_MAX = 50


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config: where it is (file, line, dotted key) and what."""

    source: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` lists every reason found, one per line."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[ConfigProblem]]]:
        return (type(self), (self.problems,))


class ProblemList:
    """Collects problems about one config text, each placed on the line of its key."""

    def __init__(self, source: str, text: str | None = None) -> None:
        self.source = source
        self._positions = TomlPositions(text) if text is not None else None
        self._problems: list[ConfigProblem] = []

    def add(self, path: Sequence[str | int], message: str) -> None:
        """Record ``message`` about the key at ``path`` (line of the key, else of its table)."""
        line = self._positions.line_of(path) if self._positions is not None else None
        self._problems.append(ConfigProblem(self.source, line, format_key(path), message))

    def extend(self, problems: Iterable[ConfigProblem]) -> None:
        """Add problems found elsewhere, as they are."""
        self._problems.extend(problems)

    @property
    def problems(self) -> list[ConfigProblem]:
        """All problems, in the order they appear in the file (those without a line last)."""
        return sorted(self._problems, key=lambda p: (p.line is None, p.line or 0))

    def raise_if_any(self) -> None:
        """Raise one ConfigError carrying every problem, if there are any."""
        if self._problems:
            raise ConfigError(self.problems)


_TOML_KEY_TUPLE = re.compile(r"\((?:'[^']*'|\"[^\"]*\")(?:, ?(?:'[^']*'|\"[^\"]*\"))*,?\)")
_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_AT_END = re.compile(r"\s*\(at end of document\)\s*$")


def syntax_problem(exc: tomllib.TOMLDecodeError, text: str, source: str) -> ConfigProblem:
    """The problem for a TOML syntax error, on the line tomllib names in its message."""
    message = _TOML_KEY_TUPLE.sub(_key_tuple_as_key, str(exc))
    line: int | None = None
    if m := _TOML_AT.search(message):
        line = int(m.group(1))
        message = f"{message[: m.start()]} at column {m.group(2)}"
    elif m := _TOML_AT_END.search(message):
        # The parser ran off the end: the last written line is where the user should look.
        lines = text.splitlines()
        line = next((n for n in range(len(lines), 0, -1) if lines[n - 1].strip()), None)
        message = f"{message[: m.start()]} at end of file"
    return ConfigProblem(source, line, "", f"TOML syntax error: {_lower_first(message)}")


def _key_tuple_as_key(m: re.Match[str]) -> str:
    # tomllib names a table by its Python key tuple; show it the way the file writes it.
    try:
        parts = ast.literal_eval(m.group())
    except (ValueError, SyntaxError):
        return m.group()
    if isinstance(parts, tuple) and all(isinstance(p, str) for p in parts):
        return format_key(parts)
    return m.group()


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


_SCHEMA_AT = re.compile(r"^(?P<msg>.*?) - at `\$(?P<path>[^`]*)`$", re.S)
_SCHEMA_STEP = re.compile(r"\.(?P<name>[^.\[]+)|\[(?P<index>\d+)\]|(?P<any>\[\.\.\.\])")
_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "object": "a table",
    "array": "an array",
    "datetime": "a date-time",
    "date": "a date",
    "time": "a time",
}
_SECRET_KEY_NAMES = {"key", "api_key", "apikey", "secret", "token", "password"}


def schema_problem(
    exc: msgspec.ValidationError, raw: Any, root: type, source: str, text: str
) -> ConfigProblem:
    """The problem for msgspec's (first) validation error converting ``raw`` to ``root``."""
    path, message = _explain(str(exc), raw, root)
    problems = ProblemList(source, text)
    problems.add(path, message)
    return problems.problems[0]


def schema_problems(raw: Any, root: type, source: str, text: str) -> list[ConfigProblem]:
    """Every schema problem of ``raw`` as ``root``, not only msgspec's first.

    msgspec stops at the first error; each is repaired in a copy of the document (an unknown
    key dropped, a missing or wrong value replaced by a stand-in of the right type) and the
    conversion tried again, so one run names every bad key.
    """
    doc = copy.deepcopy(raw)
    problems = ProblemList(source, text)
    repaired: set[KeyPath] = set()
    for _ in range(SCHEMA_PROBLEMS_MAX):
        try:
            msgspec.convert(doc, root)
        except msgspec.ValidationError as exc:
            path, message = _explain(str(exc), doc, root)
            problems.add(path, message)
            if path in repaired or not _repair(str(exc), doc, root):
                break  # no stand-in satisfies it: what is reported so far stands
            repaired.add(path)
        else:
            break
    return problems.problems


def _repair(error: str, doc: Any, root: type) -> bool:
    """Change ``doc`` so that the error is gone; False when it cannot."""
    m = _SCHEMA_AT.match(error)
    message, path_text = (m.group("msg"), m.group("path")) if m else (error, "")
    path, typ, _ = _follow(path_text, doc, root)
    container = _at(doc, path)
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", message):
        if isinstance(container, dict):
            container.pop(m.group(1), None)
            return True
        return False
    if m := re.fullmatch(r"Object missing required field `(.+)`", message):
        field_type = _struct_fields(typ).get(m.group(1))
        if isinstance(container, dict) and field_type is not None:
            container[m.group(1)] = _stand_in(field_type)
            return True
        return False
    parent = _at(doc, path[:-1]) if path else None
    if isinstance(parent, dict | list) and path:
        parent[path[-1]] = _stand_in(typ)  # type: ignore[index]
        return True
    return False


def _at(doc: Any, path: KeyPath) -> Any:
    for step in path:
        if isinstance(doc, dict):
            doc = doc.get(step)
        elif isinstance(doc, list) and isinstance(step, int) and step < len(doc):
            doc = doc[step]
        else:
            return None
    return doc


def _stand_in(typ: Any) -> Any:
    """A value of type ``typ`` that converts (for the repair of a copy, never used)."""
    if type(None) in get_args(typ):
        return None
    typ = _strip_optional(typ)
    origin = get_origin(typ)
    if origin is Literal:
        return get_args(typ)[0]
    if origin is list:
        return []
    if origin is dict:
        return {}
    if get_args(typ) and hasattr(typ, "__metadata__"):
        typ = get_args(typ)[0]  # Annotated[int, Meta(ge=1)] and the like
    stand_ins: dict[Any, Any] = {str: "x", int: 1, float: 1.0, bool: False}
    if typ in stand_ins:
        return stand_ins[typ]
    fields = _struct_fields(typ)
    if fields:
        return {}
    return None


def _explain(error: str, raw: Any, root: type) -> tuple[KeyPath, str]:
    m = _SCHEMA_AT.match(error)
    message, path_text = (m.group("msg"), m.group("path")) if m else (error, "")
    path, typ, value = _follow(path_text, raw, root)
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", message):
        name = m.group(1)
        return (*path, name), _unknown_key_message(name, typ)
    if m := re.fullmatch(r"Object missing required field `(.+)`", message):
        return (*path, m.group(1)), f"required key '{m.group(1)}' is missing"
    choices = _literal_choices(typ)
    if choices is not None:
        return path, f"expected one of {', '.join(choices)}; got {_show(value)}"
    if m := re.fullmatch(r"Expected `(.+)`, got `(.+)`", message):
        return path, f"expected {_type_name(m.group(1))}, got {_show(value)}"
    return path, _lower_first(message)


def _follow(path_text: str, raw: Any, root: type) -> tuple[KeyPath, Any, Any]:
    """Walk msgspec's error path through the raw document and the Config type together.

    msgspec writes every dict key as ``[...]``; the key is found again by converting each
    entry in order, since the first one that fails is the one msgspec stopped at.
    """
    path: list[str | int] = []
    typ: Any = root
    value: Any = raw
    for step in _SCHEMA_STEP.finditer(path_text):
        typ = _strip_optional(typ)
        if name := step.group("name"):
            fields = _struct_fields(typ)
            typ = fields.get(name)
            value = value.get(name) if isinstance(value, dict) else None
            path.append(name)
        elif index := step.group("index"):
            i = int(index)
            typ = get_args(typ)[0] if get_origin(typ) is list else None
            value = value[i] if isinstance(value, list) and i < len(value) else None
            path.append(i)
        else:
            if get_origin(typ) is not dict or not isinstance(value, dict):
                break
            item_type = get_args(typ)[1]
            key = next((k for k, v in value.items() if not _converts(v, item_type)), None)
            if key is None:
                break
            typ, value = item_type, value[key]
            path.append(key)
    return tuple(path), _strip_optional(typ), value


def _converts(value: Any, typ: Any) -> bool:
    try:
        msgspec.convert(value, typ)
    except msgspec.ValidationError:
        return False
    return True


def _struct_fields(typ: Any) -> dict[str, Any]:
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        return {f.encode_name: f.type for f in msgspec.structs.fields(typ)}
    return {}


def _strip_optional(typ: Any) -> Any:
    args = get_args(typ)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return typ


def _literal_choices(typ: Any) -> list[str] | None:
    if get_origin(typ) is Literal:
        return [str(a) for a in get_args(typ)]
    return None


def _type_name(msgspec_type: str) -> str:
    names = [_TYPE_NAMES.get(t, t) for t in msgspec_type.split(" | ") if t != "null"]
    return " or ".join(names)


def _show(value: Any) -> str:
    """A short rendering of a wrong value; long strings are not echoed (they may be keys)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A key pasted into the wrong field must not be printed back; no API key is this short.
        return repr(value) if len(value) <= 16 else f"a {len(value)}-character string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _unknown_key_message(name: str, typ: Any) -> str:
    known = list(_struct_fields(typ))
    if name.lower() in _SECRET_KEY_NAMES and "key_env" in known:
        return (
            f"unknown key '{name}'; secrets do not go in the config: name them with key_env, "
            "key_file or key_credential"
        )
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{name}'{hint}"
