"""What front.py and request_cpu.py share: the replies of their minimal OpenAI-shaped
responders (a fixed completion, a stream of content chunks) and the config they give
routerd (one route to the responder, the msgpack socket, the HTTP front with a token)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def completion(model: str, created: int, usage: dict[str, int]) -> bytes:
    """A ``chat.completion`` answering "Paris.", as JSON."""
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Paris."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    ).encode()


def chunk_event(model: str, created: int, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    """One ``chat.completion.chunk`` as a server-sent event."""
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def content_events(model: str, created: int, count: int) -> list[bytes]:
    """``count`` content chunks ("w0 ", "w1 ", ...), the first with the role, the last with
    ``finish_reason`` "stop"."""
    return [
        chunk_event(
            model,
            created,
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": f"w{n} "}
                    if n == 0
                    else {"content": f"w{n} "},
                    "logprobs": None,
                    "finish_reason": "stop" if n == count - 1 else None,
                }
            ],
        )
        for n in range(count)
    ]


def one_route_toml(
    *,
    state_dir: Path,
    log_level: str,
    http_port: int,
    token_env: str,
    base_url: str,
    key_envs: dict[str, str],
    route: str,
    model: str,
) -> str:
    """The TOML: ``key_envs`` maps each credential's label to the variable holding its key."""
    credentials = ", ".join(
        f'{{ label = "{label}", key_env = "{env}" }}' for label, env in key_envs.items()
    )
    return f"""
[server]
state_file = "{state_dir / "state.msgpack"}"
log_level = "{log_level}"
http_listen = "127.0.0.1:{http_port}"
http_token_env = "{token_env}"

[providers.resp]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{credentials}]

[routes.{route}]
chain = ["resp/{model}"]
"""
