"""A mock LLM provider over real loopback HTTP, for end-to-end tests and ``routerd demo``."""

from __future__ import annotations

from routerd.mock.app import MockApp
from routerd.mock.process import MockProcess, MockStartError, start_mock_process
from routerd.mock.spec import KeySpec, MockSpec, ModelSpec, decode_spec
from routerd.mock.state import MockState

__all__ = [
    "KeySpec",
    "MockApp",
    "MockProcess",
    "MockSpec",
    "MockStartError",
    "MockState",
    "ModelSpec",
    "decode_spec",
    "start_mock_process",
]
