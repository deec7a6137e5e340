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
