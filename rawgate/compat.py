"""Everything that reaches into h11's, h2's or hpack's private parts, and the one switch that turns
every fast path off.

Invariants:
- A fast path that touches a library's private attributes lives here (or calls in here) and is
  named for the attribute it touches; tests/test_compat_canary.py has a canary per attribute,
  and pyproject.toml bounds each library to the minor versions those canaries passed on.
- `fast_paths()` is read once per connection (or per parser), never per byte: with it off
  (`[server] fast_paths = false`, or RAWGATE_SERVER_FAST_PATHS=0 in the environment, which also
  sets the default for tests), every driver runs on the libraries' public APIs alone and the
  suites of the HTTP/1.1 and HTTP/2 servers, the HTTP/2 client and the SSE decoder pass both ways.

dispatch_frame: one received HTTP/2 frame through h2's dispatch, shared by h2_server and h2_client.
Invariant: the same effects, events and errors as h2's own `H2Connection._receive_frame`, minus
its first line, `logger.trace("...", repr(frame))`: the repr re-serialises the frame and is built
for every frame whatever the log level (~3 % of a server request, ~10 % of a streamed response
in the client). The two stream-error rules below are h2's own, unchanged: a frame on a stream we
reset is answered with RST_STREAM (and its events kept) instead of failing the connection.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from hyperframe.frame import RstStreamFrame

if TYPE_CHECKING:
    from h2.connection import H2Connection
    from h2.events import Event

__all__ = ["dispatch_frame", "fast_paths", "set_fast_paths"]

_OFF = ("0", "false", "no", "off")
_fast = os.environ.get("RAWGATE_SERVER_FAST_PATHS", "1").strip().lower() not in _OFF


def fast_paths() -> bool:
    """Whether rawgate's fast paths are on (see the module note)."""
    return _fast


def set_fast_paths(on: bool) -> None:
    """Set from `[server] fast_paths` at start-up (and by tests); connections opened after the
    call follow it."""
    global _fast
    _fast = on


def dispatch_frame(conn: H2Connection, frame: Any) -> list[Event]:
    """h2's per-frame step for `frame` on `conn` (see the module note)."""
    try:
        frames, events = conn._frame_dispatch_table[frame.__class__](frame)
    except StreamClosedError as e:
        if not conn._stream_is_closed_by_reset(e.stream_id):
            raise
        rst = RstStreamFrame(e.stream_id)
        rst.error_code = e.error_code
        conn._prepare_for_sending([rst])
        return list(e._events)
    except StreamIDTooLowError as e:
        if conn._stream_is_closed_by_reset(e.stream_id):
            rst = RstStreamFrame(e.stream_id)
            rst.error_code = ErrorCodes.STREAM_CLOSED
            conn._prepare_for_sending([rst])
            return []
        if conn._stream_is_closed_by_end(e.stream_id):
            raise StreamClosedError(e.stream_id) from e
        raise
    conn._prepare_for_sending(frames)
    return list(events)
