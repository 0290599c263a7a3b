"""routerd against LiteLLM Router on the same work, measured side by side.

Both systems face the same scenarios against routerd's mock provider on loopback (real HTTP,
OpenAI-shaped sliding-window rate limits with their headers, 401 for an invalid key,
``insufficient_quota`` for an exhausted one, 503 for a dead model):

- pool: one model served by three good keys (10 requests per 2 s window each), one invalid
  key and one out-of-quota key; 120 requests at concurrency 16.
- outage: the primary target answers 503; the chain (LiteLLM: ``fallbacks``) has a second
  target, another model with another key; 120 requests at concurrency 8.
- pool at scale: ten keys, seven good ones with different sliding-window limits (100
  requests per 2 s window together), two revoked (401) and one out of quota; 2,000 requests
  at concurrency 32, measured against the capacity bound: what the good keys' windows allow
  in the wall time taken. LiteLLM's runs get a time budget; what it leaves unsent is failed.

routerd runs as the real daemon (``routerd serve``) with its default settings and is called
through ``routerd_client.AsyncClient``; LiteLLM runs ``litellm.Router`` in this process,
called with ``await router.acompletion(...)``, once with its documented defaults and once
tuned. The mock's call counts give the upstream figures; nothing here is hard-coded.

LiteLLM runs offline: the bundled model cost map (``LITELLM_LOCAL_MODEL_COST_MAP``,
``LITELLM_OFFLINE_MODE``) and tiktoken's bundled encodings; an audit hook counts every
connection or name lookup outside loopback, and the run prints that count.

    ./dev compare       or    .venv-bench/bin/python bench/compare_litellm.py
    ./dev compare --scenario pool-scale       (only that one; the flag repeats)

It needs the ``bench`` extra (LiteLLM), which ``./dev compare`` installs in ``.venv-bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import logging
import math
import os
import platform
import secrets
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from routerd_client import AsyncClient

from routerd.config.schema import BreakerConfig, ProviderConfig, RouteConfig
from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec, start_mock_process

RPM = 10
WINDOW_S = 2.0
LATENCY_MS = 5.0
POOL_MODEL = "m1"
DEAD_MODEL = "dead"
ALIVE_MODEL = "alive"
SCENARIOS = ("pool", "outage", "pool-scale")
# Pool at scale: the good keys' requests per WINDOW_S window (100 together), then the bad ones.
SCALE_LIMITS = (5, 10, 10, 15, 15, 20, 25)
SCALE_GOOD = tuple(f"s{i}" for i in range(len(SCALE_LIMITS)))
SCALE_BAD = ("revoked0", "revoked1", "exhausted")

# No reliability settings: the Router's documented defaults (read back and printed).
LITELLM_DEFAULTS: dict[str, Any] = {}
# What a user who read the reliability docs would set for a pool that hits 429s: one more
# retry, a deployment cooled after its first failure for one rate-limit window, and a
# retryable failure re-picked across the group's other deployments before giving up.
LITELLM_TUNED: dict[str, Any] = {
    "routing_strategy": "simple-shuffle",
    "num_retries": 3,
    "allowed_fails": 1,
    "cooldown_time": WINDOW_S,
    "enable_weighted_failover": True,
}
LITELLM_CONFIGS = (("LiteLLM defaults", LITELLM_DEFAULTS), ("LiteLLM tuned", LITELLM_TUNED))


@dataclass
class Burst:
    """What one burst of requests came to, as the caller saw it."""

    served: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass
class Row:
    """One system/config on one scenario: the caller's view and the provider's."""

    system: str
    settings: str
    total: int
    burst: Burst
    calls: dict[str, dict[str, dict[str, int]]]

    @property
    def failed(self) -> int:
        """Requests that ended in an error."""
        return self.total - self.burst.served

    def upstream(self, label: str, model: str | None = None, status: str | None = None) -> int:
        """Upstream calls the mock saw for ``label`` (one model, one status, or all)."""
        count = 0
        for name, statuses in self.calls.get(label, {}).items():
            if model is not None and name != model:
                continue
            for code, n in statuses.items():
                if status is None or code == status:
                    count += n
        return count


class LoopbackGuard:
    """Counts connections and name lookups to anywhere but loopback (an audit hook)."""

    def __init__(self) -> None:
        self.outside: Counter[str] = Counter()

    def install(self) -> None:
        """Start counting; audit hooks cannot be removed, so this lasts for the process."""
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.getaddrinfo":
            host = args[0]
        elif event == "socket.connect":
            address = args[1]
            if not isinstance(address, tuple):
                return  # a Unix socket: routerd's own
            host = address[0]
        else:
            return
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        if not isinstance(host, str) or not _is_loopback(host):
            self.outside[str(host)] += 1


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def import_litellm() -> Any:
    """Import LiteLLM offline and quiet; it stays ``Any`` since the test venv lacks it."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ["LITELLM_OFFLINE_MODE"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("LITELLM_LOG", "CRITICAL")
    warnings.filterwarnings("ignore", module=r"litellm(\..*)?$")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        litellm: Any = importlib.import_module("litellm")
    except ModuleNotFoundError:
        sys.exit("LiteLLM is not installed here: run ./dev compare (it uses .venv-bench)")
    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    litellm.turn_off_message_logging = True
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm", "httpx", "aiohttp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return litellm


def messages(n: int) -> list[dict[str, str]]:
    """The n-th request's messages (distinct, so no cache could answer them)."""
    return [{"role": "user", "content": f"hi {n}"}]


async def burst(
    call: Callable[[int], Awaitable[object]],
    total: int,
    concurrency: int,
    budget_s: float | None = None,
) -> Burst:
    """Send ``total`` requests, ``concurrency`` at a time, as asyncio tasks.

    With ``budget_s``, a request still running when the budget ends is cancelled and failed
    (``TimeBudget``), and the requests not yet sent are failed too (``NotSent``).
    """
    result = Burst()
    counter = iter(range(total))
    started = time.monotonic()

    def failed(kind: str, message: str) -> None:
        result.errors[kind] += 1
        result.samples.setdefault(kind, " ".join(message.split())[:160])

    async def worker() -> None:
        for n in counter:
            try:
                if budget_s is None:
                    await call(n)
                else:
                    left = budget_s - (time.monotonic() - started)
                    if left <= 0:
                        failed("NotSent", f"not sent: the {budget_s:g} s time budget had ended")
                        continue
                    async with asyncio.timeout(left):
                        await call(n)
            except TimeoutError as exc:
                if budget_s is not None and time.monotonic() - started >= budget_s:
                    failed("TimeBudget", f"cancelled when the {budget_s:g} s time budget ended")
                else:
                    failed(type(exc).__name__, str(exc))  # the system's own timeout
            except Exception as exc:  # every failure is a figure of the run
                failed(type(exc).__name__, str(exc))
            else:
                result.served += 1

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    result.wall_s = time.monotonic() - started
    return result


def routerd_burst(socket_path: Path, route: str, total: int, concurrency: int) -> Burst:
    """A burst through the daemon's Unix socket, over one client connection."""

    async def run() -> Burst:
        async with AsyncClient(str(socket_path), name="compare") as client:

            async def call(n: int) -> object:
                return await client.chat(route, messages=messages(n))

            return await burst(call, total, concurrency)

    return asyncio.run(run())


def litellm_burst(
    litellm: Any,
    model_list: list[dict[str, Any]],
    settings: dict[str, Any],
    model: str,
    total: int,
    concurrency: int,
    budget_s: float | None = None,
) -> Burst:
    """A burst through a fresh ``litellm.Router`` built from ``settings``."""

    async def run() -> Burst:
        try:
            router = litellm.Router(model_list=model_list, **settings)
        except Exception as exc:  # a config LiteLLM refuses is a figure too
            failed = Burst()
            failed.errors[type(exc).__name__] = total
            failed.samples[type(exc).__name__] = str(exc)[:160]
            return failed

        async def call(n: int) -> object:
            return await router.acompletion(model=model, messages=messages(n))

        return await burst(call, total, concurrency, budget_s)

    return asyncio.run(run())


def effective_settings(
    litellm: Any, model_list: list[dict[str, Any]], extra: dict[str, Any]
) -> str:
    """The Router's retry and cooldown settings as it reports them after construction."""
    router = litellm.Router(model_list=model_list, **extra)
    parts = [f"num_retries={router.num_retries}"]
    try:
        settings = router.settings()
    except AttributeError:  # older Routers keep them as attributes
        settings = router
    for name in ("allowed_fails", "cooldown_time", "routing_strategy"):
        parts.append(f"{name}={getattr(settings, name, '?')}")
    for name, value in extra.items():
        if name not in ("num_retries", "allowed_fails", "cooldown_time", "routing_strategy"):
            parts.append(f"{name}={value}")
    return ", ".join(parts)


def routerd_settings() -> str:
    """routerd's defaults that bear on these scenarios (the configs set none of them)."""
    provider = ProviderConfig(kind="openai-compatible", base_url="")
    route, breaker = RouteConfig(chain=[]), BreakerConfig()
    return (
        f"defaults: strategy={provider.strategy}, retries={route.retries}, "
        f"deadline_s={route.deadline_s:g}, "
        f"breaker failure_threshold={breaker.failure_threshold}, open_s={breaker.open_s:g}"
    )


def start_daemon(workdir: Path, name: str, config: str, env: dict[str, str]) -> DaemonProcess:
    """A fresh ``routerd serve`` with its own state file and socket."""
    path = workdir / f"{name}.toml"
    path.write_text(
        f'[server]\nstate_file = "{workdir / (name + ".state")}"\nlog_level = "warning"\n' + config
    )
    return DaemonProcess(
        path,
        socket_path=workdir / f"{name}.sock",
        env={"XDG_STATE_HOME": str(workdir / "xdg"), **env},
        log_path=workdir / f"{name}.log",
    )


def new_key(label: str) -> str:
    """A fresh fake API key for the mock."""
    return f"sk-compare-{label}-{secrets.token_hex(8)}"


def pool_scenario(litellm: Any, workdir: Path, total: int, concurrency: int) -> list[Row]:
    """Scenario 1: three rate-limited good keys, an invalid one and an exhausted one."""
    keys = {new_key(f"good{i}"): KeySpec(f"good{i}", rpm=RPM, window_s=WINDOW_S) for i in range(3)}
    keys[new_key("invalid")] = KeySpec("invalid", kind="invalid")
    keys[new_key("exhausted")] = KeySpec("exhausted", kind="no_quota")
    return _pool_rows(litellm, workdir, keys, "pool", total, concurrency)


def outage_scenario(litellm: Any, workdir: Path, total: int, concurrency: int) -> list[Row]:
    """Scenario 2: the primary target answers 503; the chain has a second target."""
    primary, backup = new_key("primary"), new_key("backup")
    spec = MockSpec(
        keys={primary: KeySpec("primary"), backup: KeySpec("backup")},
        models={DEAD_MODEL: ModelSpec(fault="503"), ALIVE_MODEL: ModelSpec()},
        latency_ms=LATENCY_MS,
    )
    rows: list[Row] = []
    with start_mock_process(spec) as mock:
        config = f"""
[providers.a]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "primary", key_env = "KEY_A" }}]

[providers.b]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "backup", key_env = "KEY_B" }}]

[routes.main]
chain = ["a/{DEAD_MODEL}", "b/{ALIVE_MODEL}"]
"""
        with start_daemon(workdir, "outage", config, {"KEY_A": primary, "KEY_B": backup}) as d:
            result = routerd_burst(d.socket_path, "main", total, concurrency)
        rows.append(_row(mock, "routerd", routerd_settings(), total, result))

        def deployment(name: str, model: str, key: str) -> dict[str, Any]:
            params = {"model": f"openai/{model}", "api_base": mock.base_url, "api_key": key}
            return {"model_name": name, "litellm_params": params}

        model_list = [
            deployment("primary", DEAD_MODEL, primary),
            deployment("backup", ALIVE_MODEL, backup),
        ]
        fallbacks = {"fallbacks": [{"primary": ["backup"]}]}
        for name, settings in LITELLM_CONFIGS:
            mock.reset()
            merged = {**settings, **fallbacks}
            described = effective_settings(litellm, model_list, merged)
            result = litellm_burst(litellm, model_list, merged, "primary", total, concurrency)
            rows.append(_row(mock, name, described, total, result))
    return rows


def scale_min_wall(total: int) -> float:
    """The least wall time the good keys' windows allow for ``total`` requests."""
    return (math.ceil(total / sum(SCALE_LIMITS)) - 1) * WINDOW_S


def capacity_bound(wall_s: float) -> int:
    """What the good keys can serve in ``wall_s``: sum of limit * ceil(wall / window)."""
    windows = max(1, math.ceil(wall_s / WINDOW_S))
    return sum(limit * windows for limit in SCALE_LIMITS)


def pool_scale_scenario(
    litellm: Any, workdir: Path, total: int, concurrency: int, budget_s: float
) -> list[Row]:
    """Scenario 3: seven good keys with different windows, two revoked, one exhausted."""
    keys = {
        new_key(label): KeySpec(label, rpm=limit, window_s=WINDOW_S)
        for label, limit in zip(SCALE_GOOD, SCALE_LIMITS, strict=True)
    }
    keys.update({new_key(label): KeySpec(label, kind="invalid") for label in SCALE_BAD[:2]})
    keys[new_key(SCALE_BAD[2])] = KeySpec(SCALE_BAD[2], kind="no_quota")
    return _pool_rows(litellm, workdir, keys, "scale", total, concurrency, budget_s)


def _pool_rows(
    litellm: Any,
    workdir: Path,
    keys: dict[str, KeySpec],
    route: str,
    total: int,
    concurrency: int,
    budget_s: float | None = None,
) -> list[Row]:
    """One pool of ``keys`` on the mock: routerd's burst, then each LiteLLM config's."""
    spec = MockSpec(keys=keys, models={POOL_MODEL: ModelSpec()}, latency_ms=LATENCY_MS)
    rows: list[Row] = []
    with start_mock_process(spec) as mock:
        creds = ", ".join(
            f'{{ label = "{s.label}", key_env = "KEY_{s.label.upper()}" }}' for s in keys.values()
        )
        config = f"""
[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{creds}]

[routes.{route}]
chain = ["mock/{POOL_MODEL}"]
"""
        env = {f"KEY_{s.label.upper()}": key for key, s in keys.items()}
        with start_daemon(workdir, route, config, env) as daemon:
            result = routerd_burst(daemon.socket_path, route, total, concurrency)
        rows.append(_row(mock, "routerd", routerd_settings(), total, result))

        model_list = [
            {
                "model_name": route,
                "litellm_params": {
                    "model": f"openai/{POOL_MODEL}",
                    "api_base": mock.base_url,
                    "api_key": key,
                },
            }
            for key in keys
        ]
        for name, settings in LITELLM_CONFIGS:
            mock.reset()
            described = effective_settings(litellm, model_list, settings)
            result = litellm_burst(
                litellm, model_list, settings, route, total, concurrency, budget_s
            )
            rows.append(_row(mock, name, described, total, result))
    return rows


def _row(mock: MockProcess, system: str, settings: str, total: int, result: Burst) -> Row:
    calls: dict[str, dict[str, dict[str, int]]] = mock.stats()["calls"]
    return Row(system=system, settings=settings, total=total, burst=result, calls=calls)


def ratio(value: float, base: float) -> str:
    """``value / base`` for a ratio column; infinity when only the base is zero."""
    if base == 0:
        return "=" if value == 0 else "inf"
    return f"{value / base:.2f}x"


def per_served(row: Row) -> float:
    """Wall seconds per request served: the cost of the work that got done."""
    return row.burst.wall_s / row.burst.served if row.burst.served else float("inf")


def print_table(header: list[str], rows: list[list[str]], first_width: int = 18) -> None:
    """A plain text table, the first column left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    widths[0] = max(widths[0], first_width)
    for line in [header, *rows]:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        print("  " + "  ".join(cells))


def print_calls(rows: list[Row], labels: list[str]) -> None:
    """Upstream calls per key label and HTTP status, as the mock counted them."""
    table = []
    for row in rows:
        cells = [row.system]
        for label in labels:
            statuses: Counter[str] = Counter()
            for per_model in row.calls.get(label, {}).values():
                statuses.update(per_model)
            cells.append(" ".join(f"{s}:{n}" for s, n in sorted(statuses.items())) or "-")
        table.append(cells)
    print_table(["upstream calls", *labels], table)


def print_errors(rows: list[Row]) -> None:
    """Error types per row, with one message of each type."""
    for row in rows:
        if not row.burst.errors:
            continue
        print(f"  {row.system} errors:")
        for kind, count in row.burst.errors.most_common():
            print(f"    {count:4} {kind}: {row.burst.samples[kind]}")


def report_pool(rows: list[Row], total: int, concurrency: int) -> None:
    """Scenario 1's tables."""
    print(
        f"\nScenario 1 - pool: 3 good keys ({RPM} requests per {WINDOW_S:g} s window each), "
        f"1 invalid, 1 out of quota; {total} requests at concurrency {concurrency}"
    )
    goods = [f"good{i}" for i in range(3)]
    base = rows[0]

    def throttled(row: Row) -> int:
        return sum(row.upstream(label, status="429") for label in goods)

    def bad_calls(row: Row) -> int:
        return row.upstream("invalid") + row.upstream("exhausted")

    figures = []
    for row in rows:
        upstream = sum(row.upstream(label) for label in row.calls)
        figures.append(
            [
                row.system,
                f"{row.burst.served}/{total}",
                str(row.failed),
                str(upstream),
                str(throttled(row)),
                str(row.upstream("invalid")),
                str(row.upstream("exhausted")),
                f"{row.burst.wall_s:.2f}",
                f"{per_served(row):.3f}",
            ]
        )
    print_table(
        [
            *("system", "served", "failed", "upstream", "429s on good keys", "invalid"),
            *("exhausted", "wall s", "wall s/served"),
        ],
        figures,
    )
    print("  ratios, each row's figure divided by routerd's (inf: routerd's is 0; =: both 0):")
    print_table(
        ["system", "failed", "429s", "invalid+exhausted calls", "wall", "wall per served"],
        [
            [
                row.system,
                ratio(row.failed, base.failed),
                ratio(throttled(row), throttled(base)),
                ratio(bad_calls(row), bad_calls(base)),
                ratio(row.burst.wall_s, base.burst.wall_s),
                ratio(per_served(row), per_served(base)),
            ]
            for row in rows[1:]
        ],
    )
    print_calls(rows, [*goods, "invalid", "exhausted"])
    print_errors(rows)


def report_outage(rows: list[Row], total: int, concurrency: int) -> None:
    """Scenario 2's tables."""
    print(
        f"\nScenario 2 - outage: primary answers 503, fallback to a second target "
        f"(another model, another key); {total} requests at concurrency {concurrency}"
    )
    base = rows[0]

    def dead(row: Row) -> int:
        return row.upstream("primary", DEAD_MODEL)

    print_table(
        [
            *("system", "served", "failed", "dead-target calls", "backup calls"),
            *("wall s", "wall s/served"),
        ],
        [
            [
                row.system,
                f"{row.burst.served}/{total}",
                str(row.failed),
                str(dead(row)),
                str(row.upstream("backup", ALIVE_MODEL)),
                f"{row.burst.wall_s:.2f}",
                f"{per_served(row):.3f}",
            ]
            for row in rows
        ],
    )
    print("  ratios, each row's figure divided by routerd's (inf: routerd's is 0; =: both 0):")
    print_table(
        ["system", "failed", "dead-target calls", "wall", "wall per served"],
        [
            [
                row.system,
                ratio(row.failed, base.failed),
                ratio(dead(row), dead(base)),
                ratio(row.burst.wall_s, base.burst.wall_s),
                ratio(per_served(row), per_served(base)),
            ]
            for row in rows[1:]
        ],
    )
    print_calls(rows, ["primary", "backup"])
    print_errors(rows)


def report_pool_scale(rows: list[Row], total: int, concurrency: int, budget_s: float) -> None:
    """Scenario 3's tables, against the capacity bound and the targets."""
    limits = ", ".join(str(n) for n in SCALE_LIMITS)
    print(
        f"\nScenario 3 - pool at scale: 7 good keys ({limits} requests per {WINDOW_S:g} s "
        f"window; {sum(SCALE_LIMITS)} together), 2 revoked, 1 out of quota; {total} requests "
        f"at concurrency {concurrency}"
    )
    print(
        f"  capacity bound = sum over good keys of limit * ceil(wall / {WINDOW_S:g} s); "
        f"{total} requests need >= {scale_min_wall(total):.1f} s; LiteLLM's time budget "
        f"{budget_s:g} s"
    )
    base = rows[0]

    def calls(row: Row) -> int:
        return sum(row.upstream(label) for label in row.calls)

    def throttled(row: Row) -> int:
        return sum(row.upstream(label, status="429") for label in row.calls)

    def bad_calls(row: Row) -> int:
        return sum(row.upstream(label) for label in SCALE_BAD)

    def goodput(row: Row) -> float:
        return 100 * row.burst.served / capacity_bound(row.burst.wall_s)

    def share_429(row: Row) -> float:
        return 100 * throttled(row) / calls(row) if calls(row) else 0.0

    print_table(
        [
            *("system", "served", "failed", "bound", "goodput", "upstream", "429s"),
            *("429s/calls", "revoked+exhausted", "wall s", "wall s/served"),
        ],
        [
            [
                row.system,
                f"{row.burst.served}/{total}",
                str(row.failed),
                str(capacity_bound(row.burst.wall_s)),
                f"{goodput(row):.1f}%",
                str(calls(row)),
                str(throttled(row)),
                f"{share_429(row):.2f}%",
                str(bad_calls(row)),
                f"{row.burst.wall_s:.2f}",
                f"{per_served(row):.4f}",
            ]
            for row in rows
        ],
    )
    print("  ratios, each row's figure divided by routerd's (inf: routerd's is 0; =: both 0):")
    print_table(
        [
            *("system", "served", "failed", "429s", "revoked+exhausted calls", "wall"),
            "wall per served",
        ],
        [
            [
                row.system,
                ratio(row.burst.served, base.burst.served),
                ratio(row.failed, base.failed),
                ratio(throttled(row), throttled(base)),
                ratio(bad_calls(row), bad_calls(base)),
                ratio(row.burst.wall_s, base.burst.wall_s),
                ratio(per_served(row), per_served(base)),
            ]
            for row in rows[1:]
        ],
    )
    met = goodput(base) >= 98 and share_429(base) <= 2
    print(
        f"  routerd against the targets (goodput >= 98% of the bound, 429s <= 2% of calls): "
        f"goodput {goodput(base):.1f}% ({goodput(base) - 98:+.1f} points), 429s "
        f"{share_429(base):.2f}% ({share_429(base) - 2:+.2f} points): "
        f"{'met' if met else 'NOT met'}"
    )
    print_calls(rows, [*SCALE_GOOD, *SCALE_BAD])
    print_errors(rows)


def package_version(name: str) -> str:
    """An installed distribution's version, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    """Run both scenarios on both systems and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120, help="requests per burst")
    parser.add_argument("--pool-concurrency", type=int, default=16)
    parser.add_argument("--outage-concurrency", type=int, default=8)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeat for several; default: all)",
    )
    parser.add_argument("--scale-requests", type=int, default=2000, help="pool at scale")
    parser.add_argument("--scale-concurrency", type=int, default=32, help="pool at scale")
    parser.add_argument(
        "--scale-budget",
        type=float,
        default=None,
        help="seconds a LiteLLM run of the pool at scale may take (default: twice the least "
        "wall time the windows allow, at least 60)",
    )
    args = parser.parse_args()
    chosen = set(args.scenario or SCENARIOS)
    budget_s = args.scale_budget or max(60.0, 2 * scale_min_wall(args.scale_requests))

    guard = LoopbackGuard()
    guard.install()
    started = time.monotonic()
    litellm = import_litellm()
    # /tmp keeps the daemon's socket path short (Unix socket paths are limited to ~100 bytes).
    with tempfile.TemporaryDirectory(prefix="routerd-compare-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        pool = outage = scale = []
        if "pool" in chosen:
            pool = pool_scenario(litellm, workdir, args.requests, args.pool_concurrency)
        if "outage" in chosen:
            outage = outage_scenario(litellm, workdir, args.requests, args.outage_concurrency)
        if "pool-scale" in chosen:
            scale = pool_scale_scenario(
                litellm, workdir, args.scale_requests, args.scale_concurrency, budget_s
            )

    print("routerd vs LiteLLM Router: the same work against routerd's mock provider on loopback")
    print(
        f"routerd {package_version('routerd')}, litellm {package_version('litellm')}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    print("settings:")
    for row in pool:
        print(f"  pool   {row.system:17} {row.settings}")
    for row in outage:
        print(f"  outage {row.system:17} {row.settings}")
    for row in scale:
        print(f"  scale  {row.system:17} {row.settings}")
    if pool:
        report_pool(pool, args.requests, args.pool_concurrency)
    if outage:
        report_outage(outage, args.requests, args.outage_concurrency)
    if scale:
        report_pool_scale(scale, args.scale_requests, args.scale_concurrency, budget_s)
    outside = sum(guard.outside.values())
    where = ", ".join(f"{host} x{n}" for host, n in guard.outside.items()) if outside else ""
    print(
        f"\nconnections or lookups outside loopback: {outside}{' (' + where + ')' if where else ''}"
    )
    print(f"total run time {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
