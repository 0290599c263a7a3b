"""The HTTP front of the real daemon, spoken to in plain HTTP over its Unix socket and TCP.

What an operator and an agent notice: TCP needs the token and the Unix socket does not;
errors come in each API's own shape with the SDKs' retry signals; /v1/models lists the
routes; /metrics counts requests from both fronts; /healthz turns 503 while the daemon
drains; a client that hangs up cancels its upstream call; a missing token stops the start.
Then the pure parts: loopback-only binding, an agent's Anthropic request in OpenAI shape,
and the exact Anthropic event sequence built from OpenAI-style deltas.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from routerd_client import Client

from routerd.core.calls import Delta, Reply
from routerd.fronts.http import FrontError, anthropic_shape, openai_shape
from routerd.fronts.http.connections import Hangup
from routerd.fronts.http.serve import bind_tcp
from routerd.launch import DaemonProcess, DaemonStartError
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec, start_mock_process
from routerd.translate import to_openai
from tests.conftest import DaemonFactory, canary

MockFactory = Callable[[MockSpec], MockProcess]


# ---- a running front, shared with tests/test_http_sdk.py --------------------------------


@dataclass
class Front:
    """A mock provider and a daemon whose HTTP front listens on a Unix socket and on TCP."""

    mock: MockProcess
    process: DaemonProcess
    uds: Path
    tcp: str
    token: str

    def http(self, **kwargs: Any) -> httpx.Client:
        """A plain HTTP client over the Unix socket (no token)."""
        transport = httpx.HTTPTransport(uds=str(self.uds))
        return httpx.Client(transport=transport, base_url="http://routerd", **kwargs)

    def calls(self, label: str, model: str) -> dict[str, int]:
        """How often the mock answered ``label`` on ``model``, by HTTP status."""
        stats: dict[str, dict[str, dict[str, int]]] = self.mock.stats()["calls"]
        return stats.get(label, {}).get(model, {})


def http_addresses(process: DaemonProcess) -> list[str]:
    """Where the daemon's HTTP front listens, as its http_listening log line says."""
    for line in process.log_text().splitlines():
        if '"http_listening"' in line:
            addresses: list[str] = json.loads(line)["addresses"]
            return addresses
    raise AssertionError(f"no http_listening line in the log:\n{process.log_text()}")


@contextmanager
def running_front(
    spec: MockSpec, body: str, env: dict[str, str], server: str = ""
) -> Iterator[Front]:
    """Start the mock with ``spec`` and a daemon whose config is [server] + ``body``.

    ``body`` may use {base_url}; the front listens on http.sock and 127.0.0.1:<free port>.
    """
    directory = Path(tempfile.mkdtemp(prefix="rd-http-", dir="/tmp"))
    token = f"tok-{secrets.token_hex(8)}"
    mock = start_mock_process(spec)
    try:
        config = directory / "routerd.toml"
        config.write_text(
            f"""
[server]
http_socket = "{directory / "http.sock"}"
http_listen = "127.0.0.1:0"
state_file = "{directory / "state.msgpack"}"
{server}
"""
            + body.replace("{base_url}", mock.base_url)
        )
        process_env = {"ROUTERD_HTTP_TOKEN": token, "XDG_STATE_HOME": str(directory), **env}
        with DaemonProcess(
            config,
            socket_path=directory / "routerd.sock",
            env=process_env,
            log_path=directory / "routerd.log",
        ) as process:
            tcp = next(a for a in http_addresses(process) if not a.startswith("/"))
            yield Front(mock, process, directory / "http.sock", tcp, token)
    finally:
        mock.close()
        shutil.rmtree(directory, ignore_errors=True)


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name``, keyed by its sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ---- the module's own front --------------------------------------------------------------

MAIN_KEY = canary("main")

CONFIG = """
[providers.mock]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{ label = "main", key_env = "KEY_MAIN" }]

[routes.main]
chain = ["mock/m1"]

[routes.metered]
chain = ["mock/m2"]
"""


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    spec = MockSpec(keys={MAIN_KEY: KeySpec("main")}, models={"m1": ModelSpec(), "m2": ModelSpec()})
    # 64 KiB: big enough for every request here but the one meant to be too big.
    with running_front(
        spec, CONFIG, {"KEY_MAIN": MAIN_KEY}, "max_frame = 65536\nsocket_mode = 0o600"
    ) as running:
        yield running


def test_tcp_needs_the_token_and_takes_it_either_way(front: Front) -> None:
    chat = {"model": "main", "messages": user("over tcp")}
    anthropic = {"model": "main", "max_tokens": 20, "messages": user("over tcp")}
    with httpx.Client(base_url=f"http://{front.tcp}") as http:
        refused = http.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        wrong = http.post("/v1/messages", json=anthropic, headers={"x-api-key": "nope"})
        assert wrong.status_code == 401
        assert wrong.json()["type"] == "error"
        assert wrong.json()["error"]["type"] == "authentication_error"
        # A liveness probe needs no secret; /metrics (traffic, credential labels) does.
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"authorization": "Bearer nope"}).status_code == 401

        bearer = http.post(
            "/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {front.token}"}
        )
        assert bearer.status_code == 200, bearer.text
        content = bearer.json()["choices"][0]["message"]["content"]
        assert content == "mock reply from m1 via main: over tcp"
        api_key = http.post("/v1/messages", json=anthropic, headers={"x-api-key": front.token})
        assert api_key.status_code == 200, api_key.text
        assert api_key.json()["content"][0]["text"] == "mock reply from m1 via main: over tcp"
    # The refused requests never reached the provider.
    assert sum(front.calls("main", "m1").values()) == 2
    assert front.token not in front.process.log_text()


def test_requests_refused_before_routing_are_counted(front: Front) -> None:
    def refused(http: httpx.Client) -> dict[str, float]:
        samples = metric_samples(http.get("/metrics").text, "routerd_requests_total")
        return {dict(k)["outcome"]: v for k, v in samples.items() if dict(k)["route"] == ""}

    with front.http() as http:
        before = refused(http)
        unknown = http.post("/v1/chat/completions", json={"model": "nope", "messages": user("x")})
        malformed = http.post("/v1/messages", content=b"{not json")
        empty = http.post("/v1/responses", json={"model": "main"})
        after = refused(http)
    assert (unknown.status_code, malformed.status_code, empty.status_code) == (404, 400, 400)
    assert after.get("unknown_route", 0) - before.get("unknown_route", 0) == 1
    assert after.get("bad_request", 0) - before.get("bad_request", 0) == 2


def test_unix_socket_needs_no_token_but_accepts_one(front: Front) -> None:
    assert front.uds.stat().st_mode & 0o777 == 0o600  # server.socket_mode
    with front.http() as http:
        for headers in ({}, {"authorization": "Bearer anything"}, {"x-api-key": "anything"}):
            reply = http.post(
                "/v1/chat/completions",
                json={"model": "main", "messages": user("uds")},
                headers=headers,
            )
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-routerd-provider"] == "mock"
            assert reply.headers["x-routerd-target"] == "mock/m1"
            assert reply.headers["x-routerd-credential"] == "main"
            assert reply.headers["x-routerd-attempts"] == "1"
            body = reply.json()
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["finish_reason"] == "stop"
            assert body["usage"]["total_tokens"] == (
                body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
            )
            assert MAIN_KEY not in reply.text


def test_models_lists_routes_then_targets(front: Front) -> None:
    with front.http() as http:
        listed = http.get("/v1/models").json()
        assert listed["object"] == "list"
        ids = [m["id"] for m in listed["data"]]
        assert ids[:2] == ["main", "metered"] and "mock/m1" in ids
        assert {m["owned_by"] for m in listed["data"] if m["id"] == "mock/m1"} == {"mock"}
        anthropic = http.get("/v1/models", headers={"anthropic-version": "2023-06-01"}).json()
        assert anthropic["data"][0] == {
            "type": "model",
            "id": "main",
            "display_name": "main",
            "created_at": "1970-01-01T00:00:00Z",
        }
        assert http.get("/v1/models/main").json()["id"] == "main"
        assert http.get("/v1/models/nope").status_code == 404


def test_errors_come_in_each_apis_shape(front: Front) -> None:
    with front.http() as http:
        unknown = http.post("/v1/chat/completions", json={"model": "nope", "messages": user("x")})
        assert unknown.status_code == 404
        assert unknown.headers["x-should-retry"] == "false"
        assert unknown.json()["error"]["code"] == "model_not_found"
        assert unknown.json()["error"]["routerd"]["kind"] == "unknown_route"
        unknown = http.post(
            "/v1/messages", json={"model": "nope", "max_tokens": 5, "messages": user("x")}
        )
        assert unknown.status_code == 404
        assert unknown.json()["error"]["type"] == "not_found_error"

        for garbage in (b"{not json", b'{"model": "\xff"}'):
            broken = http.post("/v1/chat/completions", content=garbage)
            assert broken.status_code == 400
            assert broken.json()["error"]["type"] == "invalid_request_error"
            broken = http.post("/v1/messages", content=garbage)
            assert broken.status_code == 400
            assert broken.json()["error"]["type"] == "invalid_request_error"
        no_messages = http.post("/v1/messages", json={"model": "main", "messages": []})
        assert no_messages.status_code == 400
        assert no_messages.json()["error"]["type"] == "invalid_request_error"
        wrong_type = http.post("/v1/messages", json={"model": 3, "messages": user("x")})
        assert wrong_type.status_code == 400 and "$.model" in wrong_type.json()["error"]["message"]

        huge = {"model": "main", "messages": user("x" * 70_000)}
        too_big = http.post("/v1/chat/completions", json=huge)
        assert too_big.status_code == 413
        assert "max_frame" in too_big.json()["error"]["message"]
        deadline = http.post(
            "/v1/chat/completions",
            json={"model": "main", "messages": user("x")},
            headers={"x-routerd-deadline": "soon"},
        )
        assert deadline.status_code == 400

        assert http.get("/v1/chat/completions").status_code == 405
        assert http.get("/v2/anything").status_code == 404


def test_bodies_past_the_fronts_bounds_are_400s_and_never_reach_the_provider(
    front: Front,
) -> None:
    """Both fronts hold requests to the same bounds (nesting, integers JSON carries): a
    hostile body is a 400 in the API's shape, not a 500, and is not sent on."""
    deep = b"[" * 5000 + b"]" * 5000  # past what the JSON decoder itself follows
    bodies = {
        "nested past the decoder": b'{"model":"main","metadata":{"a":%b},"messages":%b}',
        "nested past the bound": b'{"model":"main","metadata":{"a":%b},"messages":%b}',
        "an integer past 2**53": b'{"model":"main","metadata":{"n":%b},"messages":%b}',
    }
    fillers = {
        "nested past the decoder": deep,
        "nested past the bound": b"[" * 100 + b"]" * 100,
        "an integer past 2**53": str(10**30).encode(),
    }
    messages = json.dumps(user("x")).encode()
    endpoints = (
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
    )
    calls_before = sum(front.calls("main", "m1").values())
    with front.http() as http:
        for name, shape in bodies.items():
            for path in endpoints:
                body = shape % (fillers[name], messages)
                if path == "/v1/responses":
                    body = body.replace(b'"messages"', b'"input"')
                elif path.startswith("/v1/messages"):
                    body = body.replace(b'"model"', b'"max_tokens":5,"model"')
                reply = http.post(path, content=body, headers={"content-type": "application/json"})
                assert reply.status_code == 400, (name, path, reply.text)
                assert reply.json()["error"]["type"] == "invalid_request_error", (name, path)
                assert "metadata" in reply.json()["error"]["message"] or name.endswith("decoder"), (
                    name,
                    path,
                    reply.text,
                )
        # A content block whose type is not a string names the block, on both endpoints.
        block = {"role": "user", "content": [{"type": ["text"], "text": "hi"}]}
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            reply = http.post(path, json={"model": "main", "max_tokens": 5, "messages": [block]})
            assert reply.status_code == 400, (path, reply.text)
            assert "messages.0.content.0.type" in reply.json()["error"]["message"], reply.text
        served = http.post("/v1/chat/completions", json={"model": "main", "messages": user("ok")})
        assert served.status_code == 200
    assert sum(front.calls("main", "m1").values()) == calls_before + 1
    assert "Traceback" not in front.process.log_text()


def test_metrics_count_requests_from_both_fronts(front: Front) -> None:
    with Client(str(front.process.socket_path), name="metrics-test") as client:
        assert client.chat("metered", messages=user("msgpack")).text.endswith("msgpack")
    with front.http() as http:
        reply = http.post("/v1/chat/completions", json={"model": "metered", "messages": user("h")})
        assert reply.status_code == 200
        scraped = http.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    requests = metric_samples(text, "routerd_requests_total")
    key = (("outcome", "ok"), ("route", "metered"), ("target", "mock/m2"))
    assert requests[key] == 2
    latency = metric_samples(text, "routerd_upstream_latency_seconds_count")
    assert latency[(("target", "mock/m2"),)] >= 2
    states = metric_samples(text, "routerd_credential_state")
    assert states[(("credential", "main"), ("provider", "mock"), ("state", "ready"))] == 1
    assert states[(("credential", "main"), ("provider", "mock"), ("state", "disabled"))] == 0
    cooldown = metric_samples(text, "routerd_credential_cooldown_seconds")
    assert cooldown[(("credential", "main"), ("provider", "mock"))] == 0
    breakers = metric_samples(text, "routerd_breaker_state")
    assert breakers[(("state", "closed"), ("target", "mock/m2"))] == 1
    assert breakers[(("state", "open"), ("target", "mock/m2"))] == 0
    assert metric_samples(text, "routerd_queue_depth")[(("route", "metered"),)] == 0
    assert metric_samples(text, "routerd_in_flight")[()] == 0
    assert MAIN_KEY not in text


def test_a_client_that_hangs_up_cancels_its_upstream_call(front: Front) -> None:
    slow = {"model": "main", "messages": user("slow [[mock:sleep=3000]]")}
    started = time.monotonic()
    with front.http(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=slow)
    with front.http() as http:
        deadline = time.monotonic() + 2.0
        while True:
            text = http.get("/metrics").text
            cancelled = metric_samples(text, "routerd_requests_total").get(
                (("outcome", "cancelled"), ("route", "main"), ("target", "")), 0
            )
            if cancelled == 1:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.02)
        assert http.get("/healthz").json()["in_flight"] == 0
    # Cancelled long before the mock's 3 s were up.
    assert time.monotonic() - started < 2.5


async def test_a_hangup_cancels_its_request_whenever_the_client_went() -> None:
    # Gone while the request runs, or before it began: cancelled either way.
    for lost_first in (False, True):
        hangup = Hangup()
        if lost_first:
            hangup.lost()
        with anyio.CancelScope() as scope:
            hangup.watch(scope)
            hangup.lost()
            await anyio.sleep(5)
        assert scope.cancelled_caught and hangup.gone
    # A request that finished is not cancelled by the connection closing later.
    hangup = Hangup()
    with anyio.CancelScope() as scope:
        hangup.watch(scope)
        hangup.finish()
        hangup.lost()
        await anyio.lowlevel.checkpoint()
    assert not scope.cancel_called


# ---- daemons of their own ----------------------------------------------------------------


def test_healthz_turns_503_while_draining_and_in_flight_requests_finish(
    mock_provider: MockFactory, daemon: DaemonFactory, short_dir: Path
) -> None:
    key = canary("main")
    mock = mock_provider(MockSpec(keys={key: KeySpec("main")}, models={"m1": ModelSpec()}))
    uds = short_dir / "http.sock"
    routerd = daemon(
        f"""
[server]
http_socket = "{uds}"

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "main", key_env = "KEY_MAIN" }}]

[routes.main]
chain = ["mock/m1"]
""",
        env={"KEY_MAIN": key},
    )
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), base_url="http://routerd")
    with client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        results: list[httpx.Response] = []

        def slow() -> None:
            with httpx.Client(
                transport=httpx.HTTPTransport(uds=str(uds)), base_url="http://routerd"
            ) as other:
                body = {"model": "main", "messages": user("drained [[mock:sleep=1500]]")}
                results.append(other.post("/v1/chat/completions", json=body))

        worker = threading.Thread(target=slow)
        worker.start()
        deadline = time.monotonic() + 5
        while client.get("/healthz").json()["in_flight"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        routerd.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (health := client.get("/healthz")).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert health.json()["status"] == "draining"
        refused = client.post("/v1/chat/completions", json={"model": "main", "messages": user("x")})
        assert refused.status_code == 503
        assert refused.headers["x-should-retry"] == "true"
        worker.join(10)
    assert [r.status_code for r in results] == [200]
    assert results[0].json()["choices"][0]["message"]["content"].endswith("drained")
    # The one SIGTERM is enough: the daemon exits by itself once the drain is done.
    assert routerd.process.wait(10) == 0
    assert not uds.exists()


def test_requests_still_running_after_the_drain_timeout_get_a_503(
    mock_provider: MockFactory, daemon: DaemonFactory, short_dir: Path
) -> None:
    key = canary("main")
    mock = mock_provider(MockSpec(keys={key: KeySpec("main")}, models={"m1": ModelSpec()}))
    uds = short_dir / "http.sock"
    routerd = daemon(
        f"""
[server]
http_socket = "{uds}"
drain_timeout_s = 0.3

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "main", key_env = "KEY_MAIN" }}]

[routes.main]
chain = ["mock/m1"]
""",
        env={"KEY_MAIN": key},
    )
    transport = httpx.HTTPTransport(uds=str(uds))
    with httpx.Client(transport=transport, base_url="http://routerd", timeout=10) as client:
        results: list[httpx.Response] = []

        def slow() -> None:
            body = {"model": "main", "messages": user("forever [[mock:sleep=10000]]")}
            results.append(client.post("/v1/messages", json={**body, "max_tokens": 5}))

        worker = threading.Thread(target=slow)
        worker.start()
        deadline = time.monotonic() + 5
        while _in_flight(uds) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        assert routerd.stop() == 0
        worker.join(10)
    assert time.monotonic() - started < 5  # the drain's 0.3 s, not the mock's 10 s
    assert [r.status_code for r in results] == [529]
    assert results[0].headers["x-should-retry"] == "true"
    assert results[0].json()["error"]["type"] == "overloaded_error"
    assert "shutting down" in results[0].json()["error"]["message"]


def _in_flight(uds: Path) -> int:
    transport = httpx.HTTPTransport(uds=str(uds))
    with httpx.Client(transport=transport, base_url="http://routerd") as client:
        count: int = client.get("/healthz").json()["in_flight"]
        return count


def test_http_listen_without_its_token_refuses_to_start(daemon: DaemonFactory) -> None:
    config = """
[server]
http_listen = "127.0.0.1:0"
http_token_env = "ROUTERD_TEST_NO_SUCH_TOKEN"

[providers.mock]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
credentials = [{ label = "main", key_env = "KEY_MAIN" }]

[routes.main]
chain = ["mock/m1"]
"""
    with pytest.raises(DaemonStartError) as refused:
        daemon(config, env={"KEY_MAIN": canary("main")})
    assert "ROUTERD_TEST_NO_SUCH_TOKEN" in str(refused.value)
    assert "Traceback" not in str(refused.value)


# ---- the pure parts ----------------------------------------------------------------------


def test_bind_tcp_listens_on_loopback_only_unless_allowed() -> None:
    with pytest.raises(FrontError, match="not a loopback address"):
        bind_tcp("0.0.0.0:0", allow_remote=False)
    sockets = bind_tcp("localhost:0", allow_remote=False)
    try:
        assert sockets
        assert all(ipaddress.ip_address(s.getsockname()[0]).is_loopback for s in sockets)
    finally:
        for sock in sockets:
            sock.close()


EPHEMERAL = {"type": "ephemeral"}
PNG_URL = "data:image/png;base64,iVBORw0KGgo="


def test_an_agents_anthropic_request_becomes_the_openai_shape() -> None:
    image = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    request = anthropic_shape.parse_messages(
        json.dumps(
            {
                "model": "main",
                "max_tokens": 100,
                "system": [{"type": "text", "text": "rules", "cache_control": EPHEMERAL}],
                "stop_sequences": ["END"],
                "metadata": {"user_id": "u1"},
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                "messages": [
                    {"role": "user", "content": "find it"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "hmm", "signature": "s"},
                            {"type": "text", "text": "looking"},
                            {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": 1}},
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "and?"},
                            {
                                "type": "tool_result",
                                "tool_use_id": "t1",
                                "content": [
                                    {"type": "text", "text": "found"},
                                    {"type": "image", "source": image},
                                ],
                            },
                        ],
                    },
                ],
            }
        ).encode()
    )
    assert to_openai(request) == {
        "messages": [
            {
                "role": "system",
                "content": [{"type": "text", "text": "rules", "cache_control": EPHEMERAL}],
            },
            {"role": "user", "content": "find it"},
            {
                "role": "assistant",
                "content": "looking",
                "tool_calls": [
                    {
                        "id": "t1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q":1}'},
                    }
                ],
            },
            # The tool's answer comes first, as OpenAI requires, then the rest of the turn.
            {"role": "tool", "tool_call_id": "t1", "content": "found"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "and?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                ],
            },
        ],
        "max_tokens": 100,
        "stop": ["END"],
        "user": "u1",
        "tools": [
            {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }


def test_deltas_become_anthropics_exact_event_sequence() -> None:
    encoder = anthropic_shape.EventEncoder("main", 12)
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    second = {"index": 1, "id": "c2", "function": {"name": "g", "arguments": '{"a"'}}
    stream = (
        encoder.opening()
        + encoder.delta(Delta(text="Hel"))
        + encoder.delta(Delta(text='lo "x"\n\u2028'))
        + encoder.delta(Delta(tool_calls=[call]))
        + encoder.delta(Delta(tool_calls=[{"index": 0, "function": {"arguments": "{}"}}]))
        + encoder.delta(Delta(tool_calls=[second]))
        + encoder.delta(Delta(finish_reason="tool_calls"))
    )
    reply = Reply(
        text="Hello",
        model="m1",
        provider="mock",
        credential="main",
        target="mock/m1",
        usage={"prompt_tokens": 10, "completion_tokens": 5},
        attempts=[],
        finish_reason="tool_calls",
        tool_calls=None,
    )
    stream += encoder.closing(reply)
    events = [
        json.loads(line.removeprefix("data: "))
        for line in stream.decode().split("\n")  # SSE lines end only at CR or LF
        if line.startswith("data: ")
    ]
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[0]["message"]["usage"] == {"input_tokens": 12, "output_tokens": 0}
    assert [e["delta"] for e in events[3:5]] == [
        {"type": "text_delta", "text": "Hel"},
        {"type": "text_delta", "text": 'lo "x"\n\u2028'},
    ]
    assert stream.count(b"event: content_block_delta\ndata: ") == 4
    assert events[6]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
    assert events[7]["delta"] == {"type": "input_json_delta", "partial_json": "{}"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"] == {"input_tokens": 10, "output_tokens": 5}
    # routerd's account of the reply rides along as an SSE comment, which SDKs skip.
    assert b": routerd provider=mock target=mock/m1 credential=main attempts=0" in stream


@pytest.mark.parametrize("include_usage", [False, True])
def test_deltas_become_openais_exact_chunks(include_usage: bool) -> None:
    encoder = openai_shape.ChunkEncoder("main", include_usage=include_usage)
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    text = 'say "hi"\n\u00e9\u2028\\ \U0001f600'
    pieces = [
        encoder.delta(Delta(text=text)),
        encoder.delta(Delta(text="x", model="gpt-4o-2024-08-06")),  # the upstream's model
        encoder.delta(Delta(tool_calls=[call])),
        encoder.delta(Delta(text="y", tool_calls=[call])),
    ]
    assert encoder.delta(Delta(finish_reason="stop")) == b""  # the finish goes in closing()
    assert all(p.startswith(b"data: ") and p.endswith(b"\n\n") for p in pieces)
    chunks = [json.loads(p[len(b"data: ") :]) for p in pieces]
    usage = {"usage": None} if include_usage else {}
    head = {"id": encoder.id, "object": "chat.completion.chunk", "created": encoder.created}
    deltas = [
        {"content": text},
        {"content": "x"},
        {"tool_calls": [call]},
        {"content": "y", "tool_calls": [call]},
    ]
    models = ["main", "gpt-4o-2024-08-06", "gpt-4o-2024-08-06", "gpt-4o-2024-08-06"]
    assert chunks == [
        {
            **head,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            **usage,
        }
        for model, delta in zip(models, deltas, strict=True)
    ]
    assert list(chunks[0]) == [*head, "model", "system_fingerprint", "choices", *usage]
    assert encoder.id.startswith("chatcmpl-")
