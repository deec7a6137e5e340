"""Everything that reaches into h11's, h2's or hpack's private parts, and the one switch that turns
every fast path off.

Invariants:
- A fast path that touches a library's private attributes lives here (or calls in here) and is
  named for the attribute it touches; tests/differential/test_compat_canary.py has a canary
  per attribute, and pyproject.toml bounds each library to the minor versions those canaries
  passed on.
- `fast_paths()` is read once per connection (or per parser), never per byte: with it off
  (`[server] fast_paths = false`, or RAWGATE_SERVER_FAST_PATHS=0 in the environment, which also
  sets the default for tests), every driver runs on the libraries' public APIs alone and the
  suites of the HTTP/1.1 and HTTP/2 servers, the HTTP/2 client and the SSE decoder pass both ways.

Sections: dispatch_frame (shared), `# ---- h11 (inbound) ----` (h1_server's reads of h11's receive
buffer and header triples), `# ---- h2 server ----` (h2_server's frame hook, connection-window
hand-back, local SETTINGS swap, hpack's static table).

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

import h11
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from h2.settings import SettingCodes, Settings
from hpack.table import HeaderTable
from hyperframe.frame import Frame, RstStreamFrame, WindowUpdateFrame

if TYPE_CHECKING:
    from h2.events import Event

__all__ = [
    "HPACK_STATIC_TABLE",
    "FrameHookH2",
    "acknowledge_connection_data",
    "dispatch_frame",
    "fast_paths",
    "h11_drop_unparsed",
    "h11_header_items",
    "h11_next_cycle",
    "h11_take",
    "h11_unparsed",
    "replace_local_settings",
    "set_fast_paths",
]

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


# ---- h11 (inbound) ----
# h1_server's fast paths. Each reads or replaces h11's receive buffer (h11.Connection.
# _receive_buffer, a ReceiveBuffer around the bytearray `_data`) or its header triples
# (Headers._full_items). With fast_paths() off, h1_server calls none of them.


def h11_unparsed(h: h11.Connection) -> bytearray:
    """The bytes h11 holds but has not parsed yet (the buffer itself, not a copy: read it, do not
    keep it). Its length before and after a head is the exact head size (h11's own check misses
    complete heads, h11#182)."""
    return h._receive_buffer._data


def h11_take(h: h11.Connection, n: int) -> bytearray | None:
    """Up to `n` unparsed bytes taken off the front of h11's buffer (None when it is empty): a
    Content-Length body or a fast-parsed head consumed without h11's Data/EndOfMessage rounds."""
    return h._receive_buffer.maybe_extract_at_most(n)


def h11_next_cycle(h: h11.Connection, max_incomplete: int) -> h11.Connection:
    """A fresh server Connection that takes over `h`'s unparsed bytes: pipelined bytes are moved,
    not copied (trailing_data would copy them once per request: O(n^2) for n pipelined)."""
    nxt = h11.Connection(h11.SERVER, max_incomplete_event_size=max_incomplete)
    nxt._receive_buffer = h._receive_buffer
    return nxt


def h11_drop_unparsed(h: h11.Connection) -> None:
    """Free h11's unparsed bytes now (the connection is over)."""
    h._receive_buffer._data.clear()


def h11_header_items(ev: h11.Request) -> list[tuple[bytes, bytes, bytes]]:
    """h11's (raw name, lower-case name, value) triples of a request's headers: reading them
    skips a Python-level __getitem__ per header."""
    return ev.headers._full_items


# ---- h2 server ----
# h2_server's touches: the per-frame hook its flood guard counts in (h2's _receive_frame), the
# connection window handed back for dropped DATA (h2's window manager and _prepare_for_sending),
# the local SETTINGS replaced after initiate_connection, and hpack's static table.

# RFC 7541's static table as (name, value) bytes pairs (index - 1), from hpack's internal module.
HPACK_STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)


class FrameHookH2(H2Connection):
    """H2Connection whose per-frame step first calls `on_frame(frame)` (a subclass raises there to
    stop the batch: h2 parses no further frame of it). With `fast_dispatch` (set from
    fast_paths() by the creator, once per connection) the frame then goes through dispatch_frame
    (h2's step minus its per-frame repr); without, through h2's own _receive_frame."""

    fast_dispatch = True

    def on_frame(self, frame: Frame) -> None:
        """Called once per received frame, before h2 acts on it."""

    def _receive_frame(self, frame: Frame) -> list[Event]:
        self.on_frame(frame)
        if self.fast_dispatch:
            return dispatch_frame(self, frame)
        return super()._receive_frame(frame)


def acknowledge_connection_data(conn: H2Connection, n: int) -> None:
    """Hand `n` dropped bytes back to the connection window only (h2's window manager), as h2
    itself does for DATA on a closed stream. No public call does this: acknowledge_received_data
    also reopens the stream's window."""
    inc = conn._inbound_flow_control_window_manager.process_bytes(n)
    if inc:
        f = WindowUpdateFrame(0)
        f.window_increment = inc
        conn._prepare_for_sending([f])


def replace_local_settings(conn: H2Connection, values: dict[SettingCodes | int, int]) -> None:
    """Replace the local SETTINGS h2 enforces without sending a SETTINGS frame: after
    initiate_connection the peer was told the first values, h2 enforces these."""
    conn.local_settings = Settings(client=False, initial_values=values)  # type: ignore[arg-type]


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
    stream is OPEN / HALF_CLOSED_LOCAL with its head received, the frame keeps the body within
    its Content-Length (if any), and both windows hold the frame. Then both windows shrink, the
    body count grows, and True is returned; else nothing changed (h2 takes the frame, and
    raises what it raises).

    A Content-Length answer takes the fast path too (a bound check and a sum, as h2's
    _track_content_length): the emulator sends one on every non-stream answer, and a 6.5 MB
    batchEmbedContents came as ~400 16 KiB frames through h2's full step (~10 us each).
    bench.micro h2_client_large_body: 4.5 -> 1.3 ms to take that answer in 64 KiB reads."""
    sm = stream.state_machine
    if sm.state in _DATA_OK and sm.headers_received:
        win = stream._inbound_window_manager
        if length <= win.current_window_size and length <= conn_window.current_window_size:
            got = stream._actual_content_length + length
            expected = stream._expected_content_length
            if expected is not None and got > expected:
                return False
            conn_window.current_window_size -= length
            win.current_window_size -= length
            stream._actual_content_length = got
            return True
    return False
