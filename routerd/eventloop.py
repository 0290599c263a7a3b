"""How the daemon's process is set for serving: its event loop, its collector, and the stop
signals once it is stopping.

The loop is uvloop when it is there, asyncio's own otherwise. uvloop runs the loop's own
work (scheduling callbacks, polling, socket reads and writes) in C; a request's many trips
through the loop cost less there. Everything routerd does on the loop goes through anyio or
asyncio's public API, so either loop serves it alike.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import signal

__all__ = [
    "freeze_startup_heap",
    "ignore_late_signals",
    "loop_name",
    "loop_options",
    "uvloop_installed",
]


def uvloop_installed() -> bool:
    """Whether uvloop can be imported here."""
    return importlib.util.find_spec("uvloop") is not None


def loop_options(choice: str) -> dict[str, object]:
    """anyio's backend options for ``server.event_loop`` (validated already: "uvloop" is
    asked for only where it is installed)."""
    use = choice == "uvloop" or (choice == "auto" and uvloop_installed())
    return {"use_uvloop": use}


def loop_name() -> str:
    """What the running loop is, for the log: "uvloop" or "asyncio"."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def freeze_startup_heap() -> None:
    """Put what start-up made out of the collector's sight, once the daemon serves.

    The config, the pools and the modules live as long as the daemon: frozen, a full
    collection walks only what requests made, and the slow tail of a request gets shorter.
    Start-up's garbage goes first, or it would be kept for good.
    """
    gc.collect()
    gc.freeze()


def ignore_late_signals(signals: tuple[signal.Signals, ...]) -> None:
    """Ignore ``signals`` from here on: the daemon is stopping already.

    Leaving anyio's signal receiver restores their default handlers, under which one more
    SIGTERM on the way out (a supervisor repeating it) would end the process with -15
    instead of 0.
    """
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)
