"""What the log line every request leaves costs routerd: CPU per ``request`` line.

routerd logs one ``request`` line per request at its default level (``info``), after the
reply has left. Each set-up below runs in a process of its own (structlog's configuration
is process-wide) whose stderr is a pipe this script drains, as journald reads a service's
stderr; the process reports its CPU per line (the best of the rounds, ``process_time``,
the write to the pipe included):

- routerd at ``info``: ``routerd.log.configure``, JSON, the line written;
- routerd at ``warning``: the same call, filtered out by the level;
- structlog's stock JSON set-up, for comparison: ``TimeStamper(fmt="iso", utc=True)``,
  ``JSONRenderer()`` (the json module) and ``PrintLoggerFactory``, as structlog documents
  it (and as routerd had it, with msgspec as the serializer).

    .venv/bin/python bench/logline.py [--lines 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

# A reply's line, as the dispatcher writes it (routerd/dispatch/dispatcher.py, _account).
FIELDS: dict[str, object] = {
    "route": "chat",
    "outcome": "ok",
    "stream": False,
    "target": "openai/gpt-4.1-mini",
    "credential": "team-a",
    "attempts": 1,
    "ms": 412.37,
}
SETUPS = {
    "routerd, info (written)": "routerd-info",
    "routerd, warning (filtered)": "routerd-warning",
    "structlog's stock JSON set-up": "stock",
}


def configure(setup: str) -> None:
    """Configure logging in this process as ``setup`` names."""
    import structlog

    from routerd import log

    if setup == "stock":
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(20),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=True,
        )
    else:
        log.configure(setup.removeprefix("routerd-"), "json")


def measure(setup: str, lines: int, rounds: int) -> None:
    """Child: log ``lines`` request lines ``rounds`` times; print the best CPU per line."""
    import structlog

    configure(setup)
    logger = structlog.get_logger("routerd.dispatch")  # a module-level logger, as routerd's
    for _ in range(1000):
        logger.info("request", **FIELDS)
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(lines):
            logger.info("request", **FIELDS)
        best = min(best, (time.process_time() - started) / lines)
    print(f"{best * 1e6:.3f}", flush=True)


def run(setup: str, lines: int, rounds: int) -> tuple[float, int]:
    """Run ``setup`` in a child; its CPU per line (us) and the bytes its stderr carried."""
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            setup,
            "--lines",
            str(lines),
            "--rounds",
            str(rounds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    carried = [0]
    err = child.stderr

    def drain() -> None:
        while chunk := os.read(err.fileno(), 1 << 16):
            carried[0] += len(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    out = child.stdout.read()
    code = child.wait()
    reader.join()
    if code != 0:
        raise SystemExit(f"{setup}: the child exited with {code}")
    return float(out), carried[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.lines, args.rounds)
        return
    total = 1000 + args.lines * args.rounds
    print(
        f"CPU per request line, {args.lines} lines x {args.rounds} rounds per set-up "
        f"(best round), stderr a pipe drained by this process; Python {sys.version.split()[0]}"
    )
    results = {name: run(setup, args.lines, args.rounds) for name, setup in SETUPS.items()}
    ours = results["routerd, info (written)"][0]
    print(f"  {'set-up':32} {'us/line':>8} {'bytes/line':>10} {'vs routerd':>10}")
    for name, (us, carried) in results.items():
        print(f"  {name:32} {us:8.2f} {carried / total:10.1f} {us / ours:9.2f}x")


if __name__ == "__main__":
    main()
