"""Run a module's async tests on both event loops the daemon may use: import ``both_loops``.

from tests.loops import both_loops  # noqa: F401 - the module's anyio_backend
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(
    name="anyio_backend",
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ],
)
def both_loops(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """anyio's backend: asyncio with its own loop, then with uvloop."""
    backend: tuple[str, dict[str, Any]] = request.param
    return backend
