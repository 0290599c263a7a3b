"""What a daemon loads at start: the Redis client (and the telemetry packages it pulls in,
~7 MB of RSS and ~110 modules) only when ``[state]`` names a server.

Each case builds a real ``Daemon`` in a fresh interpreter, so nothing another test imported
hides a module that the daemon would load on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BUILD = """
import json, sys
from pathlib import Path
from routerd.cli import main  # the entry point `routerd serve` runs through
from routerd.config.load import parse_config
from routerd.config.secrets import resolve_secrets
from routerd.daemon import Daemon

work = Path(sys.argv[1])
config = parse_config(f'''
[server]
state_file = "{work / 'state.msgpack'}"
[providers.p]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9"
credentials = [{{ label = "k1", key_env = "K1" }}]
[routes.r]
chain = ["p/m"]
''' + sys.argv[2])
secrets = resolve_secrets(config, environ={"K1": "sk-lean-start-canary-0001"})
daemon = Daemon(config, secrets, socket_path=work / "routerd.sock")
print(json.dumps({
    "redis": sorted(m for m in sys.modules if m == "redis" or m.startswith("redis.")),
    "fleet": daemon.fleet is not None,
}))
"""


def _build(tmp_path: Path, state: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", BUILD, str(tmp_path), state],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "sk-lean-start-canary" not in done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_daemon_without_shared_state_never_loads_the_redis_client(tmp_path: Path) -> None:
    loaded = _build(tmp_path, "")
    assert loaded == {"redis": [], "fleet": False}


def test_a_daemon_with_a_state_server_loads_it(tmp_path: Path) -> None:
    loaded = _build(tmp_path, '[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:9/0"\n')
    assert loaded["fleet"] is True
    redis = loaded["redis"]
    assert isinstance(redis, list) and "redis.asyncio" in redis
