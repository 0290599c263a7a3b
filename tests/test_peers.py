"""Peer checks on both fronts: SO_PEERCRED against [server] allowed_users / allowed_groups."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from routerd_client import AsyncClient, Client, RouterdError

from routerd.fronts.peers import Peer, PeerPolicy
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

NOBODY = pwd.getpwnam("nobody")


def test_an_empty_policy_leaves_it_to_the_socket_mode() -> None:
    policy = PeerPolicy([], [])
    assert policy.allows(Peer(1, 4242, 4242)) and policy.allows(None)


def test_users_groups_and_the_daemons_own_user() -> None:
    nogroup = grp.getgrnam("nogroup").gr_gid
    policy = PeerPolicy(["nobody"], [])
    assert policy.allows(Peer(1, NOBODY.pw_uid, nogroup))
    assert policy.allows(Peer(1, os.getuid(), 0))  # the daemon's own user, always
    assert not policy.allows(Peer(1, 4242, 4242))
    assert not policy.allows(None)
    assert "uid 4242" in policy.refusal(Peer(7, 4242, 4242))
    by_group = PeerPolicy([], ["nogroup"])
    assert by_group.allows(Peer(1, 4242, nogroup))
    assert not by_group.allows(Peer(1, 4242, 4242))


def test_an_unknown_name_fails_at_start() -> None:
    with pytest.raises(KeyError):
        PeerPolicy(["no-such-user-here"], [])


def as_nobody(probe: Callable[[], str]) -> str:
    """Run ``probe`` in a forked child that has become nobody; its answer comes back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        answer = "child failed"
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            answer = probe()
        finally:
            os.write(write_end, answer.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


def msgpack_probe(path: Path) -> Callable[[], str]:
    """What the blocking and the asyncio client each say when they connect."""

    def connect() -> str:
        try:
            with Client(str(path), name="nobody", timeout=10):
                return "Welcome"
        except RouterdError as exc:
            return f"{type(exc).__name__} {exc.kind} {exc}"

    async def connect_async() -> str:
        try:
            async with AsyncClient(str(path), name="nobody", timeout=10):
                return "Welcome"
        except RouterdError as exc:
            return f"{type(exc).__name__} {exc.kind} {exc}"

    def probe() -> str:
        return f"{connect()}\n{asyncio.run(connect_async())}"

    return probe


def http_probe(path: Path) -> Callable[[], str]:
    def probe() -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: routerd\r\n\r\n")
                return sock.recv(64).decode(errors="replace") or "closed"
            except OSError:
                return "closed"

    return probe


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
@pytest.mark.parametrize("allowed", ["daemon", "nobody"])
def test_both_fronts_refuse_a_user_the_config_does_not_allow(
    allowed: str,
    mock_provider: Callable[[MockSpec], MockProcess],
    daemon: DaemonFactory,
    short_dir: Path,
) -> None:
    key = canary("k")
    mock = mock_provider(MockSpec(keys={key: KeySpec("k")}, models={"m": ModelSpec()}))
    short_dir.chmod(0o755)  # nobody must reach the sockets; the policy is what stops it
    config = f"""
[server]
socket_mode = 0o666
http_socket = "{short_dir / "http.sock"}"
allowed_users = ["{allowed}"]

[providers.p]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "k", key_env = "K" }}]

[routes.r]
chain = ["p/m"]
"""
    routerd = daemon(config, env={"K": key})
    over_msgpack = as_nobody(msgpack_probe(short_dir / "d.sock"))
    over_http = as_nobody(http_probe(short_dir / "http.sock"))
    if allowed == "nobody":
        assert over_msgpack == "Welcome\nWelcome", over_msgpack
        assert over_http.startswith("HTTP/1.1 200"), over_http
    else:
        # Both clients, every time: the refusal itself, not a connection that just closed.
        answers = over_msgpack.splitlines()
        assert len(answers) == 2, over_msgpack
        for answer in answers:
            assert answer.startswith(f"Forbidden forbidden uid {NOBODY.pw_uid}"), over_msgpack
        assert over_http == "closed", over_http
        assert routerd.log_text().count("peer_refused") == 3
