"""Who is on the other end of a Unix socket (SO_PEERCRED), and whether the config lets them in.

The socket's file mode is the first gate; ``[server] allowed_users`` and ``allowed_groups``
narrow it further, for both fronts alike. With both empty, whoever can open the socket may
use it. The daemon's own user is always allowed.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

_CRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    """A connected process, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer | None:
    """The peer of a connected Unix socket; None where the OS does not say."""
    if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    except OSError:
        return None
    pid, uid, gid = _CRED.unpack(raw)
    return Peer(pid, uid, gid)


def _uid(name: str) -> int:
    if name.isdigit():
        return int(name)
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    if name.isdigit():
        return int(name)
    return grp.getgrnam(name).gr_gid


class PeerPolicy:
    """The uids and groups allowed to use routerd's sockets."""

    def __init__(self, users: list[str], groups: list[str]) -> None:
        """Resolve names now: a name that does not exist is a start-up error (KeyError)."""
        self.open = not users and not groups
        self.uids = {_uid(u) for u in users} | {os.getuid()}
        self.gids = {_gid(g) for g in groups}

    def replace(self, other: PeerPolicy) -> None:
        """Take ``other``'s rules in place (a reload), for every listener holding this one."""
        self.open, self.uids, self.gids = other.open, other.uids, other.gids

    def allows(self, peer: Peer | None) -> bool:
        """Whether this peer may talk to the daemon."""
        if self.open:
            return True
        if peer is None:
            return False
        if peer.uid in self.uids or peer.gid in self.gids:
            return True
        if not self.gids:
            return False
        try:
            user = pwd.getpwuid(peer.uid)
        except KeyError:
            return False
        return bool(self.gids.intersection(os.getgrouplist(user.pw_name, peer.gid)))

    def refusal(self, peer: Peer | None) -> str:
        """The message a refused peer gets."""
        who = "an unknown peer" if peer is None else f"uid {peer.uid} (pid {peer.pid})"
        return f"{who} is not in [server] allowed_users or allowed_groups"
