"""One received HTTP/2 frame through h2's dispatch, shared by h2_server and h2_client.

Invariant: the same effects, events and errors as h2's own `H2Connection._receive_frame`, minus
its first line, `logger.trace("...", repr(frame))`: the repr re-serialises the frame and is built
for every frame whatever the log level (~3 % of a server request, ~10 % of a streamed response
in the client). The two stream-error rules below are h2's own, unchanged: a frame on a stream we
reset is answered with RST_STREAM (and its events kept) instead of failing the connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from hyperframe.frame import RstStreamFrame

if TYPE_CHECKING:
    from h2.connection import H2Connection
    from h2.events import Event

__all__ = ["dispatch_frame"]


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
