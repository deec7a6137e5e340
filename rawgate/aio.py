"""Which event loop is running: the one question the drivers ask before taking an asyncio-only
fast path.

Invariant: no third-party import. (sniffio used to answer this, but it is not a declared
dependency and anyio >= 4.16 no longer pulls it in: a fresh `pip install -e .` broke on it.)
Under anyio's asyncio backend (uvloop included) `asyncio.get_running_loop()` returns the loop;
under trio no asyncio loop runs and it raises.
"""

from __future__ import annotations

import asyncio


def running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None when the caller runs on another backend (trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def on_asyncio() -> bool:
    """True when the calling task runs on an asyncio (or uvloop) event loop."""
    return running_asyncio_loop() is not None
