"""Outbound HTTP proxies, as the daemon's environment names them (HTTPS_PROXY and friends).

Read once at start: ``https_proxy`` / ``HTTPS_PROXY`` for https:// targets, ``http_proxy`` /
``HTTP_PROXY`` for http:// ones, ``all_proxy`` / ``ALL_PROXY`` for either when its own is
unset (the lower-case name first, as curl reads them), and ``no_proxy`` / ``NO_PROXY``: hosts
reached directly. An https:// target goes through a CONNECT tunnel (TLS end to end, the
proxy sees the host only); an http:// one is sent to the proxy in absolute form. Loopback
targets (localhost, 127.0.0.0/8, ::1) are never proxied: a local server behind a remote
proxy is never what is meant, and a proxy set for the rest of the machine must not reroute
a local model server.

Only http:// proxies are supported; any other scheme is refused at start, naming the
variable. A proxy's user and password (``http://user:pass@host:port``) are sent as
Proxy-Authorization and appear nowhere else: every message names the proxy by host:port.
Sans-IO: the requests to a proxy are built here; ``tunnel.py`` reads its reply to CONNECT
and ``session.py`` dials.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from routerd.upstream.wire import Endpoint

__all__ = ["VARIABLES", "Proxies", "Proxy", "ProxyConfigError", "proxies_from"]

# The variables, in the order they are read for each scheme (lower case first, as curl).
_VARIABLES = {
    "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
    "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
}
_NO_PROXY = ("no_proxy", "NO_PROXY")
# Every variable read here (set empty, each counts as unset).
VARIABLES = (*dict.fromkeys(_VARIABLES["https"] + _VARIABLES["http"]), *_NO_PROXY)


class ProxyConfigError(ValueError):
    """A proxy variable routerd cannot use; names the variable, never its credentials."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """One proxy: where to dial, and the Proxy-Authorization header line, if any."""

    host: str
    port: int
    # b"Proxy-Authorization: Basic ...\r\n", or nothing; a secret, kept out of repr
    authorization: bytes = field(default=b"", repr=False)

    @property
    def where(self) -> str:
        """host:port, for messages (never the credentials)."""
        return _authority(self.host, self.port)

    def connect_request(self, endpoint: Endpoint) -> bytes:
        """The CONNECT request that opens a tunnel to ``endpoint``."""
        authority = _authority(endpoint.host, endpoint.port)
        return (
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")
            + self.authorization
            + b"\r\n"
        )

    def absolute_head(self, endpoint: Endpoint) -> bytes:
        """``endpoint.head`` with its request target in absolute form, for a plain-HTTP
        request sent to this proxy."""
        authority = _authority(endpoint.host, endpoint.port)
        return (
            f"POST http://{authority}{endpoint.target} HTTP/1.1\r\n"
            f"Host: {endpoint.authority}\r\n".encode("ascii")
            + self.authorization
        )


@dataclass(frozen=True, slots=True)
class Proxies:
    """The proxy for each scheme and the hosts reached directly (``proxies_from``)."""

    https: Proxy | None = None
    http: Proxy | None = None
    no_proxy: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.https is not None or self.http is not None

    def for_endpoint(self, endpoint: Endpoint) -> Proxy | None:
        """The proxy a call to ``endpoint`` goes through, or None to dial it directly."""
        proxy = self.https if endpoint.tls else self.http
        if proxy is None or _loopback(endpoint.host):
            return None
        if _bypassed(endpoint.host, endpoint.port, self.no_proxy):
            return None
        return proxy

    def describe(self) -> dict[str, str]:
        """What the start-up log line says: each proxy by host:port, and NO_PROXY."""
        described = {}
        if self.https is not None:
            described["https_proxy"] = self.https.where
        if self.http is not None:
            described["http_proxy"] = self.http.where
        if self.no_proxy:
            described["no_proxy"] = ",".join(self.no_proxy)
        return described


def proxies_from(environ: Mapping[str, str]) -> Proxies:
    """The proxies ``environ`` names; raises ProxyConfigError for one routerd cannot use."""
    chosen: dict[str, Proxy | None] = {}
    for scheme, names in _VARIABLES.items():
        chosen[scheme] = None
        for name in names:
            value = environ.get(name, "").strip()
            if value:
                chosen[scheme] = _parse(name, value)
                break
    no_proxy = next((environ[n] for n in _NO_PROXY if environ.get(n, "").strip()), "")
    entries = tuple(e.strip().lower() for e in no_proxy.split(",") if e.strip())
    return Proxies(https=chosen["https"], http=chosen["http"], no_proxy=entries)


def _parse(name: str, value: str) -> Proxy:
    text = value if "://" in value else "http://" + value  # host:port, as curl takes it
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ProxyConfigError(f"{name}: not a proxy URL (http://host:port)") from None
    scheme = parts.scheme.lower()
    if scheme != "http":
        raise ProxyConfigError(
            f"{name}: a {scheme}:// proxy is not supported (routerd speaks to http:// proxies)"
        )
    if not parts.hostname:
        raise ProxyConfigError(f"{name}: no host in the proxy URL (http://host:port)")
    authorization = b""
    if parts.username is not None or parts.password is not None:
        user = unquote(parts.username or "")
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Proxy-Authorization: Basic {token}\r\n".encode("ascii")
    host = parts.hostname
    if any(c in host for c in "\r\n\x00 "):
        raise ProxyConfigError(f"{name}: the proxy's host holds a space or a line break")
    return Proxy(host, port or 80, authorization)


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bypassed(host: str, port: int, entries: tuple[str, ...]) -> bool:
    """Whether NO_PROXY names ``host``: "*", the host or a domain above it ("example.com" and
    ".example.com" both cover api.example.com), an address or a network (10.0.0.0/8), each
    with an optional :port."""
    host = host.lower()
    for entry in entries:
        if entry == "*":
            return True
        entry_host, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if _address_match(host, entry_host):
            return True
        domain = entry_host.lstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [::1]:8080
        inside, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return inside, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, int(port) if port.isdigit() else None
    return entry, None


def _address_match(host: str, entry: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return address.version == network.version and address in network
