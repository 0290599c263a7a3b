"""Where a key is written in a TOML text: line numbers for config error messages.

tomllib returns plain dicts with no positions, so this module scans the text once more
and records the line of every table header, key and array element it sees. It only needs
to understand text that tomllib already accepted; on anything it cannot follow it gives
up quietly and the caller reports the problem without a line.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["KeyPath", "TomlPositions", "format_key"]

KeyPath = tuple[str | int, ...]
"""A path into the parsed document: table keys are str, array indices are int."""

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Everything that is not whitespace, a quote, a comment or TOML punctuation runs together
# into one bare token; values such as 1.5 or 1979-05-27T07:32:00Z are skipped, not read.
_BARE_RUN = re.compile(r"[^\s\"'#\[\]{}=,.]+")


def format_key(path: Sequence[str | int]) -> str:
    """Render a key path the way a user would write it: ``models."a/b".context_window``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
            continue
        text = part if _BARE_KEY.fullmatch(part) else _quote(part)
        out.append(f".{text}" if out else text)
    return "".join(out)


def _quote(key: str) -> str:
    escaped = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "bare", "str", "nl", or the punctuation character itself
    text: str
    line: int
    start: int
    end: int


class _GiveUp(Exception):
    """The scanner met text it does not follow; positions found so far are kept."""


def _tokens(text: str) -> Iterator[_Token]:
    pos = 0
    line = 1
    n = len(text)
    while pos < n:
        ch = text[pos]
        if ch == "\n":
            yield _Token("nl", ch, line, pos, pos + 1)
            line += 1
            pos += 1
        elif ch in " \t\r":
            pos += 1
        elif ch == "#":
            end = text.find("\n", pos)
            pos = n if end < 0 else end
        elif ch in "\"'":
            end = _string_end(text, pos)
            raw = text[pos:end]
            yield _Token("str", raw, line, pos, end)
            line += raw.count("\n")
            pos = end
        elif ch in "[]{}=,.":
            yield _Token(ch, ch, line, pos, pos + 1)
            pos += 1
        else:
            m = _BARE_RUN.match(text, pos)
            if m is None:
                raise _GiveUp(f"unexpected character at line {line}")
            yield _Token("bare", m.group(), line, pos, m.end())
            pos = m.end()


def _string_end(text: str, start: int) -> int:
    quote = text[start]
    if text.startswith(quote * 3, start):
        # A multi-line string may end with up to two extra quotes before the delimiter.
        end = text.find(quote * 3, start + 3)
        if end < 0:
            raise _GiveUp("unterminated multi-line string")
        while text.startswith(quote, end + 3):
            end += 1
        return end + 3
    pos = start + 1
    while pos < len(text):
        ch = text[pos]
        if ch == "\\" and quote == '"':
            pos += 2
            continue
        if ch == quote:
            return pos + 1
        if ch == "\n":
            break
        pos += 1
    raise _GiveUp("unterminated string")


def _key_text(tok: _Token) -> str:
    if tok.kind == "bare":
        return tok.text
    if tok.kind == "str":
        # tomllib itself decodes the quoted key, escapes and all.
        value = tomllib.loads(f"k = {tok.text}")["k"]
        if isinstance(value, str):
            return value
    raise _GiveUp(f"expected a key at line {tok.line}")


class TomlPositions:
    """The line of each key, table header and array element in one TOML text."""

    def __init__(self, text: str) -> None:
        self._explicit: dict[KeyPath, int] = {}
        self._implicit: dict[KeyPath, int] = {}
        self._toks: list[_Token] = []
        self._i = 0
        try:
            self._toks = list(_tokens(text))
            self._scan()
        except (_GiveUp, IndexError, tomllib.TOMLDecodeError):
            pass

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The line where ``path`` is written, else that of its nearest written ancestor.

        A table defined only through dotted keys or deeper headers counts as written where
        it first appears. Returns None when no part of the path is in the text.
        """
        key = tuple(path)
        while key:
            line = self._explicit.get(key, self._implicit.get(key))
            if line is not None:
                return line
            key = key[:-1]
        return None

    def _mark(self, path: KeyPath, line: int) -> None:
        self._explicit.setdefault(path, line)
        for cut in range(1, len(path)):
            self._implicit.setdefault(path[:cut], line)

    def _peek(self) -> _Token:
        return self._toks[self._i]

    def _next(self) -> _Token:
        tok = self._toks[self._i]
        self._i += 1
        return tok

    def _at_end(self) -> bool:
        return self._i >= len(self._toks)

    def _skip_newlines(self) -> None:
        while not self._at_end() and self._peek().kind == "nl":
            self._i += 1

    def _scan(self) -> None:
        table: KeyPath = ()
        array_counts: dict[KeyPath, int] = {}
        while True:
            self._skip_newlines()
            if self._at_end():
                return
            tok = self._peek()
            if tok.kind == "[":
                self._i += 1
                nxt = self._peek()
                is_array = nxt.kind == "[" and nxt.start == tok.end
                if is_array:
                    self._i += 1
                header = self._dotted_key(("]",))
                self._next()
                if is_array:
                    self._next()
                    index = array_counts.get(header, -1) + 1
                    array_counts[header] = index
                    self._implicit.setdefault(header, tok.line)
                    table = (*header, index)
                else:
                    table = header
                self._mark(table, tok.line)
            else:
                self._key_value(table)
            if not self._at_end() and self._peek().kind != "nl":
                raise _GiveUp(f"trailing text at line {self._peek().line}")

    def _dotted_key(self, stop: tuple[str, ...]) -> KeyPath:
        parts: list[str | int] = []
        while True:
            parts.append(_key_text(self._next()))
            tok = self._peek()
            if tok.kind in stop:
                return tuple(parts)
            if tok.kind != ".":
                raise _GiveUp(f"bad key at line {tok.line}")
            self._i += 1

    def _key_value(self, table: KeyPath) -> None:
        line = self._peek().line
        path = (*table, *self._dotted_key(("=",)))
        self._next()
        self._mark(path, line)
        self._value(path)

    def _value(self, path: KeyPath) -> None:
        tok = self._peek()
        if tok.kind == "[":
            self._i += 1
            self._array(path)
        elif tok.kind == "{":
            self._i += 1
            self._inline_table(path)
        else:
            # A scalar: one string token, or bare tokens and dots (numbers, dates, booleans).
            while not self._at_end() and self._peek().kind not in ("nl", ",", "]", "}"):
                self._i += 1

    def _array(self, path: KeyPath) -> None:
        index = 0
        while True:
            self._skip_newlines()
            tok = self._peek()
            if tok.kind == "]":
                self._i += 1
                return
            self._mark((*path, index), tok.line)
            self._value((*path, index))
            self._skip_newlines()
            if self._peek().kind == ",":
                self._i += 1
            index += 1

    def _inline_table(self, path: KeyPath) -> None:
        while True:
            self._skip_newlines()
            tok = self._peek()
            if tok.kind == "}":
                self._i += 1
                return
            if tok.kind == ",":
                self._i += 1
                continue
            self._key_value(path)
