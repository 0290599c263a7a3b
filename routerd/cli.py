"""The `routerd` command: serve, status, check, reload, demo."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import msgspec

from routerd import __version__
from routerd.eventloop import loop_options


def _socket_from(args: argparse.Namespace) -> str | None:
    if args.socket:
        return str(args.socket)
    if args.config:
        from routerd.config.load import load_config
        from routerd.config.problems import ConfigError

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(2) from None
        if config.server.socket:
            return config.server.socket
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    import anyio
    import structlog

    from routerd import log
    from routerd.config.load import load_config
    from routerd.config.problems import ConfigError
    from routerd.config.secrets import resolve_secrets, resolve_state_password
    from routerd.daemon import Daemon
    from routerd.fdlimit import raise_soft_limit
    from routerd.upstream.proxy import ProxyConfigError, proxies_from

    path = args.config or os.environ.get("ROUTERD_CONFIG") or "/etc/routerd/config.toml"
    try:
        config = load_config(path)
        text = Path(path).read_text()
        secrets = resolve_secrets(config, source=str(path), text=text)
        state_password = resolve_state_password(config, source=str(path), text=text)
        proxies = proxies_from(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ProxyConfigError as exc:
        print(f"routerd: {exc}", file=sys.stderr)
        return 2
    log.configure(config.server.log_level)
    if proxies:
        structlog.get_logger("routerd.daemon").info("upstream_proxies", **proxies.describe())
    raise_soft_limit()
    daemon = Daemon(
        config,
        secrets,
        socket_path=Path(args.socket) if args.socket else None,
        config_path=Path(path),
        state_password=state_password,
        proxies=proxies,
    )
    code = 0
    try:
        anyio.run(daemon.run, backend_options=loop_options(config.server.event_loop))
    except* RuntimeError as group:
        # A start-up failure (the socket is taken) is raised inside the daemon's task group,
        # so it arrives wrapped in an ExceptionGroup.
        for error in group.exceptions:
            print(f"routerd: {error}", file=sys.stderr)
        code = 1
    return code


STATUS_TIMEOUT_S = 10.0


def _interval(text: str) -> float:
    """--interval: a finite number of seconds, at least 0.1."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= seconds < 86400:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 86400 seconds, got {text}")
    return seconds


def cmd_status(args: argparse.Namespace) -> int:
    """Print pool health from the running daemon."""
    from routerd_client import Client, RouterdError

    from routerd.status import render

    path = _socket_from(args)
    try:
        # A daemon that stops answering ends the watch with an error, not a frozen table.
        timeout = max(STATUS_TIMEOUT_S, args.interval)
        with Client(path, name="routerd-status", timeout=timeout) as client:
            while True:
                report = client.status()
                if args.json:
                    print(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
                else:
                    if args.watch:
                        print("\033[2J\033[H", end="")
                    print(render(report))
                if not args.watch:
                    return 0
                sys.stdout.flush()
                time.sleep(args.interval)
    except RouterdError as exc:
        print(f"routerd status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Make the running daemon re-read its config file, as SIGHUP does, and say the outcome."""
    from routerd_client import Client, RouterdError

    path = _socket_from(args)
    try:
        with Client(path, name="routerd-reload") as client:
            print(f"routerd reload: {client.reload()}")
    except RouterdError as exc:
        print(f"routerd reload: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config; each problem names the key and the line."""
    from routerd.config.load import check_config, load_config, summarize
    from routerd.config.secrets import resolve_secrets, resolve_state_password

    path = args.config or os.environ.get("ROUTERD_CONFIG") or "/etc/routerd/config.toml"
    problems = check_config(path, secrets=not args.no_secrets)
    if problems:
        for problem in problems:
            print(problem)
        print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    config = load_config(path)
    if args.no_secrets:
        print(
            f"{path}: ok, as a file ({len(config.providers)} provider(s), "
            f"{len(config.routes)} route(s); keys, passwords and tokens not read)"
        )
        return 0
    text = Path(path).read_text()
    secrets = resolve_secrets(config, source=str(path), text=text)
    resolve_state_password(config, source=str(path), text=text)
    print(f"{path}: ok ({summarize(config, secrets)})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the embedded demo: local mock providers, the daemon, several client processes."""
    from routerd.demo import run_demo

    return run_demo(requests=args.requests, clients=args.clients, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `routerd`."""
    parser = argparse.ArgumentParser(prog="routerd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"routerd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", type=Path, help="config file (default /etc/routerd/config.toml)")
    serve.add_argument("--socket", type=Path, help="listen here instead of the configured socket")
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="pool health: per credential and per target")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument(
        "--interval", type=_interval, default=2.0, help="seconds between refreshes (>= 0.1)"
    )
    status.add_argument("--socket", type=Path, help="the daemon's socket")
    status.add_argument("--config", type=Path, help="read the socket path from this config")
    status.set_defaults(func=cmd_status)

    check = sub.add_parser("check", help="validate a config")
    check.add_argument("--config", type=Path, help="config file (default /etc/routerd/config.toml)")
    check.add_argument(
        "--no-secrets",
        action="store_true",
        help="check the file alone: keys, passwords and tokens are not read (a build machine)",
    )
    check.set_defaults(func=cmd_check)

    reload = sub.add_parser("reload", help="re-read the config in the running daemon (as SIGHUP)")
    reload.add_argument("--socket", type=Path, help="the daemon's socket")
    reload.add_argument("--config", type=Path, help="read the socket path from this config")
    reload.set_defaults(func=cmd_reload)

    demo = sub.add_parser("demo", help="local mock providers + daemon + clients")
    demo.add_argument("--requests", type=int, default=30, help="requests per client process")
    demo.add_argument("--clients", type=int, default=4, help="client processes")
    demo.add_argument("--keep", action="store_true", help="leave the daemon running at the end")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `routerd` command."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`routerd status --json | head -1`): what it wanted, it has.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    return result


if __name__ == "__main__":
    raise SystemExit(main())
