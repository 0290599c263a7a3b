"""What both fronts' accept loops share: which accept() failures pass, and the back-off.

When accept() fails because the process or the system is out of descriptors or memory, a
front waits (0.1 s doubling to 1 s) and tries again: the daemon keeps serving the
connections it has, takes new ones as soon as descriptors come back, and clients wait in
the listen backlog meanwhile. Any other failure ends the loop.
"""

from __future__ import annotations

import errno

__all__ = ["BACKOFF_MAX_S", "BACKOFF_START_S", "TRANSIENT_ERRNOS", "next_backoff"]

#: accept() errors that pass once connections close or memory frees: wait, never exit.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
)
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 1.0


def next_backoff(backoff: float) -> float:
    """The wait after ``backoff`` when accept() fails again."""
    return min(backoff * 2, BACKOFF_MAX_S)
