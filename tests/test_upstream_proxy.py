"""Outbound proxies (routerd.upstream.proxy, tunnel): the environment's variables, NO_PROXY,
and calls through a real forward proxy on loopback: a CONNECT tunnel with TLS to the
target inside it, plain HTTP in absolute form, a proxy that refuses. The proxy's password
is a canary: it must reach the proxy and appear in no message."""

from __future__ import annotations

import base64
import ssl
import time
from pathlib import Path

import pytest

from routerd.upstream.proxy import Proxies, Proxy, ProxyConfigError, proxies_from
from routerd.upstream.session import UpstreamSession
from routerd.upstream.wire import ConnectError, ConnectTimeout, parse_endpoint
from tests.loops import both_loops  # noqa: F401 - the module's anyio_backend
from tests.proxying import ForwardProxy
from tests.test_upstream_client import Server, answer, certificate, fetch

PASSWORD = "canary-proxy-pass-5f2e9c"
NAME = "api.routerd.test"  # resolvable only by the proxy

# --- the variables ----------------------------------------------------------------------


def test_each_scheme_reads_its_variable_lower_case_first_then_all_proxy() -> None:
    proxies = proxies_from(
        {
            "https_proxy": "http://low:3128",
            "HTTPS_PROXY": "http://up:3128",
            "ALL_PROXY": "http://all:8080",
        }
    )
    assert proxies.https == Proxy("low", 3128)
    assert proxies.http == Proxy("all", 8080)  # no HTTP_PROXY: ALL_PROXY serves http://
    assert not proxies_from({"HTTPS_PROXY": "  ", "NO_PROXY": "x"})  # empty counts as unset


def test_a_proxy_without_a_scheme_is_http_and_port_80_is_its_default() -> None:
    assert proxies_from({"HTTPS_PROXY": "proxy.corp:3128"}).https == Proxy("proxy.corp", 3128)
    assert proxies_from({"HTTPS_PROXY": "http://proxy.corp"}).https == Proxy("proxy.corp", 80)


def test_credentials_become_basic_proxy_authorization_and_nothing_else() -> None:
    proxies = proxies_from({"HTTPS_PROXY": f"http://al%40ice:{PASSWORD}@proxy.corp:3128"})
    proxy = proxies.https
    assert proxy is not None
    token = base64.b64encode(f"al@ice:{PASSWORD}".encode()).decode()
    assert proxy.authorization == f"Proxy-Authorization: Basic {token}\r\n".encode()
    shown = f"{proxy.where} {proxies.describe()}"
    assert shown == "proxy.corp:3128 {'https_proxy': 'proxy.corp:3128'}"
    assert token not in repr(proxies) and PASSWORD not in repr(proxies)
    assert PASSWORD.encode() not in proxy.connect_request(parse_endpoint("https://a.test/v1"))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (f"socks5://u:{PASSWORD}@proxy:1080", "HTTPS_PROXY: a socks5:// proxy is not supported"),
        (f"https://u:{PASSWORD}@proxy:443", "HTTPS_PROXY: a https:// proxy is not supported"),
        ("http://:3128", "HTTPS_PROXY: no host"),
        (f"http://u:{PASSWORD}@proxy:99999", "HTTPS_PROXY: not a proxy URL"),
    ],
)
def test_a_proxy_routerd_cannot_use_is_refused_naming_the_variable(value: str, words: str) -> None:
    with pytest.raises(ProxyConfigError) as caught:
        proxies_from({"HTTPS_PROXY": value})
    assert words in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "proxied"),
    [
        ("https://api.openai.com/v1", True),
        ("https://localhost:8443/v1", False),  # loopback: never proxied
        ("http://127.0.0.9:11434/v1", False),
        ("http://[::1]:11434/v1", False),
        ("https://models.internal.corp/v1", False),  # NO_PROXY .internal.corp
        ("https://internal.corp/v1", False),  # the domain itself too
        ("https://notinternal.corp/v1", True),
        ("https://gpu.lan:8000/v1", False),  # NO_PROXY gpu.lan:8000
        ("https://gpu.lan:9000/v1", True),
        ("http://10.1.2.3/v1", False),  # NO_PROXY 10.0.0.0/8
        ("http://11.1.2.3/v1", True),
        ("http://[fd00::5]:80/v1", False),  # NO_PROXY fd00::/8
    ],
)
def test_no_proxy_and_loopback_go_direct(url: str, proxied: bool) -> None:
    proxies = proxies_from(
        {
            "HTTPS_PROXY": "http://p:1",
            "HTTP_PROXY": "http://p:1",
            "NO_PROXY": " .internal.corp, gpu.lan:8000,10.0.0.0/8 ,fd00::/8",
        }
    )
    assert (proxies.for_endpoint(parse_endpoint(url)) is not None) is proxied
    assert (
        proxies_from({"HTTPS_PROXY": "p:1", "no_proxy": "*"}).for_endpoint(
            parse_endpoint("https://api.openai.com/v1")
        )
        is None
    )


def test_the_request_bytes_to_a_proxy() -> None:
    proxy = Proxy("p", 3128, b"Proxy-Authorization: Basic eDp5\r\n")
    tls = parse_endpoint("https://api.openai.com/v1/chat/completions")
    assert proxy.connect_request(tls) == (
        b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
        b"Proxy-Authorization: Basic eDp5\r\n\r\n"
    )
    plain = parse_endpoint("http://gpu.lan:8000/v1/chat/completions?x=1")
    assert proxy.absolute_head(plain) == (
        b"POST http://gpu.lan:8000/v1/chat/completions?x=1 HTTP/1.1\r\nHost: gpu.lan:8000\r\n"
        b"Proxy-Authorization: Basic eDp5\r\n"
    )


# --- through a real proxy -----------------------------------------------------------------


def _proxies(proxy: ForwardProxy, *, password: str = PASSWORD) -> Proxies:
    return proxies_from(
        {
            "HTTPS_PROXY": f"http://alice:{password}@127.0.0.1:{proxy.port}",
            "HTTP_PROXY": f"http://alice:{password}@127.0.0.1:{proxy.port}",
        }
    )


async def tls_behind_proxy(directory: Path) -> tuple[Path, Server, ForwardProxy]:
    """A TLS server for NAME (its certificate self-signed) and a proxy that reaches it."""
    cert, key = certificate(directory, NAME)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    server = await Server(answer()).start(served)
    return cert, server, await ForwardProxy({f"{NAME}:443": server.port}).start()


async def test_https_goes_through_a_connect_tunnel_verified_against_the_target(
    tmp_path: Path,
) -> None:
    cert, server, proxy = await tls_behind_proxy(tmp_path)
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        async with UpstreamSession(4, tls=trusting, proxies=_proxies(proxy)) as session:
            url = f"https://{NAME}/v1/chat/completions"
            assert await fetch(session, url) == (200, b'{"ok": true}')
            assert await fetch(session, url) == (200, b'{"ok": true}')  # the same tunnel
        assert proxy.lines == [f"CONNECT {NAME}:443 HTTP/1.1"]
        expected = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        assert proxy.authorizations == [f"Basic {expected}"]
        # TLS ran end to end: the server read the request itself, in origin form.
        assert [r.head[0] for r in server.requests] == [b"POST /v1/chat/completions HTTP/1.1"] * 2
        async with UpstreamSession(4, proxies=_proxies(proxy)) as session:
            # The system's authorities do not know the test's certificate: the tunnel opened,
            # and TLS inside it refused the target, as without a proxy.
            with pytest.raises(ConnectError, match="certificate verify failed"):
                await fetch(session, f"https://{NAME}/v1/chat/completions")
            assert session.pool().open == 0
    finally:
        await proxy.stop()
        await server.stop()


async def test_plain_http_goes_to_the_proxy_in_absolute_form() -> None:
    server = await Server(answer()).start()
    proxy = await ForwardProxy({f"{NAME}:8000": server.port}).start()
    try:
        async with UpstreamSession(4, proxies=_proxies(proxy)) as session:
            url = f"http://{NAME}:8000/v1/chat?x=1"
            assert await fetch(session, url) == (200, b'{"ok": true}')
            assert await fetch(session, url) == (200, b'{"ok": true}')  # kept alive
        line = f"POST http://{NAME}:8000/v1/chat?x=1 HTTP/1.1"
        assert proxy.lines == [line]
        assert [r.head[0] for r in server.requests] == [line.encode()] * 2
        assert len(proxy.authorizations) == 1
    finally:
        await proxy.stop()
        await server.stop()


async def test_loopback_targets_are_dialled_directly() -> None:
    server = await Server(answer()).start()
    proxy = await ForwardProxy({}).start()
    try:
        async with UpstreamSession(4, proxies=_proxies(proxy)) as session:
            assert await fetch(session, server.url()) == (200, b'{"ok": true}')
        assert proxy.lines == []
    finally:
        await proxy.stop()
        await server.stop()


@pytest.mark.parametrize(
    ("refusal", "words"),
    [
        (
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
            b"Content-Length: 0\r\n\r\n",
            "refused the tunnel: 407 Proxy Authentication Required",
        ),
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "refused the tunnel: 403"),
        (b"", "closed the connection before answering CONNECT"),
        (b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0-OpenSSH_9.6\r\n", "sent bytes after its reply"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "reply to CONNECT is not HTTP"),
    ],
)
async def test_a_proxy_that_refuses_the_tunnel_is_a_connect_error_naming_it(
    refusal: bytes, words: str
) -> None:
    proxy = await ForwardProxy({}, refuse=refusal).start()
    try:
        async with UpstreamSession(4, proxies=_proxies(proxy)) as session:
            with pytest.raises(ConnectError) as caught:
                await fetch(session, f"https://{NAME}/v1/chat/completions")
            assert session.pool().open == 0
        message = str(caught.value)
        assert words in message
        assert f"127.0.0.1:{proxy.port}" in message and NAME in message
        assert PASSWORD not in message and "alice" not in message
    finally:
        await proxy.stop()


async def test_a_proxy_that_is_down_is_a_connect_error_naming_it() -> None:
    proxy = await ForwardProxy({}).start()
    await proxy.stop()  # its port is closed now
    async with UpstreamSession(4, proxies=_proxies(proxy)) as session:
        with pytest.raises(ConnectError) as caught:
            await fetch(session, f"https://{NAME}/v1/chat/completions")
        assert session.pool().open == 0
    message = str(caught.value)
    assert f"cannot connect to {NAME}:443 through the proxy 127.0.0.1:{proxy.port}" in message
    assert PASSWORD not in message


@pytest.mark.parametrize(
    ("said", "error", "words"),
    [
        (b"", ConnectTimeout, "took over 0.3s"),  # no answer at all
        (b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 20000, ConnectError, "exceeds 16384 bytes"),
    ],
)
async def test_a_proxy_that_stalls_or_never_ends_its_reply_is_given_up_on(
    said: bytes, error: type[Exception], words: str
) -> None:
    proxy = await ForwardProxy({}, refuse=said, stall=True).start()
    try:
        async with UpstreamSession(4, proxies=_proxies(proxy)) as session:
            started = time.monotonic()
            with pytest.raises(error, match=words):
                await session.request(f"https://{NAME}/v1", b"", {}, 5.0, connect_s=0.3)
            assert time.monotonic() - started < 4.0  # not the 5 s read timeout
            assert session.pool().open == 0
    finally:
        await proxy.stop()


async def test_a_certificate_authority_named_by_ssl_cert_file_is_trusted_through_the_tunnel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that inspects TLS presents certificates of its own authority: the daemon is
    # told of it by SSL_CERT_FILE, which the default TLS context reads.
    cert, server, proxy = await tls_behind_proxy(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    try:
        async with UpstreamSession(4, proxies=_proxies(proxy)) as session:
            assert await fetch(session, f"https://{NAME}/v1") == (200, b'{"ok": true}')
    finally:
        await proxy.stop()
        await server.stop()
