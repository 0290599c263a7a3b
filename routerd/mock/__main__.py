"""``python -m routerd.mock --spec FILE.json``: run the mock provider on loopback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from routerd.mock.server import main_serve
from routerd.mock.spec import decode_spec


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the spec and serve until signalled."""
    parser = argparse.ArgumentParser(
        prog="python -m routerd.mock", description="A mock OpenAI-style LLM provider."
    )
    parser.add_argument("--spec", required=True, help="spec JSON file, or - for stdin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--allow-remote", action="store_true", help="allow a host outside loopback")
    args = parser.parse_args(argv)
    try:
        raw = sys.stdin.buffer.read() if args.spec == "-" else Path(args.spec).read_bytes()
        spec = decode_spec(raw)
    except (OSError, msgspec.DecodeError) as exc:
        parser.error(f"cannot load spec {args.spec}: {exc}")
    return main_serve(spec, args.host, args.port, allow_remote=args.allow_remote)


if __name__ == "__main__":
    sys.exit(main())
