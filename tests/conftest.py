"""Shared fixtures. Area-specific helpers live in tests/helpers_<area>.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
