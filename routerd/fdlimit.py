"""File descriptors: raise the soft limit, and split what it allows between listeners.

Every client connection and every upstream connection is a descriptor. A daemon that
accepts until accept() fails with EMFILE can no longer open its state file or reach a
provider, so each listener gets a connection cap that leaves room for the rest.
"""

from __future__ import annotations

import resource

# Descriptors kept for everything that is not a connection: the state file and its
# temporary, log files, the notify socket, the event loop's own, worker threads.
RESERVED_FDS = 64
# The upstream connection pool's ceiling when descriptors are plentiful.
UPSTREAM_MAX = 1000


def raise_soft_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft if soft != resource.RLIM_INFINITY else hard


def soft_limit() -> int:
    """The soft RLIMIT_NOFILE in force (a large number when it is unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def shares(soft_limit: int, listeners: int, configured: int) -> tuple[int, int]:
    """(connection cap per listener, upstream pool size) that fit under ``soft_limit``.

    The descriptors left after the reserve are split evenly between the listeners and the
    upstream pool; a listener's cap is never above what the config asks for.
    """
    share = max(1, (soft_limit - RESERVED_FDS) // (listeners + 1))
    return max(1, min(configured, share)), max(1, min(UPSTREAM_MAX, share))
