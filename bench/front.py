"""routerd's fronts (msgpack socket, HTTP front) and LiteLLM's proxy over one responder.

One run starts an independent OpenAI-shaped responder (a minimal aiohttp app in its own
process, not routerd's mock: a fixed chat completion with OpenAI's rate-limit headers, or
with ``"stream": true`` an SSE stream of N chunks), a real ``routerd serve`` whose one route
points at it (msgpack socket plus the HTTP front on loopback TCP), and LiteLLM's proxy
(``litellm --config``) with one model pointing at it. The same load generator (an aiohttp
client in this process) drives every HTTP path: the responder directly, a TCP relay that
copies bytes and parses nothing (the least any proxy process adds here), routerd's HTTP
front and LiteLLM's proxy; ``routerd_client.AsyncClient`` drives the msgpack socket.

Measured, every path interleaved in rounds (the order rotating) so that drift on the
machine weighs on all alike; at concurrency 1 the paths take turns in blocks of 25 requests
(LiteLLM's proxy, 50 times slower, apart):

- concurrency 1: p50 and p99, and what each path adds to the direct call;
- throughput (requests/s) at concurrency 16 and 64, as a % of direct, and routerd's
  throughput divided by LiteLLM's;
- streaming: time to the first chunk at concurrency 1 (p50, added to direct) and chunks
  relayed per second with 100 streams at once.
- CPU per request in the throughput runs, and per stream (and per chunk) in the
  many-streams runs, per process, and how much of it all processes spent in the kernel;
  and at concurrency 1, where a request's time goes: each process's time on a core and in
  the run queue (schedstat);
- throughput at concurrency 16 and 64 once more with the OpenAI SDK (``AsyncOpenAI``) as
  the client of every OpenAI-shaped path: the client agents send with, which costs some
  ten times the aiohttp client's CPU per request.

    ./dev front       or    .venv-bench/bin/python bench/front.py [--requests N] [--rounds R]

It needs LiteLLM's proxy (``litellm[proxy]``, the ``bench`` extra), which ``./dev front``
installs in ``.venv-bench``; ``--skip-litellm`` leaves it out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx2
import openai
from fixtures import chunk_event, completion, content_events, one_route_toml
from routerd_client import AsyncClient

from routerd.launch import DaemonProcess

KEY = "sk-front-" + secrets.token_hex(12)
ROUTE = "bench"
MODEL = "m"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
SDK_MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": MESSAGES[0]["content"]}
]
# Large limits: the responder never throttles, and routerd never sees a window run dry.
LIMIT_REQUESTS = 10_000_000
LIMIT_TOKENS = 10_000_000_000

DIRECT = "direct"
MSGPACK = "routerd msgpack"
HTTP_FRONT = "routerd HTTP front"
LITELLM = "LiteLLM proxy"
RELAY = "TCP relay (floor)"

Call = Callable[[], Awaitable[None]]
# A stream: returns (seconds to the first chunk, chunks received).
Stream = Callable[[], Awaitable[tuple[float, int]]]


# --- the responder (its own process) ---------------------------------------------------


def serve_responder(chunks: int) -> None:
    """Run the responder on 127.0.0.1 (a free port, printed on stdout) until SIGTERM."""
    from aiohttp import web

    created = int(time.time())
    headers = {
        "x-ratelimit-limit-requests": str(LIMIT_REQUESTS),
        "x-ratelimit-remaining-requests": str(LIMIT_REQUESTS - 1),
        "x-ratelimit-reset-requests": "6ms",
        "x-ratelimit-limit-tokens": str(LIMIT_TOKENS),
        "x-ratelimit-remaining-tokens": str(LIMIT_TOKENS - 100),
        "x-ratelimit-reset-tokens": "0s",
        "openai-processing-ms": "1",
    }
    usage = {"prompt_tokens": 18, "completion_tokens": chunks, "total_tokens": 18 + chunks}
    reply = completion(MODEL, created, usage)
    stream_chunks = content_events(MODEL, created, chunks)
    usage_chunk = chunk_event(MODEL, created, [], usage=usage)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=reply, headers=headers, content_type="application/json")
        response = web.StreamResponse(
            headers={**headers, "content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)
        for piece in stream_chunks:
            await response.write(piece)  # one write per chunk, as a provider sends them
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(usage_chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


def serve_relay(upstream_port: int) -> None:
    """Run the TCP relay on 127.0.0.1 (a free port, printed on stdout) until SIGTERM.

    Each client connection gets one connection of its own to the responder, and the bytes
    are copied both ways as they come, nothing parsed: the least that any proxy process in
    the path adds here (one more hop each way, four sockets instead of two, a third
    process on the same cores). It runs on uvloop, as routerd does.
    """
    import uvloop

    class Pipe(asyncio.Protocol):
        """One side of a relayed connection; ``peer`` is the other side."""

        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.peer: Pipe | None = None
            self.early: list[bytes] = []  # what came before the peer's connection was open

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

        def data_received(self, data: bytes) -> None:
            if self.peer is None or self.peer.transport is None:
                self.early.append(data)
            else:
                self.peer.transport.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.close()

        def pause_writing(self) -> None:
            assert self.peer is not None and self.peer.transport is not None
            self.peer.transport.pause_reading()

        def resume_writing(self) -> None:
            assert self.peer is not None and self.peer.transport is not None
            self.peer.transport.resume_reading()

    class Accepted(Pipe):
        """A client's connection: what it sends first waits for its upstream connection."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            try:
                opened, upstream = await loop.create_connection(Pipe, "127.0.0.1", upstream_port)
            except OSError:
                assert self.transport is not None
                self.transport.close()
                return
            # uvloop may call connection_made only after create_connection returned.
            upstream.transport = opened
            upstream.peer, self.peer = self, upstream
            assert self.transport is not None
            if self.transport.is_closing():
                opened.close()
            else:
                opened.writelines(self.early)
                self.early.clear()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Accepted, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


@dataclass
class Child:
    """A process this benchmark started, stopped with SIGTERM (then SIGKILL)."""

    name: str
    process: subprocess.Popen[bytes]

    def stop(self, timeout: float = 15.0) -> None:
        """Stop it and its process group (it leads its own session)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _proc_stats() -> dict[int, list[str]]:
    """Every process's /proc/<pid>/stat fields after the command (state, ppid, ...)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                stats[int(entry)] = stat.read().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
    return stats


def _under(pid: int, root: int, parent: dict[int, int]) -> bool:
    """Whether ``pid`` is ``root`` or one of its descendants."""
    while pid > 1 and pid != root:
        pid = parent.get(pid, 0)
    return pid == root


def _trees(roots: dict[str, int], stats: dict[int, list[str]]) -> dict[str, list[int]]:
    parent = {pid: int(fields[1]) for pid, fields in stats.items()}
    return {
        name: [pid for pid in parent if _under(pid, root, parent)] for name, root in roots.items()
    }


def process_trees(roots: dict[str, int]) -> dict[str, list[int]]:
    """Each root process's pid and its live descendants'."""
    return _trees(roots, _proc_stats())


# Not a process: the CPU seconds all of them spent in the kernel (system calls, loopback
# TCP delivering to the peer), a part of the processes' figures.
KERNEL = "in kernel"


def cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) used so far by each root process and its live descendants,
    and the system part of all of them under KERNEL."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = _proc_stats()
    trees = _trees(roots, stats)
    # utime and stime: the 14th and 15th fields of the line, the 12th and 13th after it.
    used = {
        name: sum(int(stats[pid][11]) + int(stats[pid][12]) for pid in pids) / tick
        for name, pids in trees.items()
    }
    used[KERNEL] = sum(int(stats[pid][12]) for pids in trees.values() for pid in pids) / tick
    return used


def cpu_snapshot(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of this benchmark and of each watched process (with its children),
    and under KERNEL the system part of all of them."""
    used = cpu_seconds(roots)
    used[KERNEL] += os.times().system
    return {"benchmark": time.process_time()} | used


Sched = dict[str, tuple[int, int]]


def add_cpu_since(before: dict[str, float], roots: dict[str, int], into: dict[str, float]) -> None:
    """Add to ``into`` the CPU seconds each process spent since the ``before`` snapshot."""
    for name, used in cpu_snapshot(roots).items():
        into[name] = into.get(name, 0.0) + used - before[name]


def sched_ns(pid: int) -> tuple[int, int]:
    """Nanoseconds a process's threads spent on a core, and runnable but waiting for one
    (Linux schedstat); (0, 0) where the kernel does not tell."""
    on_cpu = queued = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                ran, waited, _ = stat.read().split()
        except (OSError, ValueError):
            continue  # a thread gone meanwhile
        on_cpu += int(ran)
        queued += int(waited)
    return on_cpu, queued


def sched_snapshot(trees: dict[str, list[int]], *, benchmark_last: bool) -> Sched:
    """``sched_ns`` of this benchmark and of each watched process tree (``process_trees``).
    This process is read last at a block's start and first at its end, so reading the
    others stays outside its own figure."""
    others = {}
    for name, pids in trees.items():
        times = [sched_ns(pid) for pid in pids]
        others[name] = (sum(on for on, _ in times), sum(queued for _, queued in times))
    if benchmark_last:
        return others | {"benchmark": sched_ns(os.getpid())}
    return {"benchmark": sched_ns(os.getpid())} | others


def start_child(name: str, *args: str) -> tuple[Child, int]:
    """This script in another mode (``args``), in its own process, and the port it prints."""
    process = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches only the benchmark, which stops it
    )
    child = Child(name, process)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip():
            raise RuntimeError(f"the {name} exited with {process.wait()} before listening")
        return child, int(line)
    except BaseException:
        child.stop()
        raise


# --- routerd and LiteLLM ---------------------------------------------------------------


def call_ns() -> float:
    """What one Python function call takes here now (ns, best of five): this machine's speed
    swings within minutes, and every figure with it."""
    number = 200_000
    best = min(timeit.repeat("f(1)", "def f(a, b=1): return a", number=number, repeat=5))
    return best / number * 1e9


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_routerd(
    workdir: Path, upstream: str, http_port: int, token: str, log_level: str
) -> DaemonProcess:
    """A real ``routerd serve``: one route to the responder, msgpack socket and HTTP front;
    at ``log_level`` (routerd's default, ``info``, writes a line per request)."""
    config = workdir / "routerd.toml"
    config.write_text(
        one_route_toml(
            state_dir=workdir,
            log_level=log_level,
            http_port=http_port,
            token_env="FRONT_HTTP_TOKEN",
            base_url=upstream,
            key_envs={"bench": "FRONT_BENCH_KEY"},
            route=ROUTE,
            model=MODEL,
        )
    )
    return DaemonProcess(
        config,
        socket_path=workdir / "routerd.sock",
        env={
            "FRONT_BENCH_KEY": KEY,
            "FRONT_HTTP_TOKEN": token,
            "XDG_STATE_HOME": str(workdir / "state"),
        },
        log_path=workdir / "routerd.log",
    )


def litellm_env(master_key: str) -> dict[str, str]:
    """LiteLLM offline and quiet (its bundled cost map, no telemetry, errors only), keyed."""
    env = dict(os.environ)
    env.update(
        {
            # Like routerd's HTTP token: every request carries it (LiteLLM refuses to start
            # without one).
            "LITELLM_MASTER_KEY": master_key,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_OFFLINE_MODE": "true",
            "HF_HUB_OFFLINE": "1",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "FRONT_BENCH_KEY": KEY,
        }
    )
    return env


def start_litellm(
    workdir: Path, upstream: str, port: int, master_key: str, timeout: float
) -> Child:
    """LiteLLM's proxy with one model on the responder; returns once /health/liveliness is 200."""
    config = workdir / "litellm.yaml"
    config.write_text(
        f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream}
      api_key: os.environ/FRONT_BENCH_KEY
litellm_settings:
  set_verbose: false
  turn_off_message_logging: true
"""
    )
    script = Path(sys.executable).parent / "litellm"
    command = (
        [str(script)] if script.exists() else [sys.executable, "-m", "litellm.proxy.proxy_cli"]
    )
    command += ["--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    log_path = workdir / "litellm.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            env=litellm_env(master_key),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    child = Child("litellm", process)
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}/health/liveliness", timeout, log_path)
    except BaseException:
        child.stop()
        raise
    return child


def wait_healthy(
    process: subprocess.Popen[bytes], url: str, timeout: float, log_path: Path
) -> None:
    """Poll ``url`` until it answers 200; raise with the log's tail if the process dies."""

    def tail() -> str:
        lines = log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in lines[-15:])

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"exited with {process.returncode}; log:\n{tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.25)
        raise RuntimeError(f"not healthy within {timeout:.0f} s; log:\n{tail()}")

    asyncio.run(poll())


# --- the load generator ----------------------------------------------------------------


class Failed(Exception):
    """A request that did not come back as expected."""


def http_paths(
    session: aiohttp.ClientSession, url: str, model: str, token: str
) -> tuple[Call, Stream]:
    """One HTTP path's call and stream: the same code for the responder, routerd, LiteLLM."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    plain = json.dumps({"model": model, "messages": MESSAGES}).encode()
    streamed = json.dumps(
        {
            "model": model,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()

    async def call() -> None:
        async with session.post(url, data=plain, headers=headers) as response:
            data = await response.read()
            if response.status != 200:
                raise Failed(f"HTTP {response.status}: {data[:200]!r}")
            if not json.loads(data)["choices"]:
                raise Failed("no choices")

    async def stream() -> tuple[float, int]:
        started = time.perf_counter()
        first = 0.0
        chunks = 0
        done = False
        async with session.post(url, data=streamed, headers=headers) as response:
            if response.status != 200:
                raise Failed(f"HTTP {response.status}: {(await response.read())[:200]!r}")
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                choices = json.loads(payload).get("choices")
                if choices and choices[0].get("delta", {}).get("content"):
                    if not chunks:
                        first = time.perf_counter() - started
                    chunks += 1
        if not done:
            raise Failed("stream ended without [DONE]")
        return first, chunks

    return call, stream


def sdk_call(client: openai.AsyncOpenAI, model: str) -> Call:
    """One HTTP path's call through the OpenAI SDK, as an agent makes it."""

    async def call() -> None:
        completion = await client.chat.completions.create(model=model, messages=SDK_MESSAGES)
        if not completion.choices:
            raise Failed("no choices")

    return call


def msgpack_paths(client: AsyncClient) -> tuple[Call, Stream]:
    """The msgpack socket's call and stream, through routerd_client.AsyncClient."""

    async def call() -> None:
        result = await client.chat(ROUTE, messages=MESSAGES)
        if not result.text:
            raise Failed("empty text")

    async def stream() -> tuple[float, int]:
        started = time.perf_counter()
        first = 0.0
        chunks = 0
        async for chunk in client.stream(ROUTE, messages=MESSAGES):
            if chunk.text:
                if not chunks:
                    first = time.perf_counter() - started
                chunks += 1
        return first, chunks

    return call, stream


@dataclass
class Figures:
    """Everything measured on one path, accumulated over the rounds."""

    latency_ms: list[float] = field(default_factory=list)
    # concurrency -> (requests served, seconds)
    throughput: dict[int, tuple[int, float]] = field(default_factory=dict)
    ttfc_ms: list[float] = field(default_factory=list)
    stream_chunks: int = 0
    stream_seconds: float = 0.0
    streams: int = 0
    # CPU seconds each process spent during the many-streams runs.
    stream_cpu: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    sample_error: str = ""
    # CPU seconds each process spent during the throughput runs, and the requests served.
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_requests: int = 0
    # Concurrency 1 (the latency blocks): each process's nanoseconds on a core and in the
    # run queue, and the requests they were spent on.
    c1_sched: dict[str, list[int]] = field(default_factory=dict)
    c1_calls: int = 0

    def failed(self, exc: BaseException) -> None:
        """Count one failure by its type, keeping one message."""
        kind = type(exc).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.sample_error = self.sample_error or f"{kind}: {' '.join(str(exc).split())[:160]}"

    def rate(self, concurrency: int) -> float:
        """Requests served per second at ``concurrency``."""
        served, seconds = self.throughput.get(concurrency, (0, 0.0))
        return served / seconds if seconds else 0.0

    def chunk_rate(self) -> float:
        """Content chunks received per second with many streams at once."""
        return self.stream_chunks / self.stream_seconds if self.stream_seconds else 0.0


async def run_many(
    work: Callable[[], Awaitable[Any]], total: int, concurrency: int, figures: Figures
) -> tuple[int, list[Any]]:
    """``total`` calls ``concurrency`` at a time; failures are counted, never raised."""
    counter = iter(range(total))
    results: list[Any] = []

    async def worker() -> None:
        for _ in counter:
            try:
                results.append(await work())
            except Exception as exc:  # every failure is a figure of the run
                figures.failed(exc)

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return len(results), results


def rotated(names: list[str], turn: int) -> list[str]:
    """``names`` starting at the ``turn``-th, wrapping around."""
    shift = turn % len(names)
    return names[shift:] + names[:shift]


# At concurrency 1 the paths take turns in blocks this long, each after WARMUP unmeasured
# calls: short enough that a swing in the machine's speed (seconds to minutes here) meets
# every path alike, long enough that each path is measured warm, as it runs when it is busy.
BLOCK = 25
WARMUP = 3


async def in_turns(
    works: dict[str, Callable[[], Awaitable[Any]]],
    total: int,
    figures: dict[str, Figures],
    record: Callable[[Figures, Any, float], None],
    trees: dict[str, list[int]] | None = None,
) -> None:
    """Concurrency 1: ``total`` calls of each path, the paths taking turns block by block;
    ``record`` keeps each call's figure (from its result and the seconds it took). With
    ``trees``, the scheduler's account of every process is kept per block (``c1_sched``)."""
    for turn, start in enumerate(range(0, total, BLOCK)):
        for name in rotated(list(works), turn):
            work, path = works[name], figures[name]
            await run_many(work, WARMUP, 1, Figures())  # the block's warm-up
            before = sched_snapshot(trees, benchmark_last=True) if trees is not None else {}
            calls = min(BLOCK, total - start)
            for _ in range(calls):
                started = time.perf_counter()
                try:
                    result = await work()
                except Exception as exc:
                    path.failed(exc)
                    continue
                record(path, result, time.perf_counter() - started)
            if trees is not None:
                after = sched_snapshot(trees, benchmark_last=False)
                for process, (on_cpu, queued) in after.items():
                    kept = path.c1_sched.setdefault(process, [0, 0])
                    kept[0] += on_cpu - before[process][0]
                    kept[1] += queued - before[process][1]
                path.c1_calls += calls


async def latency(
    calls: dict[str, Call], total: int, figures: dict[str, Figures], trees: dict[str, list[int]]
) -> None:
    """Concurrency 1: each request's latency, and where its time went (``in_turns``)."""

    def record(path: Figures, _: None, seconds: float) -> None:
        path.latency_ms.append(seconds * 1000)

    await in_turns(calls, total, figures, record, trees)


async def throughput(
    call: Call, total: int, concurrency: int, figures: Figures, roots: dict[str, int]
) -> None:
    """Requests served per second at ``concurrency`` (connections opened beforehand), and
    the CPU time each process spent on them."""
    await run_many(call, concurrency, concurrency, Figures())
    cpu_before = cpu_snapshot(roots)
    started = time.perf_counter()
    served, _ = await run_many(call, total, concurrency, figures)
    seconds = time.perf_counter() - started
    add_cpu_since(cpu_before, roots, figures.cpu)
    figures.cpu_requests += served
    before = figures.throughput.get(concurrency, (0, 0.0))
    figures.throughput[concurrency] = (before[0] + served, before[1] + seconds)


async def first_chunk(streams: dict[str, Stream], total: int, figures: dict[str, Figures]) -> None:
    """Concurrency 1: time to the first content chunk of each stream."""

    def record(path: Figures, result: tuple[float, int], _: float) -> None:
        path.ttfc_ms.append(result[0] * 1000)

    await in_turns(streams, total, figures, record)


async def relay(
    stream: Stream, total: int, concurrency: int, figures: Figures, roots: dict[str, int]
) -> None:
    """Content chunks received per second with ``concurrency`` streams at once, and the CPU
    time each process spent on them."""
    await run_many(stream, concurrency, concurrency, Figures())
    cpu_before = cpu_snapshot(roots)
    started = time.perf_counter()
    served, results = await run_many(stream, total, concurrency, figures)
    figures.stream_seconds += time.perf_counter() - started
    add_cpu_since(cpu_before, roots, figures.stream_cpu)
    figures.stream_chunks += sum(chunks for _, chunks in results)
    figures.streams += served


@dataclass
class Plan:
    """What to run: per measurement, per round, per path."""

    requests: int
    rounds: int
    streams: int
    stream_concurrency: int
    concurrencies: tuple[int, ...] = (16, 64)


async def measure(
    plan: Plan,
    responder: str,
    tcp_relay: str,
    socket_path: Path,
    http_front: str,
    token: str,
    litellm: tuple[str, str] | None,
    roots: dict[str, int],
) -> tuple[dict[str, Figures], dict[str, Figures]]:
    """Every measurement on every path, interleaved in rounds; ``roots`` names the processes
    whose CPU time is counted (the responder, the relay, routerd, LiteLLM's proxy). Returns
    the figures with the aiohttp client, then the throughput with the OpenAI SDK's."""
    limit = max(*plan.concurrencies, plan.stream_concurrency) + 8
    timeout = aiohttp.ClientTimeout(total=120)
    sessions: list[aiohttp.ClientSession] = []

    def session() -> aiohttp.ClientSession:
        # One session (and connection pool) per HTTP path, all alike.
        # Idle connections closed before the servers' keep-alive (5 s) ends, so none is
        # reused just as the server closes it.
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=2.0)
        made = aiohttp.ClientSession(connector=connector, timeout=timeout)
        sessions.append(made)
        return made

    sdks: list[openai.AsyncOpenAI] = []

    def sdk(base_url: str, key: str, model: str) -> Call:
        # One SDK client (and its httpx2 pool) per path, idle connections closed as above.
        limits = httpx2.Limits(
            max_connections=limit, max_keepalive_connections=limit, keepalive_expiry=2.0
        )
        made = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=key,
            max_retries=0,  # a failure is a figure, not a retry
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=120),
        )
        sdks.append(made)
        return sdk_call(made, model)

    paths: dict[str, tuple[Call, Stream]] = {}
    sdk_paths: dict[str, Call] = {}
    try:
        paths[DIRECT] = http_paths(session(), f"{responder}/chat/completions", MODEL, KEY)
        paths[RELAY] = http_paths(session(), f"{tcp_relay}/chat/completions", MODEL, KEY)
        sdk_paths[DIRECT] = sdk(responder, KEY, MODEL)
        sdk_paths[RELAY] = sdk(tcp_relay, KEY, MODEL)
        async with AsyncClient(str(socket_path), name="front-bench", timeout=120) as client:
            paths[MSGPACK] = msgpack_paths(client)
            paths[HTTP_FRONT] = http_paths(
                session(), f"{http_front}/v1/chat/completions", ROUTE, token
            )
            sdk_paths[HTTP_FRONT] = sdk(f"{http_front}/v1", token, ROUTE)
            if litellm is not None:
                litellm_url, master_key = litellm
                paths[LITELLM] = http_paths(
                    session(), f"{litellm_url}/v1/chat/completions", MODEL, master_key
                )
                sdk_paths[LITELLM] = sdk(f"{litellm_url}/v1", master_key, MODEL)
            figures = {name: Figures() for name in paths}
            sdk_figures = {name: Figures() for name in sdk_paths}
            trees = process_trees(roots)  # every process is up (LiteLLM's workers too)
            calls = {name: call for name, (call, _) in paths.items()}
            streams = {name: stream for name, (_, stream) in paths.items()}
            per_round = max(1, plan.requests // plan.rounds)
            streams_per_round = max(1, plan.streams // plan.rounds)
            for r in range(plan.rounds):
                step = time.monotonic()
                # LiteLLM's proxy takes its concurrency-1 turns apart: its blocks last 50 times
                # longer than the others', and after one the others would start cold.
                for group in (
                    [n for n in paths if n != LITELLM],
                    [n for n in paths if n == LITELLM],
                ):
                    if group:
                        await latency({n: calls[n] for n in group}, per_round, figures, trees)
                        await first_chunk(
                            {n: streams[n] for n in group}, max(1, per_round // 2), figures
                        )
                for name in rotated(list(paths), r):
                    call, stream = paths[name]
                    for concurrency in plan.concurrencies:
                        await throughput(call, per_round, concurrency, figures[name], roots)
                    await relay(
                        stream, streams_per_round, plan.stream_concurrency, figures[name], roots
                    )
                for name in rotated(list(sdk_paths), r):
                    for concurrency in plan.concurrencies:
                        await throughput(
                            sdk_paths[name], per_round, concurrency, sdk_figures[name], roots
                        )
                print(
                    f"  round {r + 1}/{plan.rounds} done in {time.monotonic() - step:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            return figures, sdk_figures
    finally:
        for made in sessions:
            await made.close()
        for client_ in sdks:
            await client_.close()


# --- the report ------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``samples``, nearest rank."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(samples: list[float]) -> float:
    """The median, or NaN when there are no samples."""
    return statistics.median(samples) if samples else float("nan")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A plain text table, the first column left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        print(("  " + "  ".join(cells)).rstrip())


def report(figures: dict[str, Figures], sdk: dict[str, Figures], plan: Plan, chunks: int) -> None:
    """The tables: request/reply, streaming, CPU per request, concurrency 1's time, and the
    throughput with the OpenAI SDK as the client."""
    direct = figures[DIRECT]
    lite = figures.get(LITELLM)
    d50, d99 = median(direct.latency_ms), percentile(direct.latency_ms, 99)

    def vs_litellm(name: str, concurrency: int) -> str:
        if name not in (MSGPACK, HTTP_FRONT) or lite is None or not lite.rate(concurrency):
            return ""
        return f"{figures[name].rate(concurrency) / lite.rate(concurrency):.2f}x"

    c_lo, c_hi = plan.concurrencies
    rows = []
    for name, fig in figures.items():
        p50, p99 = median(fig.latency_ms), percentile(fig.latency_ms, 99)
        rows.append(
            [
                name,
                f"{p50:.3f}",
                f"{p99:.3f}",
                "" if name == DIRECT else f"{p50 - d50:+.3f}",
                "" if name == DIRECT else f"{p99 - d99:+.3f}",
                f"{fig.rate(c_lo):.0f}",
                f"{100 * fig.rate(c_lo) / direct.rate(c_lo):.0f}%",
                f"{fig.rate(c_hi):.0f}",
                f"{100 * fig.rate(c_hi) / direct.rate(c_hi):.0f}%",
                vs_litellm(name, c_lo),
                vs_litellm(name, c_hi),
            ]
        )
    print(
        f"\nRequest/reply: concurrency 1 latency in ms ({plan.requests} requests per path); "
        f"throughput at concurrency {c_lo} and {c_hi}"
    )
    print_table(
        [
            *("path", "p50", "p99", "added p50", "added p99"),
            *(f"req/s c{c_lo}", "% direct", f"req/s c{c_hi}", "% direct"),
            *(f"/LiteLLM c{c_lo}", f"/LiteLLM c{c_hi}"),
        ],
        rows,
    )

    d_first = median(direct.ttfc_ms)
    stream_rows = []
    for name, fig in figures.items():
        first = median(fig.ttfc_ms)
        per_stream = fig.stream_chunks / fig.streams if fig.streams else 0.0
        lite_ratio = ""
        if name in (MSGPACK, HTTP_FRONT) and lite is not None and lite.chunk_rate():
            lite_ratio = f"{fig.chunk_rate() / lite.chunk_rate():.2f}x"
        stream_rows.append(
            [
                name,
                f"{first:.3f}",
                "" if name == DIRECT else f"{first - d_first:+.3f}",
                f"{fig.chunk_rate():.0f}",
                f"{100 * fig.chunk_rate() / direct.chunk_rate():.0f}%",
                f"{per_stream:.1f}",
                lite_ratio,
            ]
        )
    print(
        f"\nStreaming: {chunks} content chunks per stream; first chunk at concurrency 1 "
        f"(ms, p50); chunks/s with {plan.stream_concurrency} streams at once "
        f"({plan.streams} streams per path)"
    )
    print_table(
        [
            *("path", "first chunk", "added", "chunks/s", "% direct"),
            *("chunks/stream", "/LiteLLM"),
        ],
        stream_rows,
    )
    processes = [p for p in direct.cpu if p != KERNEL]
    cores = os.cpu_count() or 1
    cpu_rows = []
    for name, fig in figures.items():
        per_request = {p: 1000 * fig.cpu.get(p, 0.0) / max(1, fig.cpu_requests) for p in processes}
        total = sum(per_request.values())
        cpu_rows.append(
            [
                name,
                *(f"{per_request[p]:.3f}" for p in processes),
                f"{total:.3f}",
                f"{1000 * fig.cpu.get(KERNEL, 0.0) / max(1, fig.cpu_requests):.3f}",
                f"{1000 * cores / total:.0f}" if total else "",
                f"{fig.cpu_requests / sum(fig.throughput[c][1] for c in fig.throughput):.0f}",
            ]
        )
    print(
        f"\nCPU per request in the throughput runs (ms; c{c_lo} and c{c_hi} together): every "
        f"process shares the {cores} cores, so {cores} cores / total CPU per request bounds "
        f"what a path can serve; {KERNEL}: the part of the total spent in system calls"
    )
    print_table(["path", *processes, "total", KERNEL, "bound req/s", "req/s"], cpu_rows)
    report_stream_cpu(figures, plan)
    report_c1_time(figures)
    report_sdk(sdk, plan)

    failures = [(name, fig) for name, fig in figures.items() if fig.errors]
    failures += [(f"{name} (OpenAI SDK)", fig) for name, fig in sdk.items() if fig.errors]
    print("\nfailed requests: " + ("none" if not failures else ""))
    for name, fig in failures:
        counts = ", ".join(f"{kind} x{n}" for kind, n in fig.errors.items())
        print(f"  {name}: {counts}; e.g. {fig.sample_error}")


def report_stream_cpu(figures: dict[str, Figures], plan: Plan) -> None:
    """CPU per stream of each process in the many-streams runs, and per content chunk."""
    processes = [p for p in figures[DIRECT].stream_cpu if p != KERNEL]
    rows = []
    for name, fig in figures.items():
        streams, chunks = max(1, fig.streams), max(1, fig.stream_chunks)
        per_stream = [1000 * fig.stream_cpu.get(p, 0.0) / streams for p in processes]
        total = sum(fig.stream_cpu.get(p, 0.0) for p in processes)
        rows.append(
            [
                name,
                *(f"{ms:.3f}" for ms in per_stream),
                f"{sum(per_stream):.3f}",
                f"{1000 * fig.stream_cpu.get(KERNEL, 0.0) / streams:.3f}",
                f"{1e6 * total / chunks:.1f}",
            ]
        )
    print(
        f"\nCPU per stream with {plan.stream_concurrency} streams at once (ms; the benchmark "
        "is the client, reading each chunk), the part of the total spent in the kernel, and of "
        "all processes together per content chunk"
    )
    print_table(["path", *processes, "total", KERNEL, "us/chunk"], rows)


def report_sdk(sdk: dict[str, Figures], plan: Plan) -> None:
    """Throughput with the OpenAI SDK as the client, and the CPU its client and the path's
    proxy spent per request."""
    direct, lite = sdk[DIRECT], sdk.get(LITELLM)
    rows = []
    for name, fig in sdk.items():
        row = [name]
        for concurrency in plan.concurrencies:
            rate = fig.rate(concurrency)
            row += [f"{rate:.0f}", f"{100 * rate / direct.rate(concurrency):.0f}%"]
        for concurrency in plan.concurrencies:
            row.append(
                f"{fig.rate(concurrency) / lite.rate(concurrency):.2f}x"
                if name == HTTP_FRONT and lite is not None and lite.rate(concurrency)
                else ""
            )
        served_by = SERVED_BY.get(name)
        requests = max(1, fig.cpu_requests)
        row.append(f"{1000 * fig.cpu.get('benchmark', 0.0) / requests:.3f}")
        row.append(f"{1000 * fig.cpu[served_by] / requests:.3f}" if served_by in fig.cpu else "")
        rows.append(row)
    c_lo, c_hi = plan.concurrencies
    print(
        f"\nThroughput with the OpenAI SDK as the client (openai {package_version('openai')}, "
        f"AsyncOpenAI, one client per path; {plan.requests} requests per path and "
        "concurrency): the client agents send with. Its own CPU per request is most of the "
        "work, so it bounds every path but LiteLLM's; CPU per request (ms) of the client and "
        "of the proxy serving the path"
    )
    print_table(
        [
            *("path", f"req/s c{c_lo}", "% direct", f"req/s c{c_hi}", "% direct"),
            *(f"/LiteLLM c{c_lo}", f"/LiteLLM c{c_hi}", "client cpu", "proxy cpu"),
        ],
        rows,
    )


# The process that serves each proxied path (a key of ``roots``).
SERVED_BY = {RELAY: "relay", MSGPACK: "routerd", HTTP_FRONT: "routerd", LITELLM: "LiteLLM"}


def report_c1_time(figures: dict[str, Figures]) -> None:
    """Concurrency 1, where a request's time goes: each process's time on a core and all
    processes' time in the run queue, per request."""
    direct = figures[DIRECT]
    if not direct.c1_calls or not any(on for on, _ in direct.c1_sched.values()):
        return  # no schedstat on this system
    d_mean = statistics.fmean(direct.latency_ms)
    rows = []
    for name, fig in figures.items():
        if not fig.c1_calls or not fig.latency_ms:
            continue
        per = {
            p: (on / fig.c1_calls / 1e6, q / fig.c1_calls / 1e6)
            for p, (on, q) in fig.c1_sched.items()
        }
        mean = statistics.fmean(fig.latency_ms)
        served_by = SERVED_BY.get(name)
        on_cpu = sum(on for on, _ in per.values())
        queued = sum(q for _, q in per.values())
        rows.append(
            [
                name,
                f"{mean:.3f}",
                "" if name == DIRECT else f"{mean - d_mean:+.3f}",
                f"{per['benchmark'][0]:.3f}",
                f"{per['responder'][0]:.3f}",
                f"{per[served_by][0]:.3f}" if served_by in per else "",
                f"{on_cpu:.3f}",
                f"{queued:.3f}",
            ]
        )
    print(
        "\nConcurrency 1, where a request's time goes (ms per request, means over the latency "
        "blocks; Linux schedstat): time on a core of the client (this benchmark), the "
        "responder and the proxy serving the path, of all processes together, and of all "
        "in the run queue (runnable, waiting for a core). A process may still work after it "
        "handed the reply on, so the time on a core can exceed the mean"
    )
    print_table(
        [
            *("path", "mean", "added", "client", "responder", "proxy"),
            *("all on cpu", "run queue"),
        ],
        rows,
    )


def package_version(name: str) -> str:
    """An installed distribution's version, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A short temporary directory (Unix socket paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="routerd-front-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Start the responder, routerd and LiteLLM's proxy, measure, print, stop them all."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the paths interleave in")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument(
        "--streams", type=int, default=None, help="streams per path at 100 at once (--requests)"
    )
    parser.add_argument("--stream-concurrency", type=int, default=100)
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="routerd's server.log_level (default: info, routerd's own default)",
    )
    parser.add_argument("--litellm-timeout", type=float, default=180.0, help=argparse.SUPPRESS)
    parser.add_argument("--responder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--relay", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.responder:
        serve_responder(args.chunks)
        return
    if args.relay:
        serve_relay(args.relay)
        return

    # SIGTERM as Ctrl-C: unwind through the finally blocks that stop every process.
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    plan = Plan(
        requests=args.requests,
        rounds=max(1, args.rounds),
        streams=args.streams or args.requests,
        stream_concurrency=args.stream_concurrency,
    )
    speed_before = call_ns()
    token = "rt-" + secrets.token_hex(16)
    children: list[Child] = []
    litellm_note = "skipped (--skip-litellm)"
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(workspace())
        try:
            responder, port = start_child("responder", "--responder", "--chunks", str(args.chunks))
            children.append(responder)
            upstream = f"http://127.0.0.1:{port}/v1"
            relay, relay_port = start_child("relay", "--relay", str(port))
            children.append(relay)
            http_port = free_port()
            daemon = stack.enter_context(
                start_routerd(workdir, upstream, http_port, token, args.log_level)
            )
            roots = {
                "responder": responder.process.pid,
                "relay": relay.process.pid,
                "routerd": daemon.process.pid,
            }
            litellm: tuple[str, str] | None = None
            if not args.skip_litellm:
                litellm_port = free_port()
                master_key = "sk-" + secrets.token_hex(16)
                print("starting LiteLLM's proxy ...", file=sys.stderr, flush=True)
                launched = time.monotonic()
                try:
                    proxy = start_litellm(
                        workdir, upstream, litellm_port, master_key, args.litellm_timeout
                    )
                    children.append(proxy)
                    roots["LiteLLM"] = proxy.process.pid
                except (RuntimeError, OSError) as exc:
                    litellm_note = "did not start (why: above), its rows are left out"
                    print(f"LiteLLM's proxy did not start: {exc}", flush=True)
                else:
                    litellm = (f"http://127.0.0.1:{litellm_port}", master_key)
                    litellm_note = (
                        f"{package_version('litellm')} proxy (`litellm --config`, its defaults; "
                        f"healthy after {time.monotonic() - launched:.1f} s)"
                    )
            print(
                f"measuring {plan.rounds} rounds ...",
                file=sys.stderr,
                flush=True,
            )
            figures = asyncio.run(
                measure(
                    plan,
                    upstream,
                    f"http://127.0.0.1:{relay_port}/v1",
                    daemon.socket_path,
                    f"http://127.0.0.1:{http_port}",
                    token,
                    litellm,
                    roots,
                )
            )
            routerd_failed = any(
                f[n].errors for f in figures for n in (MSGPACK, HTTP_FRONT) if n in f
            )
            routerd_log = daemon.log_text().splitlines()[-10:] if routerd_failed else []
        finally:
            for child in reversed(children):
                child.stop()

    print("routerd fronts and LiteLLM's proxy over one independent aiohttp responder on loopback")
    print(
        f"routerd {package_version('routerd')}, LiteLLM {litellm_note}, aiohttp "
        f"{package_version('aiohttp')}, Python {platform.python_version()}, {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(
        f"{plan.rounds} rounds, paths interleaved (order rotating each round); routerd at "
        f"log_level {args.log_level}"
    )
    print(
        f"machine speed: one Python function call took {speed_before:.1f} ns before the run, "
        f"{call_ns():.1f} ns after (lower is faster)"
    )
    report(*figures, plan, args.chunks)
    if routerd_log:
        print("routerd's log, last lines:")
        for line in routerd_log:
            print("    " + line[:300])
    print(f"\ntotal run time {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: every process this run started is stopped")
