"""The HTTP front's footprint under hostile clients, measured on a real daemon process.

Two scenarios, each on a fresh daemon whose front listens on a Unix socket:

- stalled bodies: N clients each announce a body just under max_frame, send most of it,
  and stop. Prints the daemon's RSS (VmRSS) before, at its peak while they stall, and
  after they are gone, and what the clients were answered.
- idle flood: M idle connections, with the daemon's soft RLIMIT_NOFILE lowered to
  ``--nofile``. Prints the daemon's open descriptors, whether it survived, how many log
  lines the flood cost, and whether it serves once the flood is gone.

    .venv/bin/python bench/hostile_http.py --bodies 20 --flood 1100 --nofile 1024
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockSpec, ModelSpec, start_mock_process

KEY = "sk-bench-hostile"
BIG = 15_900_000

CONFIG = """
[server]
http_socket = "{http}"
read_timeout_s = {read_timeout}
{extra}

[providers.mock]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{{ label = "main", key_env = "KEY_MAIN" }}]

[routes.main]
chain = ["mock/m1"]
"""


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stall(path: Path, sent: int, outcomes: list[bytes]) -> None:
    """Announce a BIG body, send ``sent`` bytes of it, and wait for the daemon's answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: routerd\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % BIG
        )
        piece = b"x" * 65536
        with contextlib.suppress(OSError):
            for _ in range(sent // len(piece)):
                sock.sendall(piece)
        sock.settimeout(120)
        with contextlib.suppress(OSError):
            outcomes.append(sock.recv(12))
    finally:
        sock.close()


def ok(path: Path) -> bool:
    """Whether a chat request over the front succeeds now."""
    transport = httpx.HTTPTransport(uds=str(path))
    try:
        with httpx.Client(transport=transport, base_url="http://r", timeout=10) as http:
            body = {"model": "main", "messages": [{"role": "user", "content": "hi"}]}
            return http.post("/v1/chat/completions", json=body).status_code == 200
    except httpx.TransportError:
        return False


def stalled_bodies(directory: Path, base_url: str, count: int, read_timeout: float) -> None:
    """The stalled-bodies scenario."""
    http = directory / "http.sock"
    config = directory / "bodies.toml"
    config.write_text(
        CONFIG.format(http=http, read_timeout=read_timeout, extra="", base_url=base_url)
    )
    env = {"KEY_MAIN": KEY, "XDG_STATE_HOME": str(directory)}
    with DaemonProcess(config, socket_path=directory / "b.sock", env=env) as process:
        pid = process.process.pid
        ok(http)
        before = rss_mb(pid)
        outcomes: list[bytes] = []
        threads = [
            threading.Thread(target=stall, args=(http, BIG - 400_000, outcomes))
            for _ in range(count)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        peak = before
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_mb(pid))
            time.sleep(0.05)
        took = time.monotonic() - started
        time.sleep(1)
        after = rss_mb(pid)
        answers = Counter(o.decode(errors="replace").strip() or "(closed)" for o in outcomes)
        print(f"stalled bodies: {count} x {BIG / 1e6:.1f} MB, read_timeout_s={read_timeout}")
        print(f"  RSS before {before:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB")
        print(f"  answers {dict(answers)} ({count - len(outcomes)} none) in {took:.1f} s")
        print(f"  serves afterwards: {ok(http)}")


def idle_flood(directory: Path, base_url: str, count: int, nofile: int, hold_s: float) -> None:
    """The idle-flood scenario."""
    http = directory / "flood.sock"
    config = directory / "flood.toml"
    config.write_text(CONFIG.format(http=http, read_timeout=60, extra="", base_url=base_url))
    env = {"KEY_MAIN": KEY, "XDG_STATE_HOME": str(directory)}
    log_path = directory / "flood.log"
    with DaemonProcess(
        config, socket_path=directory / "f.sock", env=env, log_path=log_path
    ) as process:
        pid = process.process.pid
        ok(http)
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (nofile, hard))
        lines_before = len(process.log_text().splitlines())
        flood: list[socket.socket] = []
        try:
            for _ in range(count):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(http))
                flood.append(sock)
            time.sleep(hold_s)
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            alive = process.process.poll() is None
        finally:
            for sock in flood:
                sock.close()
        deadline = time.monotonic() + 15
        while not (served := ok(http)) and time.monotonic() < deadline:
            time.sleep(0.2)
        text = process.log_text()
        lines = len(text.splitlines()) - lines_before
        print(f"idle flood: {count} connections, soft RLIMIT_NOFILE {nofile}, held {hold_s} s")
        print(f"  daemon fds {fds}, alive {alive}, serves after the flood: {served}")
        print(f"  log: {lines} new lines, {len(text.encode()) / 1e6:.2f} MB")


def main() -> None:
    """Run both scenarios and print what they cost the daemon."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bodies", type=int, default=20)
    parser.add_argument("--read-timeout", type=float, default=10.0)
    parser.add_argument("--flood", type=int, default=1100)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--hold", type=float, default=10.0)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="rd-bench-", dir="/tmp"))
    mock = start_mock_process(MockSpec(keys={KEY: KeySpec("main")}, models={"m1": ModelSpec()}))
    try:
        if args.bodies:
            stalled_bodies(directory, mock.base_url, args.bodies, args.read_timeout)
        if args.flood:
            idle_flood(directory, mock.base_url, args.flood, args.nofile, args.hold)
    finally:
        mock.close()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
