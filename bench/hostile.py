"""What stalled frames cost the daemon: RSS while many clients announce large frames and stop.

A real `routerd serve` (default [server] settings unless told otherwise) and N raw
connections that each say Hello, announce a frame of ``--frame-mib`` MiB and send all of it
but the last byte, as fast as the daemon takes it. The daemon's resident memory is sampled
before, at its peak (every 10 ms from the first stalled frame until a second after the last
one closed) and after they are closed; the clients then report how each connection ended.
A bystander client times one chat during the stall.

    .venv/bin/python bench/hostile.py --connections 30 --frame-mib 16
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from routerd_client import Client
from routerd_client.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    Error,
    Hello,
    daemon_decoder,
    encode_frame,
)

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockSpec, ModelSpec, start_mock_process

MiB = 1024 * 1024


def rss_mib(pid: int) -> float:
    """The resident memory of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class PeakRss:
    """The highest RSS of a process, sampled every 10 ms in a thread until ``stop``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError, RuntimeError):  # the process may be gone
                self.peak = max(self.peak, rss_mib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def read_reply(sock: socket.socket, deadline: float) -> str:
    """How the daemon ended a stalled connection, in a few words."""
    sock.setblocking(True)
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        header = sock.recv(HEADER.size, socket.MSG_WAITALL)
        if len(header) < HEADER.size:
            return "closed without a word"
        body = sock.recv(HEADER.unpack(header)[0], socket.MSG_WAITALL)
    except TimeoutError:
        return "no answer, still open"
    except ConnectionResetError:
        return "reset"
    message = daemon_decoder.decode(body)
    if isinstance(message, Error):
        return f"Error {message.kind}: {message.message[:60]}"
    return type(message).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=30)
    parser.add_argument("--frame-mib", type=int, default=16)
    parser.add_argument("--stall-s", type=float, default=5.0, help="how long to watch the stall")
    parser.add_argument("--wait-s", type=float, default=75.0, help="wait for the endings")
    parser.add_argument("--server", default="", help="extra [server] lines for the config")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="rd-bench-", dir="/tmp"))
    mock = start_mock_process(MockSpec(keys={"sk-bench": KeySpec("k")}, models={"m": ModelSpec()}))
    config = workdir / "routerd.toml"
    config.write_text(
        f"""
[server]
{args.server}

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "k", key_env = "KEY" }}]

[routes.main]
chain = ["mock/m"]
"""
    )
    path = workdir / "d.sock"
    env = {"KEY": "sk-bench", "XDG_STATE_HOME": str(workdir / "state")}
    size = args.frame_mib * MiB
    data = memoryview(HEADER.pack(size) + b"\xc0" * (size - 1))
    try:
        with (
            DaemonProcess(config, socket_path=path, env=env) as routerd,
            contextlib.ExitStack() as stack,
        ):
            pid = routerd.process.pid
            bystander = stack.enter_context(Client(str(path), timeout=120))
            bystander.chat("main", [{"role": "user", "content": "warm-up"}])
            before = rss_mib(pid)
            socks = []
            for _ in range(args.connections):
                sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                sock.connect(str(path))
                sock.sendall(encode_frame(Hello(PROTOCOL_VERSION, "stall")))
                sock.recv(4096)  # the Welcome
                sock.setblocking(False)
                socks.append(sock)
            sent = [0] * len(socks)
            sampler = PeakRss(pid)  # from the first stalled frame to the last close
            until = time.monotonic() + args.stall_s
            while time.monotonic() < until:
                for n, sock in enumerate(socks):
                    if sent[n] < len(data):
                        with contextlib.suppress(BlockingIOError, ConnectionError):
                            sent[n] += sock.send(data[sent[n] : sent[n] + MiB])
                time.sleep(0.01)
            started = time.perf_counter()
            bystander.chat("main", [{"role": "user", "content": "during the stall"}])
            chat_ms = (time.perf_counter() - started) * 1000
            delivered = sum(sent) / MiB
            # server.read_timeout_s (30 s by default) and some slack.
            deadline = time.monotonic() + args.wait_s
            endings = Counter(read_reply(sock, deadline) for sock in socks)
            for sock in socks:
                sock.close()
            time.sleep(1.0)
            peak = sampler.stop()
            after = rss_mib(pid)
            alive = routerd.process.poll() is None
    finally:
        mock.close()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{args.connections} connections x {args.frame_mib} MiB frames, each one byte short")
    print(f"bytes the daemon accepted   {delivered:8.1f} MiB")
    print(f"daemon RSS before           {before:8.1f} MiB")
    print(f"daemon RSS peak             {peak:8.1f} MiB")
    print(f"daemon RSS after close      {after:8.1f} MiB")
    print(f"bystander chat in the stall {chat_ms:8.1f} ms")
    print(f"daemon alive                {alive}")
    for ending, count in endings.most_common():
        print(f"  {count:3d} x {ending}")


if __name__ == "__main__":
    main()
