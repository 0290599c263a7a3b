"""routerd's own CPU per request, in one process, with no other process to wait for or to
share the cores with: what front.py's runs cannot isolate.

One event loop (uvloop, as the daemon's) runs the real daemon (``routerd.daemon.Daemon``:
its HTTP front on loopback TCP, its msgpack socket, the dispatcher and its upstream
client), a minimal OpenAI-shaped responder (an asyncio protocol on llhttp answering a fixed
completion with OpenAI's rate-limit headers, or a stream of 20 content chunks written at
once) and the clients: raw HTTP/1.1 on one kept-alive connection, and
``routerd_client.AsyncClient`` on the msgpack socket. Requests go one at a time. The
process's CPU time per request (``process_time``) is then routerd's work plus the
responder's and the client's few microseconds, which the ``direct`` row (the client calling
the responder) measures; the msgpack rows include routerd_client's own work too. The daemon
logs at ``--log-level`` (default ``info``, its own default: a ``request`` line per request)
into a file, as it would into journald's pipe.

Paths take turns within each round (the order rotating); each prints the best and the
median of the rounds, and what it adds to ``direct``'s best.

    .venv/bin/python bench/request_cpu.py [--keys 1] [--log-level info]
                                          [--requests 3000] [--rounds 5]

The machine's own speed still moves these figures (by up to 2x within minutes on a shared
virtual machine): to compare two checkouts, run short rounds alternately in each, many
times (``PYTHONPATH=<checkout>`` makes Python import that checkout's routerd), and compare
the best figures of each side. ``--path`` measures one path (and its direct call) only."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import httptools
from fixtures import completion, content_events, one_route_toml
from routerd_client import AsyncClient

import routerd
from routerd import log
from routerd.config.load import parse_config
from routerd.config.secrets import resolve_secrets
from routerd.daemon import Daemon
from routerd.eventloop import loop_options

MODEL = "m"
ROUTE = "bench"
TOKEN = "bench-token"
CHUNKS = 20
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: %b\r\n"
    b"x-ratelimit-limit-requests: 10000000\r\n"
    b"x-ratelimit-remaining-requests: 9999999\r\n"
    b"x-ratelimit-reset-requests: 6ms\r\n"
    b"x-ratelimit-limit-tokens: 10000000000\r\n"
    b"x-ratelimit-remaining-tokens: 9999999900\r\n"
    b"x-ratelimit-reset-tokens: 0s\r\n"
    b"openai-processing-ms: 1\r\n"
)
Call = Callable[[], Awaitable[None]]
PATHS = ("direct", "msgpack", "HTTP front", "direct stream", "msgpack stream", "HTTP front stream")


def _reply() -> bytes:
    usage = {"prompt_tokens": 18, "completion_tokens": 2, "total_tokens": 20}
    body = completion(MODEL, 1, usage)
    return HEADERS % b"application/json" + b"content-length: %d\r\n\r\n" % len(body) + body


def _stream() -> bytes:
    events = [*content_events(MODEL, 1, CHUNKS), b"data: [DONE]\n\n"]
    head = HEADERS % b"text/event-stream" + b"transfer-encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


class Responder(asyncio.Protocol):
    """The upstream: each request answered whole, a stream when its body asks for one."""

    reply = _reply()
    stream = _stream()

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.body = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.transport is not None
        streamed = b'"stream":true' in self.body or b'"stream": true' in self.body
        self.transport.write(self.stream if streamed else self.reply)
        self.body = b""


class Client(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection sending a request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        assert self.done is not None
        self.done.set_result(self.parser.get_status_code())

    async def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        status = await self.done
        if status != 200:
            raise RuntimeError(f"HTTP {status}")


def http_request(port: int, model: str, token: str, *, stream: bool) -> bytes:
    body = json.dumps({"model": model, "stream": stream, "messages": MESSAGES}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"authorization: Bearer {token}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon(work: Path, responder_port: int, http_port: int, keys: int, level: str) -> Daemon:
    """The real daemon: one route to the responder over ``keys`` keys, both fronts."""
    config = parse_config(
        one_route_toml(
            state_dir=work,
            log_level=level,
            http_port=http_port,
            token_env="BENCH_TOKEN",
            base_url=f"http://127.0.0.1:{responder_port}/v1",
            key_envs={f"k{n}": f"BENCH_KEY_{n}" for n in range(keys)},
            route=ROUTE,
            model=MODEL,
        )
    )
    environ = {f"BENCH_KEY_{n}": f"sk-bench-{n:04d}-0123456789abcdef" for n in range(keys)}
    secrets = resolve_secrets(config, environ=environ)
    os.environ["BENCH_TOKEN"] = TOKEN  # the HTTP front reads its token from the environment
    return Daemon(config, secrets, socket_path=work / "routerd.sock")


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """The process's stderr (fd 2, where the daemon's log goes) into ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("wb") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


async def measure(paths: dict[str, Call], requests: int, rounds: int) -> dict[str, list[float]]:
    """CPU microseconds per request of each path, per round (paths rotating each round)."""
    names = list(paths)
    for call in paths.values():
        for _ in range(300):
            await call()
    figures: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(rounds):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            call = paths[name]
            for _ in range(50):
                await call()
            started = time.process_time()
            for _ in range(requests):
                await call()
            figures[name].append((time.process_time() - started) / requests * 1e6)
    return figures


async def run(
    keys: int, level: str, requests: int, rounds: int, only: list[str]
) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(Responder, "127.0.0.1", 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    http_port = free_port()
    with tempfile.TemporaryDirectory(prefix="routerd-cpu-") as tmp:
        work = Path(tmp)
        routerd_ = daemon(work, upstream_port, http_port, keys, level)
        async with anyio.create_task_group() as tg:
            await tg.start(routerd_.run)
            _, direct = await loop.create_connection(Client, "127.0.0.1", upstream_port)
            _, front = await loop.create_connection(Client, "127.0.0.1", http_port)
            async with AsyncClient(str(work / "routerd.sock"), name="cpu-bench") as client:

                def http(conn: Client, request: bytes) -> Call:
                    return lambda: conn.send(request)

                async def msgpack() -> None:
                    await client.chat(ROUTE, messages=MESSAGES)

                async def msgpack_stream() -> None:
                    async for _ in client.stream(ROUTE, messages=MESSAGES):
                        pass

                paths: dict[str, Call] = {
                    "direct": http(direct, http_request(upstream_port, MODEL, "x", stream=False)),
                    "msgpack": msgpack,
                    "HTTP front": http(front, http_request(http_port, ROUTE, TOKEN, stream=False)),
                    "direct stream": http(
                        direct, http_request(upstream_port, MODEL, "x", stream=True)
                    ),
                    "msgpack stream": msgpack_stream,
                    "HTTP front stream": http(
                        front, http_request(http_port, ROUTE, TOKEN, stream=True)
                    ),
                }
                if only:
                    paths = {name: paths[name] for name in only}
                figures = await measure(paths, requests, rounds)
            tg.cancel_scope.cancel()
    upstream.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1, help="keys in the route's pool")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests per path per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--path",
        action="append",
        choices=PATHS,
        help="measure only this path (repeat it for several; direct is always measured)",
    )
    args = parser.parse_args()
    only = []
    if args.path:
        directs = {"direct stream" if "stream" in name else "direct" for name in args.path}
        only = [name for name in PATHS if name in args.path or name in directs]
    log.configure(args.log_level, "json")
    with tempfile.TemporaryDirectory(prefix="routerd-cpu-log-") as tmp:
        kept = Path(tmp) / "routerd.log"
        try:
            with stderr_to(kept):
                figures = anyio.run(
                    run,
                    *(args.keys, args.log_level, args.requests, args.rounds, only),
                    backend_options=loop_options("auto"),
                )
        except BaseException:
            print("routerd's log, last lines:", *kept.read_text().splitlines()[-20:], sep="\n")
            raise
    where = Path(routerd.__file__).resolve().parent.parent
    print(
        f"routerd's CPU per request in one process (us; {args.requests} requests x "
        f"{args.rounds} rounds per path, one at a time), {args.keys} key(s), log_level "
        f"{args.log_level}, routerd from {where}, Python {sys.version.split()[0]}"
    )
    print(f"  {'path':18} {'best':>8} {'median':>8} {'added (best)':>13}")
    for name, rounds in figures.items():
        base = min(figures["direct stream" if "stream" in name else "direct"])
        added = "" if name.startswith("direct") else f"{min(rounds) - base:+13.1f}"
        print(f"  {name:18} {min(rounds):8.1f} {statistics.median(rounds):8.1f} {added:>13}")


if __name__ == "__main__":
    main()
