"""Shared fixtures. Area-specific helpers live in tests/helpers_<area>.py."""

from __future__ import annotations

import pytest

from tests.helpers_redis import redis_server  # noqa: F401 - one session-wide redis-server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
