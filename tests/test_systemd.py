"""The systemd integration: sd_notify, the watchdog, socket activation, and the unit files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from routerd import sdnotify

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"

LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory short enough for AF_UNIX paths (108 bytes), which tmp_path may not be."""
    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(autouse=True)
def _clean_systemd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests run under whatever started pytest, which may itself be a systemd unit."""
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", *LISTEN_VARS):
        monkeypatch.delenv(var, raising=False)


def _require(tool: str) -> str:
    """The path of a systemd tool; a missing tool fails the test instead of skipping it."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is not installed; install Debian's systemd package "
            "(apt-get install systemd) to run the systemd unit tests"
        )
    return path


# sd_notify


def test_notify_sends_one_datagram_to_a_path_socket(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(short_tmp / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)

        assert sdnotify.notify("READY=1", "STATUS=serving 3 routes") is True
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving 3 routes"
        assert sdnotify.notify("STOPPING=1") is True
        assert receiver.recv(4096) == b"STOPPING=1"


def test_notify_reaches_an_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"routerd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

        assert sdnotify.notify("READY=1") is True
        assert receiver.recv(4096) == b"READY=1"


def test_notify_never_blocks_on_a_reader_that_does_not_read(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A datagram socket's queue fills after a few messages; a blocking send there stalled
    # the daemon's event loop (every request with it) on its fifth or sixth reload.
    path = str(short_tmp / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        results: list[bool] = []
        sender = threading.Thread(
            target=lambda: results.extend(sdnotify.notify("WATCHDOG=1") for _ in range(200)),
            daemon=True,
        )
        sender.start()
        sender.join(10)
        assert not sender.is_alive(), "notify() blocked on a full notify socket"
        assert results[0] is True and results[-1] is False
        assert receiver.recv(4096) == b"WATCHDOG=1"


def test_notify_outside_systemd_returns_false() -> None:
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("value", ["/nonexistent/routerd/notify", "@", "vsock:2:1234"])
def test_notify_to_an_unreachable_socket_returns_false_without_raising(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


# watchdog


def test_watchdog_interval_is_read_from_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0


def test_watchdog_interval_meant_for_another_process_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "thirty"])
def test_watchdog_interval_rejects_unusable_values(
    usec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert sdnotify.watchdog_interval() is None


async def test_watchdog_loop_pings_at_half_the_interval(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(short_tmp / "notify")
    interval = 0.4
    async with await anyio.create_unix_datagram_socket(local_path=path) as receiver:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sdnotify.watchdog_loop, interval)
                arrivals = []
                for _ in range(3):
                    message, _sender = await receiver.receive()
                    assert message == b"WATCHDOG=1"
                    arrivals.append(time.monotonic())
                tg.cancel_scope.cancel()

    # The first ping goes out at once; the next two follow at interval/2 each, so three
    # pings span one whole interval, never less (systemd would see a storm otherwise).
    assert arrivals[2] - arrivals[0] >= interval * 0.9


# socket activation


def test_listen_sockets_for_another_process_returns_nothing_and_unsets_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "msgpack")

    assert sdnotify.listen_sockets() == []
    assert not [var for var in LISTEN_VARS if var in os.environ]


def test_listen_sockets_without_socket_activation_returns_nothing() -> None:
    assert sdnotify.listen_sockets() == []


# What the daemon does with inherited sockets: find them, wrap the one named "msgpack" as an
# anyio listener, and serve it. It echoes one message and reports what it saw.
CHILD = """
import fcntl, json, os, sys
import anyio, anyio.abc
from routerd import sdnotify

async def main() -> None:
    inherited = sdnotify.listen_sockets()
    report = {
        "pid": os.getpid(),
        "names": [name for name, _ in inherited],
        "fds": [sock.fileno() for _, sock in inherited],
        "cloexec": [bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                    for _, s in inherited],
        "env_left": [v for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
                     if v in os.environ],
    }
    by_name = dict(inherited)
    for name, sock in inherited:
        if name != "msgpack":
            sock.close()
    listener = await anyio.abc.SocketListener.from_socket(by_name["msgpack"])
    report["listener"] = type(listener).__name__
    print(json.dumps(report), flush=True)
    async with listener:
        stream = await listener.accept()
        async with stream:
            await stream.send(b"echo:" + await stream.receive())

anyio.run(main)
"""

# What systemd does between fork and exec: move the passed sockets to fds 3, 4, ..., set
# LISTEN_PID to the pid that will run the service (exec keeps it), and exec the service.
LAUNCHER = """
import fcntl, os, sys
names, fds = sys.argv[1], [int(fd) for fd in sys.argv[2].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for offset, fd in enumerate(high):
    os.dup2(fd, 3 + offset)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[3]])
"""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _connect(path: str, proc: subprocess.Popen[str]) -> socket.socket:
    """Connect to ``path`` once whoever binds it has done so."""
    deadline = time.monotonic() + 10
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        try:
            client.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            client.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                _, err = proc.communicate(timeout=10)
                pytest.fail(f"nothing listens on {path}: {err}")
            time.sleep(0.02)
        else:
            return client


def _echo_through(path: str, proc: subprocess.Popen[str]) -> dict[str, object]:
    """Talk to the child over ``path``, read its report, and wait for a clean exit.

    Connect first: systemd-socket-activate, like systemd, starts the service only when the
    first connection arrives.
    """
    with _connect(path, proc) as client:
        client.sendall(b"ping")
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"the socket-activated child died before serving: {err}")
        assert client.recv(64) == b"echo:ping"
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    report: dict[str, object] = json.loads(line)
    return report


def test_inherited_sockets_become_an_anyio_listener(short_tmp: Path) -> None:
    msgpack_path = str(short_tmp / "routerd.sock")
    http_path = str(short_tmp / "http.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as msgpack_sock,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as http_sock,
    ):
        msgpack_sock.bind(msgpack_path)
        http_sock.bind(http_path)
        msgpack_sock.listen()
        http_sock.listen()
        fds = [msgpack_sock.fileno(), http_sock.fileno()]
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, "msgpack:http", ",".join(map(str, fds)), CHILD],
            pass_fds=fds,
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    # The parent's copies are closed; only the child's inherited descriptors listen now.
    try:
        report = _echo_through(msgpack_path, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert report["pid"] == proc.pid
    assert report["names"] == ["msgpack", "http"]
    assert report["fds"] == [3, 4]
    assert report["cloexec"] == [True, True]
    assert report["env_left"] == []
    assert report["listener"] == "UNIXSocketListener"


def test_socket_activation_by_systemd_socket_activate(short_tmp: Path) -> None:
    """The same path through systemd's own implementation of the protocol."""
    activate = _require("systemd-socket-activate")
    path = str(short_tmp / "routerd.sock")
    proc = subprocess.Popen(
        [activate, "--listen", path, "--fdname=msgpack", sys.executable, "-c", CHILD],
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        report = _echo_through(path, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert report["names"] == ["msgpack"]
    assert report["fds"] == [3]
    assert report["env_left"] == []


# unit files


def _unit_keys(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values, in order. Unit files repeat keys, so configparser won't do."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_service_runs_as_a_hardened_notify_service() -> None:
    service = _unit_keys(UNITS / "routerd.service")["Service"]
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "User": ["routerd"],
        "Group": ["routerd"],
        "RuntimeDirectory": ["routerd"],
        "StateDirectory": ["routerd"],
        "ConfigurationDirectory": ["routerd"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["true"],
        "PrivateTmp": ["true"],
        "PrivateDevices": ["true"],
        "NoNewPrivileges": ["true"],
        "MemoryDenyWriteExecute": ["true"],
        "CapabilityBoundingSet": [""],
        "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
        "WatchdogSec": ["30"],
        "TimeoutStopSec": ["45"],
        "Restart": ["on-failure"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "LimitNOFILE": ["65536"],
    }
    assert {key: service.get(key) for key in expected} == expected
    assert service["ExecStart"][0].startswith("/usr/local/bin/routerd serve --config ")


def test_socket_is_usable_by_group_routerd_only() -> None:
    sock = _unit_keys(UNITS / "routerd.socket")
    assert sock["Socket"]["ListenStream"] == ["/run/routerd/routerd.sock"]
    assert sock["Socket"]["SocketMode"] == ["0660"]
    assert sock["Socket"]["SocketGroup"] == ["routerd"]
    assert sock["Socket"]["FileDescriptorName"] == ["msgpack"]
    assert sock["Install"]["WantedBy"] == ["sockets.target"]


def test_the_http_sockets_are_named_http_and_serve_the_same_service() -> None:
    sock = _unit_keys(UNITS / "routerd-http.socket")
    assert sock["Socket"]["ListenStream"] == ["/run/routerd/http.sock", "127.0.0.1:8484"]
    assert sock["Socket"]["FileDescriptorName"] == ["http"]
    assert sock["Socket"]["SocketMode"] == ["0660"]
    assert sock["Socket"]["Service"] == ["routerd.service"]


# MemoryDenyWriteExecute=true, applied to this process by the kernel's PR_SET_MDWE (Linux
# >= 6.3) instead of systemd's seccomp filter; then the daemon's C extensions are loaded
# and exercised. A library that needs writable+executable memory (a JIT, libffi closures
# without static trampolines) fails here rather than in production.
MDWE_CHILD = """
import ctypes, mmap, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
    sys.exit(3)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()
    sys.exit("writable+executable memory was still allowed")
except PermissionError:
    pass
import importlib.util, ssl
import anyio, httpx, msgspec, structlog, uvicorn
# uvicorn's C HTTP parser, which it loads whenever it is installed.
if importlib.util.find_spec("httptools"):
    import httptools

async def main() -> None:
    async with httpx.AsyncClient(verify=ssl.create_default_context()):
        pass
    assert await anyio.to_thread.run_sync(lambda: 42) == 42
    assert msgspec.msgpack.decode(msgspec.msgpack.encode({"a": [1]})) == {"a": [1]}

anyio.run(main)
print("ok")
"""


def test_runtime_works_under_memory_deny_write_execute() -> None:
    result = subprocess.run(
        [sys.executable, "-c", MDWE_CHILD],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode == 3:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = _require("systemd-analyze")
    shutil.copy(UNITS / "routerd.socket", tmp_path)
    shutil.copy(UNITS / "routerd-http.socket", tmp_path)
    text = (UNITS / "routerd.service").read_text()
    # verify checks that ExecStart's binary exists; the real one is installed later.
    assert "ExecStart=/usr/local/bin/routerd " in text
    text = text.replace("ExecStart=/usr/local/bin/routerd ", f"ExecStart={sys.executable} ")
    (tmp_path / "routerd.service").write_text(text)

    result = subprocess.run(
        [
            analyze,
            "verify",
            "--man=no",
            str(tmp_path / "routerd.socket"),
            str(tmp_path / "routerd-http.socket"),
            str(tmp_path / "routerd.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unrelated units on the host may warn; only lines about ours count.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "routerd" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == []


def test_systemd_security_exposure_stays_ok() -> None:
    analyze = _require("systemd-analyze")
    # The exposure is 1.2 today ("OK" ends at 3.9); --threshold counts tenths, so 20 trips
    # when a hardening line goes missing, with slack for newer systemd's rescoring.
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=true",
            "--threshold=20",
            "--no-pager",
            str(UNITS / "routerd.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _sysusers_into(root: Path) -> subprocess.CompletedProcess[str]:
    """Apply routerd.sysusers to an empty root, as systemd-sysusers does at boot."""
    sysusers = _require("systemd-sysusers")
    (root / "etc").mkdir()
    with (UNITS / "routerd.sysusers").open() as config:
        return subprocess.run(
            [sysusers, f"--root={root}", "-"],
            stdin=config,
            capture_output=True,
            text=True,
            timeout=60,
        )


def test_sysusers_creates_the_routerd_user(tmp_path: Path) -> None:
    result = _sysusers_into(tmp_path)
    assert result.returncode == 0, result.stderr
    entries = [line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()]
    routerd = next(entry for entry in entries if entry[0] == "routerd")
    assert routerd[5] == "/var/lib/routerd"
    assert routerd[6].endswith("nologin")


@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles needs root to chown")
def test_tmpfiles_gives_the_runtime_directory_to_routerd(tmp_path: Path) -> None:
    tmpfiles = _require("systemd-tmpfiles")
    assert _sysusers_into(tmp_path).returncode == 0
    with (UNITS / "routerd.tmpfiles").open() as config:
        result = subprocess.run(
            [tmpfiles, f"--root={tmp_path}", "--create", "-"],
            stdin=config,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    uid = next(int(line.split(":")[2]) for line in passwd if line.startswith("routerd:"))
    run_dir = (tmp_path / "run/routerd").stat()
    assert (run_dir.st_uid, oct(run_dir.st_mode & 0o777)) == (uid, "0o750")


# The real daemon, handed its three sockets the way systemd hands them: the msgpack socket
# and the HTTP front's Unix and TCP sockets (routerd.socket and routerd-http.socket).
SERVE = "import sys; from routerd.cli import main; sys.argv[1:] = {argv!r}; sys.exit(main())"


def test_the_daemon_serves_both_fronts_on_sockets_systemd_passed(short_tmp: Path) -> None:
    import httpx
    from routerd_client import Client

    from routerd.mock import KeySpec, MockSpec, ModelSpec, start_mock_process

    key, token = f"sk-act-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    msgpack_path, http_path = short_tmp / "routerd.sock", short_tmp / "http.sock"
    spec = MockSpec(keys={key: KeySpec("main")}, models={"m1": ModelSpec()})
    with start_mock_process(spec) as mock:
        config = short_tmp / "routerd.toml"
        config.write_text(
            f"""
[server]
socket = "{short_tmp / "not-this.sock"}"
state_file = "{short_tmp / "state.msgpack"}"

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "main", key_env = "ACT_KEY" }}]

[routes.main]
chain = ["mock/m1"]
"""
        )
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as msgpack_sock,
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as http_sock,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp_sock,
        ):
            msgpack_sock.bind(str(msgpack_path))
            http_sock.bind(str(http_path))
            tcp_sock.bind(("127.0.0.1", 0))
            port = tcp_sock.getsockname()[1]
            for sock in (msgpack_sock, http_sock, tcp_sock):
                sock.listen()
            fds = [msgpack_sock.fileno(), http_sock.fileno(), tcp_sock.fileno()]
            serve = SERVE.format(argv=["serve", "--config", str(config)])
            env = {**_child_env(), "ACT_KEY": key, "ROUTERD_HTTP_TOKEN": token}
            env.pop("NOTIFY_SOCKET", None)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    LAUNCHER,
                    "msgpack:http:http",
                    ",".join(map(str, fds)),
                    serve,
                ],
                pass_fds=fds,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        try:
            transport = httpx.HTTPTransport(uds=str(http_path))
            with httpx.Client(transport=transport, base_url="http://routerd", timeout=10) as http:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        if http.get("/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        pytest.fail(f"the daemon never served: {proc.communicate()[1]}")
                    time.sleep(0.05)
                messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
                chat = {"model": "main", "messages": messages}
                over_unix = http.post("/v1/chat/completions", json=chat)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as tcp:
                refused = tcp.post("/v1/chat/completions", json=chat)
                served = tcp.post(
                    "/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {token}"}
                )
            with Client(str(msgpack_path)) as client:
                result = client.chat("main", messages=messages)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    assert over_unix.status_code == 200, over_unix.text
    assert over_unix.json()["choices"][0]["message"]["content"] == "mock reply from m1 via main: hi"
    assert (refused.status_code, served.status_code) == (401, 200)
    assert result.text == "mock reply from m1 via main: hi"
    assert proc.returncode == 0, err
    # The configured socket was never made; systemd's sockets are left for systemd to remove.
    assert not (short_tmp / "not-this.sock").exists()
    assert msgpack_path.exists() and http_path.exists()
    assert key not in err and token not in err
