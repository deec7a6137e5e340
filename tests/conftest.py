"""Shared fixtures. Area-specific helpers live in tests/helpers_<area>.py."""

from __future__ import annotations

import pytest

from tests.helpers_redis import (  # noqa: F401 - session-wide servers
    redis_cluster,
    redis_server,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Test layout: tests/unit (no sockets: sans-IO cores in bytes, properties), tests/e2e (real
# loopback sockets on port 0, subprocesses, real SDKs and CLIs), tests/differential (rawgate's
# fast paths against the library or the recorded behaviour they replace). Modules that start
# real processes (rawgate serve, the CLIs, a Redis cluster) carry the `slow` marker, so a quick
# loop is `pytest -m "not slow"`; the README's command and CI run everything.
SLOW_MODULES = frozenset(
    {
        "test_codex_cli",
        "test_claude_code_cli",
        "test_gemini_cli",
        "test_serve_cli",
        "test_login",
        "test_seed_tutorial",
        "test_gateway_workers",
        "test_state",
        "test_fleet",
        "test_redis_outage",
        "test_keys",
        "test_emulator_cli",
        "test_bench",
        "test_dashboard_browser",
        "test_admin_serve",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.slow
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(slow)
