"""`routerd demo`: local mock providers, the real daemon, several client processes, then status.

No real keys and no network: the mock providers listen on loopback and behave like the real
ones (sliding-window rate limits with their headers, an invalid key, an exhausted key).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockSpec, ModelSpec, start_mock_process

DEMO_KEYS = {
    "sk-demo-main-0001": KeySpec("main", rpm=12, window_s=3.0),
    "sk-demo-ci-0002": KeySpec("ci", rpm=12, window_s=3.0),
    "sk-demo-batch-0003": KeySpec("batch", rpm=12, window_s=3.0),
    "sk-demo-revoked-0004": KeySpec("revoked", kind="invalid"),
    "sk-demo-broke-0005": KeySpec("broke", kind="no_quota"),
    "sk-demo-backup-0006": KeySpec("backup", rpm=6, window_s=3.0),
}

CONFIG = """\
# The demo's config: a two-target chain; the first target has a pool of five keys,
# one revoked and one out of quota; every key has a rate limit the clients will exceed.
[server]
state_file = "{state}"
http_socket = "{http_socket}"

[providers.openai]
kind = "openai-compatible"
base_url = "{base_url}"
strategy = "headroom"
credentials = [
  {{ label = "main", key_env = "DEMO_KEY_MAIN" }},
  {{ label = "ci", key_env = "DEMO_KEY_CI" }},
  {{ label = "batch", key_env = "DEMO_KEY_BATCH" }},
  {{ label = "revoked", key_env = "DEMO_KEY_REVOKED" }},
  {{ label = "broke", key_env = "DEMO_KEY_BROKE" }},
]

[providers.backup]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{{ label = "backup", key_env = "DEMO_KEY_BACKUP" }}]

[routes.default]
chain = ["openai/gpt-mock", "backup/llama-mock"]
deadline_s = 60
"""


# What the clients' "silent key switches" count, said once after their lines.
SWITCH_NOTE = (
    "  (a silent key switch: routerd's first key for a request failed (429, 402, 401 or a\n"
    "  fault) and routerd retried it on another key or target itself; the client got its\n"
    "  reply and never saw the failure)"
)


def _print(line: str = "") -> None:
    print(line, flush=True)


class _Stopped(Exception):
    """SIGTERM or SIGHUP reached the demo: unwind, so every child and the folder go too."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


def run_demo(*, requests: int = 30, clients: int = 4, keep: bool = False) -> int:
    """Run the whole demo; returns the exit code (0 when every request was served)."""
    # Python's default SIGTERM ends the process without running a single finally block,
    # which would leave the mock, the daemon and the clients running and /tmp littered.
    previous = {
        signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        return _run_demo(requests, clients, keep)
    except _Stopped as stopped:
        _print(f"routerd demo: stopped by {stopped}")
        return 143
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_demo(requests: int, clients: int, keep: bool) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="routerd-demo-", dir="/tmp"))
    spec = MockSpec(
        keys=DEMO_KEYS,
        models={"gpt-mock": ModelSpec(), "llama-mock": ModelSpec()},
        latency_ms=20,
    )
    _print("routerd demo: starting a mock provider on loopback ...")
    with start_mock_process(spec) as mock:
        config = workdir / "config.toml"
        http_socket = workdir / "http.sock"
        config.write_text(
            CONFIG.format(
                state=workdir / "state.msgpack", base_url=mock.base_url, http_socket=http_socket
            )
        )
        env = {f"DEMO_KEY_{spec_.label.upper()}": key for key, spec_ in DEMO_KEYS.items()}
        socket_path = workdir / "routerd.sock"
        _print(f"routerd demo: starting routerd (config {config}, socket {socket_path}) ...")
        procs: list[subprocess.Popen[str]] = []
        try:
            daemon = DaemonProcess(config, socket_path=socket_path, env=env)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        try:
            _print(f"routerd demo: {clients} client processes x {requests} requests ...")
            started = time.monotonic()
            procs += _start_clients(socket_path, requests, clients)
            failed = 0
            for proc in procs:
                out, _ = proc.communicate(timeout=300)
                _print("  " + out.strip().replace("\n", "\n  "))
                failed += proc.returncode != 0
            _print(f"routerd demo: all clients done in {time.monotonic() - started:.1f} s")
            _print(SWITCH_NOTE)
            _print()
            _show_upstream_calls(mock.stats()["calls"])
            _print()
            _show_http_front(http_socket)
            _print()
            _print("$ routerd status")
            subprocess.run(
                [sys.executable, "-m", "routerd", "status", "--socket", str(socket_path)],
                check=False,
            )
            if keep:
                _print()
                _print(f"routerd keeps running: ROUTERD_SOCKET={socket_path}; Ctrl-C to stop")
                with contextlib.suppress(KeyboardInterrupt):
                    daemon.process.wait()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            daemon.close()
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def _start_clients(socket_path: Path, requests: int, clients: int) -> list[subprocess.Popen[str]]:
    """Start ``clients`` demo client processes, each sending ``requests`` through the socket."""
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "routerd.demo",
                "--socket",
                str(socket_path),
                "--requests",
                str(requests),
                "--name",
                f"agent-{n + 1}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(clients)
    ]


def _show_upstream_calls(calls: dict[str, dict[str, dict[str, int]]]) -> None:
    """Print the mock provider's call counts per key, summed over the models."""
    _print("upstream calls the mock provider saw, per key (HTTP status: count):")
    for label, models in sorted(calls.items()):
        merged: collections.Counter[str] = collections.Counter()
        for statuses in models.values():
            merged.update(statuses)
        _print(f"  {label:8} " + "  ".join(f"{s}: {n}" for s, n in sorted(merged.items())))


def _show_http_front(http_socket: Path) -> None:
    """One request the way an unmodified OpenAI SDK sends it, through the HTTP front."""
    body = {"model": "default", "messages": [{"role": "user", "content": "hello over HTTP"}]}
    _print(f"the same daemon, through its OpenAI-compatible HTTP front ({http_socket}):")
    _print(f"$ curl --unix-socket {http_socket} http://routerd/v1/chat/completions -d '...'")
    transport = httpx.HTTPTransport(uds=str(http_socket))
    with httpx.Client(transport=transport, base_url="http://routerd", timeout=30) as http:
        response = http.post("/v1/chat/completions", json=body)
    reply = response.json()
    _print(
        f"  HTTP {response.status_code}: {reply['choices'][0]['message']['content']!r} "
        f"(served by {response.headers.get('x-routerd-target')} "
        f"via {response.headers.get('x-routerd-credential')})"
    )


async def _client(socket_path: str, requests: int, name: str) -> int:
    from routerd_client import AsyncClient, RouterdError

    served: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    key_switches = 0
    async with AsyncClient(socket_path, name=name) as client:
        counter = iter(range(requests))

        async def worker() -> None:
            nonlocal key_switches
            for n in counter:
                try:
                    result = await client.chat(
                        "default",
                        messages=[{"role": "user", "content": f"{name} says hello #{n}"}],
                        max_tokens=32,
                    )
                except RouterdError as exc:
                    errors[exc.kind] += 1
                    continue
                served[f"{result.target} via {result.credential}"] += 1
                key_switches += len(result.attempts) - 1

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)
        streamed = []
        async for chunk in client.stream(
            "default", messages=[{"role": "user", "content": f"{name} streams"}]
        ):
            streamed.append(chunk.text)
    total = sum(served.values())
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(served.items()))
    print(f"{name}: {total}/{requests} served ({parts}); {key_switches} silent key switches")
    print(f"{name}: streamed reply: {''.join(streamed)!r}")
    if errors:
        print(f"{name}: errors: {dict(errors)}")
    return 0 if not errors else 1


def main() -> int:
    """One demo client process."""
    parser = argparse.ArgumentParser(prog="python -m routerd.demo")
    parser.add_argument("--socket", default=os.environ.get("ROUTERD_SOCKET"))
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--name", default=f"agent-{os.getpid()}")
    args = parser.parse_args()
    return anyio.run(_client, args.socket, args.requests, args.name)


if __name__ == "__main__":
    raise SystemExit(main())
