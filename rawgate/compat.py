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


# ---- h2 client ----
# What rawgate/upstream/ (h2_client's connection driver, h2_data's DATA fast path) touches of
# h2's and hpack's internals. The client builds its h2 state machine from one of two classes:
# H2ClientConnection (fast paths off: h2's public API, plus the draining GOAWAY, which is
# behaviour, not speed) or H2ClientFastConnection (fast paths on: also h2's dispatch without
# its per-frame repr). The functions below serve the fast path only; with fast paths off the
# client never calls them.

from h2.connection import ConnectionState, H2Connection as _H2Connection  # noqa: E402
from h2.errors import _error_code_from_int  # noqa: E402
from h2.events import ConnectionTerminated  # noqa: E402
from h2.stream import StreamState  # noqa: E402
from hpack.hpack import encode_integer  # noqa: E402

if TYPE_CHECKING:
    from hyperframe.frame import GoAwayFrame

__all__ += [
    "H2ClientConnection",
    "H2ClientFastConnection",
    "h2_connection_window",
    "h2_data_ready",
    "h2_error_code",
    "h2_has_output",
    "h2_take_data",
    "hpack_table_size_update",
]

_DATA_OK = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)  # where DATA may arrive
_CLIENT_OPEN = ConnectionState.CLIENT_OPEN


class H2ClientConnection(_H2Connection):
    """h2 as the upstream client runs it with fast paths off: a draining GOAWAY, else h2."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Event]]:
        # h2 moves the connection to CLOSED here and clears our output, after which every
        # DATA frame of the streams the server still finishes is a ProtocolError. Report the
        # GOAWAY and keep the connection open; rawgate opens no new stream on it.
        ev = ConnectionTerminated()
        ev.error_code = _error_code_from_int(frame.error_code)
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]


class H2ClientFastConnection(H2ClientConnection):
    """With fast paths on: h2's per-frame step without its repr (dispatch_frame)."""

    def _receive_frame(self, frame: Any) -> list[Event]:
        return dispatch_frame(self, frame)


def h2_error_code(code: int) -> ErrorCodes | int:
    """An RST_STREAM / GOAWAY code as h2 reports it: the ErrorCodes member, or the int."""
    return _error_code_from_int(code)


def hpack_table_size_update(size: int) -> bytes:
    """RFC 7541 6.3: the dynamic table size update announcing `size`."""
    b = encode_integer(size, 5)
    b[0] |= 0x20
    return bytes(b)


def h2_has_output(conn: H2Connection) -> bool:
    """Whether data_to_send() would return bytes, without taking them."""
    return bool(conn._data_to_send)


def h2_data_ready(conn: H2Connection) -> bool:
    """The DATA fast path may run: h2 holds no partial frame and no header block waiting for
    CONTINUATION, and the connection is open."""
    fb = conn.incoming_buffer
    return not (fb._data or fb._headers_buffer) and conn.state_machine.state is _CLIENT_OPEN


def h2_connection_window(conn: H2Connection) -> Any:
    """The connection's inbound window manager (current_window_size shrinks in place)."""
    return conn._inbound_flow_control_window_manager


def h2_take_data(conn_window: Any, stream: Any, length: int) -> bool:
    """Account a complete, unpadded DATA frame without END_STREAM of `length` bytes on `stream`
    (an h2.stream.H2Stream, a private class) as h2 would, when that is all h2 would do: the
    stream is OPEN / HALF_CLOSED_LOCAL with its head received and no Content-Length to check,
    and both windows hold the frame. Then both windows shrink and True is returned; else
    nothing changed (h2 takes the frame)."""
    sm = stream.state_machine
    if sm.state in _DATA_OK and sm.headers_received and stream._expected_content_length is None:
        win = stream._inbound_window_manager
        if length <= win.current_window_size and length <= conn_window.current_window_size:
            conn_window.current_window_size -= length
            win.current_window_size -= length
            return True
    return False
