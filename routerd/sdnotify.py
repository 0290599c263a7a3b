"""The daemon's side of the systemd protocols: readiness and watchdog notifications, and
socket activation. A few lines of our own instead of a libsystemd binding.

How the daemon uses it (``routerd serve``)::

    inherited = sdnotify.listen_sockets()            # [("msgpack", <socket>)] under systemd
    by_name = {name: sock for name, sock in inherited}
    sock = by_name.get("msgpack")
    if sock is not None:
        listener = await anyio.abc.SocketListener.from_socket(sock)
    else:
        listener = await anyio.create_unix_listener(path)   # not socket-activated
    ...
    sdnotify.notify("READY=1", "STATUS=serving")     # once every listener accepts
    if (interval := sdnotify.watchdog_interval()) is not None:
        task_group.start_soon(sdnotify.watchdog_loop, interval)
    ...
    sdnotify.notify("STOPPING=1", "STATUS=draining")  # on SIGTERM, before the drain

``anyio.abc.SocketListener.from_socket(sock)`` (anyio >= 4.14) takes ownership of the
socket, makes it non-blocking and, for an AF_UNIX socket on the asyncio backend, returns
a ``UNIXSocketListener``; ``await listener.aclose()`` closes it. A socket-activated daemon
must not unlink the socket path on shutdown: routerd.socket owns it and keeps listening
while the daemon restarts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

import anyio

__all__ = ["listen_sockets", "notify", "watchdog_interval", "watchdog_loop"]

# sd_listen_fds(3): passed descriptors start right after stdin, stdout and stderr.
LISTEN_FDS_START = 3


def _notify_address(value: str) -> str | None:
    """Turn $NOTIFY_SOCKET into an AF_UNIX address, or None if it is not one.

    A leading '@' names a socket in the abstract namespace, which the kernel spells with a
    leading NUL. Other forms (systemd >= 253 also allows ``vsock:CID:PORT``) are not Unix
    sockets; the daemon never runs in a VM guest that needs them.
    """
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=serving"``) to systemd in one datagram.

    Returns True if the service manager got the message, False if the process is not
    running under systemd (no $NOTIFY_SOCKET) or the socket cannot be reached. It never
    raises for those: a daemon started by hand must behave exactly as under systemd.
    """
    address = _notify_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None or not states:
        return False
    message = "\n".join(states).encode()
    try:
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        ) as sock:
            # Non-blocking: this runs on the event loop, and a datagram socket whose reader
            # is slow (a busy service manager) fills after a few messages; a blocking send
            # would then stall every request. A state that does not fit is dropped.
            sock.sendto(message, address)
    except OSError:  # BlockingIOError included
        return False
    return True


def reloading() -> tuple[str, str]:
    """The states that announce a reload: RELOADING=1 with the CLOCK_MONOTONIC time.

    systemd (>= 253) wants MONOTONIC_USEC beside RELOADING=1 to tell this reload from an
    earlier one; READY=1 afterwards ends it, whether the new config was taken or refused.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return "RELOADING=1", f"MONOTONIC_USEC={usec}"


def watchdog_interval() -> float | None:
    """The watchdog timeout systemd set for this process (WatchdogSec=), in seconds.

    None when no watchdog is armed, or when $WATCHDOG_PID names another process (the
    variable was inherited, not meant for us). The daemon must ping at half this interval;
    :func:`watchdog_loop` does.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


async def watchdog_loop(interval: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval / 2`` seconds, forever.

    Run it in the daemon's root task group: it pings from the event loop itself, so a
    loop that stops scheduling tasks stops the pings and systemd restarts the daemon.
    """
    while True:
        notify("WATCHDOG=1")
        await anyio.sleep(interval / 2)


def listen_sockets() -> list[tuple[str | None, socket.socket]]:
    """The sockets systemd passed to this process (socket activation), with their names.

    Reads $LISTEN_PID, $LISTEN_FDS and $LISTEN_FDNAMES as sd_listen_fds_with_names(3)
    does, and like ``sd_listen_fds(unset_environment=1)`` removes them from the
    environment in every case; each socket gets FD_CLOEXEC. Both keep processes the daemon
    starts from claiming or holding the listening sockets. Returns an empty list when
    nothing was passed to this very process. A name is None when systemd gave none (an
    older systemd, or a count mismatch). The caller owns every socket returned and must
    close the ones it does not serve.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    names_value = os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or count is None:
        return []
    try:
        n = int(count)
    except ValueError:
        return []
    if n <= 0:
        return []
    names: list[str | None] = list(names_value.split(":")) if names_value is not None else []
    if len(names) != n:
        names = [None] * n

    sockets: list[tuple[str | None, socket.socket]] = []
    try:
        for offset, name in enumerate(names):
            fd = LISTEN_FDS_START + offset
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            # With only a fileno, Python asks the kernel for the family, type and protocol.
            sockets.append((name, socket.socket(fileno=fd)))
    except BaseException:
        for _, sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return sockets


# The msgpack socket's names: ours, none, or the unit's own when FileDescriptorName is unset.
_MSGPACK_NAMES = (None, "msgpack", "routerd.socket")


def front_sockets() -> tuple[list[socket.socket], list[socket.socket]]:
    """The passed sockets by front: the msgpack socket (named "msgpack", or the first
    unnamed Unix socket) and the HTTP front's (named "http", Unix or TCP). Any other
    passed socket is closed, so it holds nothing open."""
    msgpack: list[socket.socket] = []
    http: list[socket.socket] = []
    for name, sock in listen_sockets():
        if name == "http":
            http.append(sock)
        elif not msgpack and sock.family == socket.AF_UNIX and name in _MSGPACK_NAMES:
            msgpack.append(sock)
        else:
            sock.close()
    return msgpack, http
