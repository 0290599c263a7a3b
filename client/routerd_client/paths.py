"""Where the daemon's socket lives when nobody says otherwise."""

from __future__ import annotations

import os

SYSTEM_SOCKET = "/run/routerd/routerd.sock"


def default_socket_path() -> str:
    """The socket a client connects to and ``routerd serve`` listens on by default.

    ``$ROUTERD_SOCKET`` wins; then the systemd socket (its RuntimeDirectory) if it exists;
    then ``$XDG_RUNTIME_DIR/routerd/routerd.sock``; then ``/tmp/routerd-$UID/routerd.sock``.
    """
    explicit = os.environ.get("ROUTERD_SOCKET")
    if explicit:
        return explicit
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "routerd", "routerd.sock")
    return f"/tmp/routerd-{os.getuid()}/routerd.sock"
