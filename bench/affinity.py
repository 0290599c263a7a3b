"""Conversation affinity and the provider's prompt cache: what staying on one key buys.

A real daemon (``routerd serve``, started by ``routerd.launch.DaemonProcess``) serves one
route over one ``openai-compatible`` provider whose pool holds 4 keys of 4 different
organisations, on routerd's mock provider. The mock caches prompt prefixes per
organisation: a request that repeats the start of an earlier one on the same organisation
reports those tokens as ``cached_tokens``, which routerd passes on in ``usage``.

The same conversations run twice, each time on a fresh mock (empty caches) and a fresh
daemon with the default (headroom) strategy, after a few plain requests so every key has
served once:

- affinity: each conversation names itself (``session=``), so its turns stay on the key
  that served the previous one while that key can take them;
- rotation: the same turns without ``session=``, spread over the pool as plain requests.

Each turn sends the whole history (a user message of a few hundred characters per turn
and the assistant's replies); the conversations run concurrently over one AsyncClient,
each pausing a random 0 to ``--think-ms`` before a turn (seeded, the same pauses in both
runs). Without the pauses the conversations move in lockstep, and the headroom strategy's
tie-breaking then hands each one the same key every turn even without ``session=``.
Per run: follow-up turns whose prompt had cached tokens, the cached share of all prompt
tokens, distinct keys per conversation, and the input cost against "no cache at all"
with cached tokens billed at 10% (Anthropic's cache-read price) and at 50% (OpenAI's);
then routerd's own count of where the turns went and of the conversations per key.

    .venv/bin/python bench/affinity.py
    .venv/bin/python bench/affinity.py --conversations 16 --turns 20 --latency-ms 20
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from routerd_client import AsyncClient

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec, start_mock_process

KEYS = 4
RPM = 1000  # far above the load: the mock sends its rate-limit headers, nothing is refused
ROUTE = "chat"
# Cached input tokens billed at this fraction of the normal input price.
PRICES = {"Anthropic 10%": 0.10, "OpenAI 50%": 0.50}
FILLER = (
    "Here is some more of the material we are working through together, with the details "
    "that matter for the next step: figures, names, dates and the reasoning behind them. "
)


@dataclass
class Turn:
    credential: str
    prompt: int
    cached: int


@dataclass
class Run:
    """One scenario's turns by conversation, and what the daemon counted."""

    name: str
    turns: dict[int, list[Turn]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    affinity_turns: dict[str, int] = field(default_factory=dict)
    affinity_sessions: int = 0
    sessions: dict[str, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    warm_up: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    def all_turns(self) -> list[Turn]:
        return [turn for turns in self.turns.values() for turn in turns]

    def follow_ups(self) -> list[Turn]:
        return [turn for turns in self.turns.values() for turn in turns[1:]]

    def hit_share(self) -> float:
        follow = self.follow_ups()
        return sum(1 for t in follow if t.cached > 0) / len(follow) if follow else 0.0

    def cached_share(self) -> float:
        turns = self.all_turns()
        prompt = sum(t.prompt for t in turns)
        return sum(t.cached for t in turns) / prompt if prompt else 0.0

    def keys_per_conversation(self) -> list[int]:
        return [len({t.credential for t in turns}) for turns in self.turns.values()]

    def cost(self, cached_price: float) -> float:
        """Input cost relative to every prompt token at the full price."""
        turns = self.all_turns()
        prompt = sum(t.prompt for t in turns)
        cached = sum(t.cached for t in turns)
        return (prompt - cached + cached_price * cached) / prompt if prompt else 1.0


def config(mock: MockProcess, keys: dict[str, KeySpec], workdir: Path) -> Path:
    creds = ",\n  ".join(
        f'{{ label = "{s.label}", key_env = "KEY_{s.label.upper()}" }}' for s in keys.values()
    )
    text = f"""
[server]
state_file = "{workdir / "routerd.state"}"

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
strategy = "headroom"
credentials = [
  {creds}
]

[routes.{ROUTE}]
chain = ["mock/m1"]
deadline_s = 60
"""
    path = workdir / "routerd.toml"
    path.write_text(text)
    return path


def user_message(conversation: int, turn: int, chars: int) -> str:
    head = f"Conversation {conversation}, turn {turn}. "
    body = (FILLER * (chars // len(FILLER) + 1))[: max(0, chars - len(head))]
    return head + body


def think_times(args: argparse.Namespace) -> list[list[float]]:
    """Each conversation's pause before each turn, in seconds; the same for both runs."""
    rng = random.Random(args.seed)
    return [
        [rng.uniform(0, args.think_ms) / 1000 for _ in range(args.turns)]
        for _ in range(args.conversations)
    ]


async def drive(
    socket: Path, run: Run, pauses: list[list[float]], chars: int, with_session: bool
) -> None:
    async with AsyncClient(str(socket), name="bench-affinity") as client:
        # A key proves itself one call at a time: a few plain requests, one after another,
        # until every key of the pool has served once.
        for n in range(8 * KEYS):
            if len(run.warm_up) == KEYS and n >= 2 * KEYS:
                break
            result = await client.chat(ROUTE, messages=[{"role": "user", "content": f"warm {n}"}])
            run.warm_up[result.credential] += 1

        async def conversation(c: int) -> None:
            history: list[dict[str, Any]] = []
            seen = run.turns.setdefault(c, [])
            for t, pause in enumerate(pauses[c]):
                await anyio.sleep(pause)
                history.append({"role": "user", "content": user_message(c, t, chars)})
                try:
                    if with_session:
                        result = await client.chat(ROUTE, messages=history, session=f"conv-{c}")
                    else:
                        result = await client.chat(ROUTE, messages=history)
                except Exception as exc:  # counted and shown; the conversation ends there
                    run.errors[type(exc).__name__] += 1
                    return
                history.append({"role": "assistant", "content": result.text})
                seen.append(
                    Turn(
                        result.credential,
                        result.usage.get("prompt_tokens", 0),
                        result.usage.get("cached_tokens", 0),
                    )
                )

        started = time.monotonic()
        async with anyio.create_task_group() as group:
            for c in range(len(pauses)):
                group.start_soon(conversation, c)
        run.wall_s = time.monotonic() - started
        status = await client.status()
    run.affinity_turns = dict(status.affinity.turns)
    run.affinity_sessions = status.affinity.sessions
    run.sessions = {c.label: c.sessions for c in status.credentials}
    run.served = {c.label: c.successes for c in status.credentials}


def scenario(
    name: str,
    with_session: bool,
    args: argparse.Namespace,
    workdir: Path,
) -> Run:
    """One scenario on a fresh mock (empty prompt caches) and a fresh daemon."""
    stamp = time.time_ns()
    keys = {
        f"sk-bench-affinity-k{i}-{stamp}": KeySpec(f"k{i}", rpm=RPM, org=f"org{i}")
        for i in range(KEYS)
    }
    spec = MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=args.latency_ms)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    env = {f"KEY_{s.label.upper()}": secret for secret, s in keys.items()}
    env["XDG_STATE_HOME"] = str(run_dir / "xdg")
    run = Run(name)
    with start_mock_process(spec) as mock:
        path = config(mock, keys, run_dir)
        with DaemonProcess(
            path, socket_path=run_dir / "d.sock", env=env, log_path=run_dir / "d.log"
        ) as daemon:
            anyio.run(
                drive,
                daemon.socket_path,
                run,
                think_times(args),
                args.chars,
                with_session,
            )
    return run


def pct(x: float) -> str:
    return f"{x:.1%}"


def report(runs: list[Run]) -> None:
    affinity, rotation = runs
    width = 46
    print("\n  " + f"{'':{width}}" + "".join(f"{r.name:>14}" for r in runs) + f"{'aff/rot':>10}")

    def row(label: str, values: list[str], ratio: str = "") -> None:
        print("  " + f"{label:{width}}" + "".join(f"{v:>14}" for v in values) + f"{ratio:>10}")

    row("turns served", [f"{len(r.all_turns())}" for r in runs])
    row("errors", [str(sum(r.errors.values())) for r in runs])
    row("follow-up turns with cached tokens", [pct(r.hit_share()) for r in runs])
    row("cached share of all prompt tokens", [pct(r.cached_share()) for r in runs])
    row(
        "prompt tokens (all turns)",
        [f"{sum(t.prompt for t in r.all_turns()):,}" for r in runs],
    )
    row(
        "distinct keys per conversation: mean",
        [f"{statistics.mean(r.keys_per_conversation() or [0]):.2f}" for r in runs],
    )
    row(
        "distinct keys per conversation: min-max",
        [
            f"{min(r.keys_per_conversation() or [0])}-{max(r.keys_per_conversation() or [0])}"
            for r in runs
        ],
    )
    for label, price in PRICES.items():
        a, b = affinity.cost(price), rotation.cost(price)
        row(f"input cost vs no cache, cached at {label}", [pct(a), pct(b)], f"{a / b:.2f}x")
    row("wall time of the conversations", [f"{r.wall_s:.2f} s" for r in runs])

    print("\n  routerd's own count (status):")
    for r in runs:
        turns = ", ".join(f"{k} {v}" for k, v in sorted(r.affinity_turns.items())) or "(none)"
        held = ", ".join(f"{k} {v}" for k, v in sorted(r.sessions.items()))
        served = ", ".join(f"{k} {v}" for k, v in sorted(r.served.items()))
        warm = ", ".join(f"{k} {v}" for k, v in sorted(r.warm_up.items()))
        print(f"    {r.name}:")
        print(f"      affinity.turns: {turns}; affinity.sessions: {r.affinity_sessions}")
        print(f"      sessions per credential: {held}")
        print(f"      requests served per credential (warm-up included): {served}")
        print(f"      warm-up requests per credential: {warm}")
        if r.errors:
            print("      errors: " + ", ".join(f"{k} x{n}" for k, n in r.errors.most_common()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=16, help="conversations at once")
    parser.add_argument("--turns", type=int, default=20, help="turns per conversation")
    parser.add_argument("--chars", type=int, default=400, help="characters per user message")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="mock's reply latency")
    parser.add_argument(
        "--think-ms", type=float, default=100.0, help="pause before a turn: uniform 0 to this"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the pauses")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rd-affinity-", dir="/tmp"))
    started = time.monotonic()
    try:
        runs = [
            scenario("affinity", True, args, workdir),
            scenario("rotation", False, args, workdir),
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("routerd conversation affinity and the provider's prompt cache (mock provider)")
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"{args.conversations} conversations x {args.turns} turns, run concurrently; "
        f"{KEYS} keys of {KEYS} organisations (headroom strategy, {RPM} rpm each); "
        f"user messages of {args.chars} chars, whole history sent each turn; "
        f"mock latency {args.latency_ms:g} ms; pause before each turn uniform "
        f"0-{args.think_ms:g} ms (seed {args.seed}, the same in both runs)"
    )
    report(runs)
    print(f"\ntotal run time {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
