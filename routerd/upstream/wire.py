"""The upstream client's bytes and errors: a parsed endpoint, the request it sends, and the
exceptions a failed exchange raises (``common.translate_http_error`` names each one).

Sans-IO: nothing here touches a socket, so the request bytes and the URL rules are tested
without a server.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "Endpoint",
    "HTTPError",
    "InvalidURL",
    "NetworkError",
    "ProtocolError",
    "ReadError",
    "ReadTimeout",
    "RefusedHeader",
    "parse_endpoint",
]


class HTTPError(Exception):
    """Any failure of an upstream exchange below the HTTP status (a "network error")."""


class InvalidURL(HTTPError):
    """The target's URL cannot be reached over HTTP: unparsable, no host, not http(s)."""


class ConnectError(HTTPError):
    """No connection: refused, unreachable, a name that does not resolve, a failed TLS
    handshake."""


class ConnectTimeout(HTTPError):
    """The connection (TCP and TLS) was not up within the connect timeout."""


class ReadTimeout(HTTPError):
    """The server sent nothing for the read timeout while a reply was awaited."""


class ProtocolError(HTTPError):
    """The server broke the exchange: it closed before or within a reply, or sent bytes that
    are not HTTP/1.1, or a body that does not decode."""


class ReadError(HTTPError):
    """The socket failed (a reset, say) before a reply began; a body cut short is a
    ProtocolError."""


class NetworkError(HTTPError):
    """The exchange cannot go on: its session was closed under it."""


class RefusedHeader(ValueError):
    """A header name or value holds CR, LF or NUL; refused before anything is sent (a key file
    that kept its trailing newline would otherwise split the request). Names no value."""


_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters a header must never hold: each would end the header, or the head, early.
_BREAK = re.compile(r"[\r\n\x00]")
# What may stay unquoted in a request target (RFC 3986 pchar, "/" and "?" parts).
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


class Endpoint:
    """A URL parsed once for the pool and the request line.

    ``key`` is the pool's key (scheme, host, port); ``head`` is the request line and Host
    header, the part of every request to this URL that never changes.
    """

    __slots__ = ("authority", "head", "host", "key", "port", "target", "tls", "url")

    def __init__(self, url: str, tls: bool, host: str, port: int, authority: str, target: str):
        self.url = url
        self.tls = tls
        self.host = host
        self.port = port
        self.authority = authority  # the Host header's value
        self.target = target  # the request target: path and query
        self.key = ("https" if tls else "http", host, port)
        self.head = f"POST {target} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r})"

    def request(self, content: bytes, headers: dict[str, str]) -> bytes | list[bytes]:
        """The request's bytes, whole when small; head and body apart when the body is large
        (so a long prompt is not copied once more). Raises RefusedHeader."""
        # One scan of all names and one of all values, before any of it is written.
        names = ":".join(headers)
        values = "".join(headers.values())
        if _breaks(names) or _breaks(values):
            bad = next(name for name, value in headers.items() if _breaks(name + value))
            raise RefusedHeader(f"header {_printable(bad)!r} holds a line break or NUL")
        text = f"Content-Length: {len(content)}\r\n" + "".join(
            [f"{name}: {value}\r\n" for name, value in headers.items()]
        )
        if ":user-agent:" not in f":{names.lower()}:":
            text += "User-Agent: routerd\r\n"
        head = self.head + text.encode() + b"\r\n"
        if len(content) < 65536:
            return head + content
        return [head, content]


def _breaks(text: str) -> bool:
    return "\n" in text or "\r" in text or "\x00" in text


def _printable(name: str) -> str:
    return _BREAK.sub("?", name)[:64]


def parse_endpoint(url: str) -> Endpoint:
    """The Endpoint of an http or https URL; raises InvalidURL for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"{url}: {exc}") from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or _BREAK.search(url) or " " in parts.netloc:
        raise InvalidURL(url)
    authority = parts.netloc.rpartition("@")[2]
    if not authority.isascii():
        try:
            authority = authority.encode("idna").decode("ascii")
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InvalidURL(f"{url}: {exc}") from None
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_PATH_SAFE + "?")
    return Endpoint(url, scheme == "https", host, port or _DEFAULT_PORTS[scheme], authority, target)
