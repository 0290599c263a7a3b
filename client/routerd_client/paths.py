"""Where the daemon's socket lives when nobody says otherwise: one rule for both ends."""

from __future__ import annotations

import os

SYSTEM_SOCKET = "/run/routerd/routerd.sock"


def default_socket_path() -> str:
    """The socket a client connects to and ``routerd serve`` listens on by default.

    ``$ROUTERD_SOCKET`` wins; then ``$RUNTIME_DIRECTORY/routerd.sock`` (systemd sets it for
    the service); then the system socket if it exists, so that a client and a hand-started
    daemon never pick different places; then ``$XDG_RUNTIME_DIR/routerd/routerd.sock``; then
    ``/tmp/routerd-$UID/routerd.sock``.
    """
    explicit = os.environ.get("ROUTERD_SOCKET")
    if explicit:
        return explicit
    service = os.environ.get("RUNTIME_DIRECTORY")
    if service:
        return os.path.join(service.split(":")[0], "routerd.sock")
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "routerd", "routerd.sock")
    return f"/tmp/routerd-{os.getuid()}/routerd.sock"
