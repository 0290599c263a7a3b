"""The real daemon behind an outbound proxy named by its environment (HTTP_PROXY and the
rest): every call to the provider goes through the proxy, whose password, like the key,
shows up nowhere; a proxy routerd cannot use stops it at start, naming the variable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from routerd_client import AsyncClient

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary
from tests.proxying import ForwardProxy
from tests.test_e2e_cli import assert_no_key, routerd, user

# Resolvable by the proxy only: a call that reached the provider went through it.
NAME = "provider.routerd.test"


def config(port: int) -> str:
    return f"""
[providers.p]
kind = "openai-compatible"
base_url = "http://{NAME}:{port}/v1"
credentials = [{{ label = "k", key_env = "KEY" }}]

[routes.r]
chain = ["p/m"]
"""


async def test_every_provider_call_goes_through_the_proxy_and_its_password_stays_secret(
    mock_provider: Callable[[MockSpec], MockProcess], daemon: DaemonFactory
) -> None:
    key, password = canary("key"), canary("proxy")
    mock = mock_provider(MockSpec(keys={key: KeySpec("k")}, models={"m": ModelSpec()}))
    port = urlsplit(mock.base_url).port
    assert port is not None
    proxy = await ForwardProxy({f"{NAME}:{port}": port}).start()
    try:
        routerd_process = daemon(
            config(port),
            env={
                "KEY": key,
                "HTTP_PROXY": f"http://routerd:{password}@127.0.0.1:{proxy.port}",
                "NO_PROXY": "elsewhere.test",
            },
        )
        async with AsyncClient(str(routerd_process.socket_path)) as client:
            for _ in range(3):
                result = await client.chat("r", messages=user("hi"))
                assert result.text
            streamed = [c.text async for c in client.stream("r", messages=user("hi"))]
            assert "".join(streamed)
            status = await client.status()
        assert {c.label: c.state for c in status.credentials} == {"k": "ready"}
        # Kept-alive connections carry the calls, each request in absolute form.
        assert proxy.lines and all(
            line == f"POST http://{NAME}:{port}/v1/chat/completions HTTP/1.1"
            for line in proxy.lines
        )
        assert len(proxy.authorizations) == len(proxy.lines)
        log = routerd_process.log_text()
        assert f'"http_proxy":"127.0.0.1:{proxy.port}"' in log  # the start-up line
        assert_no_key(log + repr(status), [key, password])
    finally:
        await proxy.stop()


def test_a_proxy_routerd_cannot_use_stops_it_at_start_naming_the_variable(
    short_dir: Path,
) -> None:
    password = canary("proxy")
    path = short_dir / "c.toml"
    path.write_text(config(9))
    done = routerd(
        *("serve", "--config", str(path), "--socket", str(short_dir / "s.sock")),
        env={"KEY": canary("key"), "HTTPS_PROXY": f"socks5://u:{password}@proxy.corp:1080"},
    )
    assert done.returncode == 2
    assert "HTTPS_PROXY: a socks5:// proxy is not supported" in done.stderr
    assert_no_key(done.stdout + done.stderr, [password])
    assert not (short_dir / "s.sock").exists()
