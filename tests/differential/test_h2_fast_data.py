"""The h2 client's DATA fast path (`h2_data.FastH2.receive_data`) against plain h2: for any
server traffic, legal or not, cut into any reads, both give the same events, windows, output and
errors. Both clients come from the production constructor (`h2_client.new_h2`), fast or not."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from hyperframe.frame import DataFrame, PingFrame, RstStreamFrame, WindowUpdateFrame
from hypothesis import given, settings, strategies as st

from rawgate.compat import H2ClientConnection
from rawgate.config import UpstreamConfig
from rawgate.upstream.h2_client import new_h2
from rawgate.upstream.h2_data import Data as _Data, FastH2

CLIENT_WINDOW = 4096  # small, so that flow-control violations are easy to produce
CFG = UpstreamConfig(h2_stream_window_bytes=CLIENT_WINDOW)


def _client(fast: bool) -> H2ClientConnection:
    """rawgate's own client connection (new_h2: its settings, encoder and validation), with or
    without the fast path, whatever compat.fast_paths() says."""
    c = new_h2(CFG, 100, fast)
    assert isinstance(c, FastH2) is fast
    c.initiate_connection()
    return c


def _server() -> h2.connection.H2Connection:
    s = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    s.initiate_connection()
    return s


def _norm(events: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for ev in events:
        if type(ev) is _Data or isinstance(ev, h2.events.DataReceived):
            ended = getattr(ev, "stream_ended", None) is not None
            out.append(("data", ev.stream_id, bytes(ev.data), ev.flow_controlled_length, ended))
        else:
            out.append((type(ev).__name__, getattr(ev, "stream_id", None)))
    return out


# One server action: (kind, stream index, size, flag)
ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["head", "head_cl", "data", "data", "data", "end", "pad", "rst", "ping",
                         "wu", "raw_data", "raw_unknown", "raw_big"]),
        st.integers(min_value=0, max_value=2),
        st.integers(min_value=0, max_value=1500),
        st.booleans(),
    ),
    max_size=30,
)


def _traffic(actions: list[tuple[str, int, int, bool]]) -> tuple[bytes, bytes]:
    """(client preface + requests, server bytes): three requests, then the server's actions."""
    c = _client(False)
    srv = _server()
    for i in range(3):
        c.send_headers(1 + 2 * i, [(b":method", b"GET"), (b":scheme", b"http"),
                                   (b":authority", b"x"), (b":path", b"/")], end_stream=True)
    client_out = c.data_to_send()
    srv.receive_data(client_out)
    out = bytearray(srv.data_to_send())
    headed: set[int] = set()
    for kind, i, size, flag in actions:
        sid = 1 + 2 * i
        payload = bytes([65 + i]) * size
        try:
            if kind == "head":
                srv.send_headers(sid, [(b":status", b"200")], end_stream=flag and sid in headed)
                headed.add(sid)
            elif kind == "head_cl":  # a Content-Length the body may meet, exceed or miss
                cl = str(size).encode()
                srv.send_headers(sid, [(b":status", b"200"), (b"content-length", cl)])
                headed.add(sid)
            elif kind in ("data", "end", "pad"):
                n = min(size, srv.local_flow_control_window(sid), srv.max_outbound_frame_size)
                srv.send_data(sid, payload[:n], end_stream=kind == "end",
                              pad_length=7 if kind == "pad" else None)
            elif kind == "rst":
                srv.reset_stream(sid)
            elif kind == "ping":
                srv.ping(b"12345678")
            elif kind == "wu":
                srv.increment_flow_control_window(size + 1)
            out += srv.data_to_send()
        except h2.exceptions.ProtocolError:
            continue  # not legal for the server now: skip
        if kind == "raw_data":  # DATA whatever the state (maybe before the head / after end)
            out += DataFrame(sid, data=payload, flags=["END_STREAM"] if flag else []).serialize()
        elif kind == "raw_unknown":
            out += DataFrame(99, data=payload).serialize()
        elif kind == "raw_big":  # past the client's window
            out += DataFrame(sid, data=b"z" * (CLIENT_WINDOW + 1)).serialize()
        elif kind == "ping" and flag:
            out += PingFrame(0, opaque_data=b"abcdefgh").serialize()
        elif kind == "rst" and flag:
            out += RstStreamFrame(sid).serialize()
        elif kind == "wu" and flag:
            out += WindowUpdateFrame(sid, window_increment=size + 1).serialize()
    return client_out, bytes(out)


def _run(fast: bool, server_bytes: bytes, cuts: list[int]) -> list[Any]:
    c = _client(fast)
    for i in range(3):
        c.send_headers(1 + 2 * i, [(b":method", b"GET"), (b":scheme", b"http"),
                                   (b":authority", b"x"), (b":path", b"/")], end_stream=True)
    c.data_to_send()
    points = sorted({x % (len(server_bytes) + 1) for x in cuts})
    log: list[Any] = []
    last = 0
    for p in [*points, len(server_bytes)]:
        piece = server_bytes[last:p]
        last = p
        if not piece:
            continue
        try:
            log.append(_norm(c.receive_data(piece)))
        except h2.exceptions.ProtocolError as e:
            log.append(("error", type(e).__name__))
            break
        finally:
            log.append(c.data_to_send())
            log.append(c._inbound_flow_control_window_manager.current_window_size)
            log.append(sorted(
                (sid, s.state_machine.state, s._inbound_window_manager.current_window_size,
                 s._actual_content_length)
                for sid, s in c.streams.items()
            ))
    return log


@settings(max_examples=300, deadline=None)
@given(ACTIONS, st.lists(st.integers(min_value=0, max_value=100_000), max_size=6))
def test_fast_path_is_plain_h2(actions: list[tuple[str, int, int, bool]], cuts: list[int]) -> None:
    _, server_bytes = _traffic(actions)
    assert _run(True, server_bytes, cuts) == _run(False, server_bytes, cuts)


def test_plain_data_frames_take_the_fast_path() -> None:
    _, wire = _traffic([("head", 0, 0, False), ("data", 0, 100, False), ("data", 0, 50, False)])
    c = _client(True)
    assert isinstance(c, FastH2)  # (_client checked it) its receive_data mixes in Data
    c.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"),
                       (b":path", b"/")], end_stream=True)
    for i in (1, 2):
        c.send_headers(1 + 2 * i, [(b":method", b"GET"), (b":scheme", b"http"),
                                   (b":authority", b"x"), (b":path", b"/")], end_stream=True)
    events = c.receive_data(wire)
    kinds = [type(e).__name__ for e in events]
    assert kinds[-2:] == ["Data", "Data"]  # not h2's DataReceived: the fast path took them
    assert [bytes(e.data) for e in events[-2:]] == [b"A" * 100, b"A" * 50]
    assert c.streams[1]._inbound_window_manager.current_window_size == CLIENT_WINDOW - 150


def test_a_content_length_body_takes_the_fast_path_and_h2_judges_its_end() -> None:
    """Frames within the Content-Length are taken here (counted as h2 counts them); the frame
    that would pass it, and the END_STREAM that leaves it short, are h2's errors, as plain."""
    sizes = [("head_cl", 0, 250, False), ("data", 0, 100, False), ("data", 0, 100, False)]
    _, wire = _traffic(sizes)
    c = _client(True)
    for i in range(3):
        c.send_headers(1 + 2 * i, [(b":method", b"GET"), (b":scheme", b"http"),
                                   (b":authority", b"x"), (b":path", b"/")], end_stream=True)
    events = c.receive_data(wire)
    assert [type(e).__name__ for e in events][-2:] == ["Data", "Data"]  # taken here
    assert c.streams[1]._actual_content_length == 200
    for tail in ([("data", 0, 100, False)], [("end", 0, 10, False)], [("end", 0, 50, False)]):
        _, wire = _traffic(sizes + tail)
        assert _run(True, wire, []) == _run(False, wire, [])
    _, over = _traffic([*sizes, ("data", 0, 100, False)])
    assert ("error", "InvalidBodyLengthError") in _run(True, over, [])
    _, short = _traffic([*sizes, ("end", 0, 10, False)])
    assert ("error", "InvalidBodyLengthError") in _run(True, short, [])


@pytest.mark.parametrize("kind", ["raw_big", "raw_data"])
def test_protocol_errors_stay_h2s(kind: str) -> None:
    _, wire = _traffic([("head", 0, 0, False), ("data", 0, 10, False), (kind, 1, 10, False)])
    assert _run(True, wire, []) == _run(False, wire, [])


def test_a_frame_cut_by_the_read_keeps_the_fast_path() -> None:
    _, wire = _traffic([("head", 0, 0, False)] + [("data", 0, 100, False)] * 4)
    c = _client(True)
    assert isinstance(c, FastH2)  # (_client checked it) its receive_data mixes in Data
    for i in range(3):
        c.send_headers(1 + 2 * i, [(b":method", b"GET"), (b":scheme", b"http"),
                                   (b":authority", b"x"), (b":path", b"/")], end_stream=True)
    cut = len(wire) - 2 * 109 + 50  # inside the third DATA frame (9 + 100 bytes each)
    first = c.receive_data(wire[:cut])
    assert c.incoming_buffer._data == b""  # h2 holds nothing: the cut frame waits in FastH2
    rest = c.receive_data(wire[cut:])
    got = [e for e in first + rest if type(e) is _Data]
    assert [len(e.data) for e in got] == [100] * 4
    assert [type(e) for e in rest] == [_Data, _Data]
