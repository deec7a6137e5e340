"""Canaries for the h11 / h2 / hpack / hyperframe internals rawgate's fast paths rely on.

rawgate reads private attributes of its protocol libraries, overrides private hooks and copies
one private method (each is a measured fast path: see the rawgate module named by each canary),
and pyproject.toml bounds the libraries to the minor versions this was tested on. Each canary
below names one internal, the rawgate module(s) relying on it and what they assume, and checks
the assumption on the installed version: the attribute exists with the expected kind and, where
it is cheap, behaves as the fast path expects. A failing canary says what moved, the installed
version, who relies on it, and what to do (pin the library below that version or update the
module).

Invariants kept by this file:
- test_every_private_touch_has_a_canary: an AST scan of rawgate/ finds every private attribute
  touched in the modules importing these libraries (on any object, and through `self` in
  subclasses of library classes, also through a class of the same module in between), every
  override of a library's private method and every import from a library's internal module;
  each must be listed in some canary's `touches`.
- test_no_canary_lists_a_touch_that_is_gone: the converse, so the list stays true.
- Public API used in a way only the library's internals guarantee (h11's header checks, h2's
  encoder protocol, hyperframe type numbers) has canaries too, with no `touches`.
- The scan is syntactic: it does not see `getattr(x, "_name")`, nor public-named methods of
  private classes (ReceiveBuffer.maybe_extract_at_most has a canary all the same).
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import re
import textwrap
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import import_module, metadata, util as import_util
from pathlib import Path
from typing import Any

import h11
import pytest
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event, RequestReceived, ResponseReceived
from h2.exceptions import (
    DenialOfServiceError,
    ProtocolError,
    StreamClosedError,
    TooManyStreamsError,
)
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    FRAMES,
    AltSvcFrame,
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from rawgate.compat import H2ClientConnection, dispatch_frame
from rawgate.config import LimitsConfig, UpstreamConfig
from rawgate.http.h2_server import _CALM, _connection_error_code, _new_h2
from rawgate.upstream.h2_client import new_h2

ROOT = Path(__file__).resolve().parents[2]
RAWGATE = ROOT / "rawgate"
LIBS = ("h11", "h2", "hpack", "hyperframe")


# ---- the canary machinery ---------------------------------------------------------------------


class Moved(AssertionError):
    """The library no longer does what the rawgate module assumes."""


def expect(cond: object, what: str) -> None:
    if not cond:
        raise Moved(what)


@dataclass(frozen=True)
class Canary:
    id: str  # the library internal, as the library spells it
    lib: str  # its distribution (what pyproject.toml bounds)
    users: tuple[str, ...]  # the rawgate modules relying on it ("http/h1_server")
    touches: tuple[str, ...]  # what the scan finds in those modules (see scan_private_touches)
    assumes: str  # what the users assume, in one line
    check: Callable[[], None]  # raises when the assumption no longer holds


def installed(lib: str) -> str:
    return metadata.version(lib)


def failure_message(c: Canary, problem: str) -> str:
    version = installed(c.lib)
    mods = " and ".join(f"rawgate/{m}.py" for m in c.users)
    return (
        f"{c.id} moved: {problem}\n"
        f"  installed: {c.lib} {version}\n"
        f"  relied on by: {mods} ({c.assumes})\n"
        f"  what to do: pin {c.lib} below {version} in pyproject.toml (\"{c.lib}<{version}\") "
        f"or update {mods} for {c.lib} {version} (if {version} is older than the versions "
        f"rawgate was tested on, raise the lower bound above it instead)"
    )


def run_canary(c: Canary) -> str | None:
    """None when the canary holds, else the message naming what to do."""
    try:
        c.check()
    except Exception as e:
        return failure_message(c, f"{type(e).__name__}: {e}")
    return None


# ---- h11 ----------------------------------------------------------------------------------------

# A head fast_head takes (http/h1_parse): its bytes are consumed with maybe_extract_at_most.
LONG_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"User-Agent: " + b"a" * 150 + b"\r\nContent-Length: 5\r\n\r\n"
)
SHORT_HEAD = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"


def _h11_server(data: bytes = b"") -> h11.Connection:
    h = h11.Connection(h11.SERVER)
    if data:
        h.receive_data(data)
    return h


def check_h11_receive_buffer() -> None:
    h = _h11_server(b"GET / HTTP/1.1\r\nHo")
    buf = h._receive_buffer
    expect(len(buf) == 18 and bytes(buf) == b"GET / HTTP/1.1\r\nHo",
           "len()/bytes() of the buffer are not the unparsed bytes fed to the connection")
    h.receive_data(b"st: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    before = len(h._receive_buffer)
    ev = h.next_event()
    expect(type(ev) is h11.Request, f"expected the first Request, got {ev!r}")
    expect(before - len(h._receive_buffer) == len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
           "the buffer's length before and after a head is not the head's size")
    expect(type(h.next_event()) is h11.EndOfMessage, "no EndOfMessage after a body-less request")
    # h1_server._end_body: the next cycle's fresh Connection takes the buffer over.
    nxt = h11.Connection(h11.SERVER)
    nxt._receive_buffer = h._receive_buffer
    ev = nxt.next_event()
    expect(type(ev) is h11.Request and ev.target == b"/2",
           f"a fresh Connection given the old buffer did not parse the pipelined request: {ev!r}")


def check_h11_receive_buffer_data() -> None:
    part = LONG_HEAD[:-9]
    h = _h11_server(part)
    expect(h.next_event() is h11.NEED_DATA, "a partial head did not need data")
    data = h._receive_buffer._data
    expect(type(data) is bytearray, f"_data is {type(data).__name__}, not bytearray")
    expect(data == part, "_data does not hold exactly the unparsed bytes after a partial head")
    h.receive_data(LONG_HEAD[-9:] + b"hello" + SHORT_HEAD)
    expect(type(h.next_event()) is h11.Request, "the completed head did not parse")
    expect(h._receive_buffer._data == b"hello" + SHORT_HEAD,
           "_data does not hold exactly the bytes after the parsed head")


def check_h11_maybe_extract_at_most() -> None:
    h = _h11_server(b"abcdef")
    buf = h._receive_buffer
    expect(callable(getattr(buf, "maybe_extract_at_most", None)), "not a method of the buffer")
    # (object: mypy's strict equality calls bytearray == bytes non-overlapping; it compares bytes)
    first: object = buf.maybe_extract_at_most(4)
    left: object = buf._data
    expect(first == b"abcd" and left == b"ef", "did not take the first n bytes out")
    rest: object = buf.maybe_extract_at_most(10)
    expect(rest == b"ef", "did not return what is left")
    expect(buf.maybe_extract_at_most(3) is None, "an empty buffer did not give None")
    # h1_server's fast head (taken with compat.h11_take): h11 looked at a partial head (and
    # remembered where its search ended), then the head completed and the fast path took it out.
    # h11 must search the next head afresh.
    h = _h11_server(LONG_HEAD[:-2])
    expect(h.next_event() is h11.NEED_DATA, "a partial head did not need data")
    h.receive_data(LONG_HEAD[-2:] + b"hello" + SHORT_HEAD)
    buf = h._receive_buffer
    buf.maybe_extract_at_most(len(LONG_HEAD) + 5)  # the head and its body
    ev = h.next_event()
    expect(type(ev) is h11.Request and ev.target == b"/b",
           f"after taking bytes out, h11 did not find the next (shorter) head: {ev!r}")


def check_h11_full_items() -> None:
    h = _h11_server(b"GET / HTTP/1.1\r\nHost: x\r\nX-Thing:  A b \r\n\r\n")
    ev = h.next_event()
    assert isinstance(ev, h11.Request)
    items = ev.headers._full_items
    expect(isinstance(items, list), f"_full_items is {type(items).__name__}, not a list")
    expect(items == [(b"Host", b"host", b"x"), (b"X-Thing", b"x-thing", b"A b")],
           f"_full_items is not [(raw name, lower-case name, value)]: {items!r}")


def check_h11_content_length() -> None:
    h = _h11_server(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
    ev = h.next_event()
    assert isinstance(ev, h11.Request)
    cl = [v for _, n, v in ev.headers._full_items if n == b"content-length"]
    expect(cl == [b"3"], f"identical Content-Lengths were not merged into one: {cl!r}")
    for bad in (b"3, 4", b"x", b"-1"):
        h = _h11_server(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + bad + b"\r\n\r\n")
        try:
            h.next_event()
        except h11.RemoteProtocolError:
            continue
        raise Moved(f"Content-Length {bad!r} was accepted")


def check_h11_transfer_encoding() -> None:
    h = _h11_server(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
    try:
        h.next_event()
    except h11.RemoteProtocolError as e:
        expect(e.error_status_hint == 501, f"error_status_hint {e.error_status_hint}, not 501")
        return
    raise Moved("Transfer-Encoding: gzip was accepted (rawgate only frames chunked)")


def check_h11_incomplete_head_limit() -> None:
    h = h11.Connection(h11.SERVER, max_incomplete_event_size=100)
    h.receive_data(b"GET /" + b"a" * 200)
    try:
        h.next_event()
    except h11.RemoteProtocolError as e:
        expect(e.error_status_hint == 431, f"error_status_hint {e.error_status_hint}, not 431")
        expect(b"\n" not in bytes(h._receive_buffer), "the buffer is not the unfinished line")
        return
    raise Moved("an incomplete head over max_incomplete_event_size was not refused")


def check_h11_trailing_data() -> None:
    h = h11.Connection(h11.CLIENT)
    h.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
    h.send(h11.EndOfMessage())
    h.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123")
    ev = h.next_event()
    expect(type(ev) is h11.Response, f"expected a Response, got {ev!r}")
    expect(h.trailing_data == (b"0123", False),
           f"trailing_data after the head is not the body bytes that came with it: "
           f"{h.trailing_data!r}")


# ---- h2: helpers -------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]
RESPONSE = [(b":status", b"200")]


def _block(fields: list[tuple[bytes, bytes]]) -> bytes:
    # A fresh encoder per block refers to no dynamic-table entry of an earlier block, so any
    # block can be fed to any connection in any order.
    return bytes(Encoder().encode(fields))


def _headers(sid: int, fields: list[tuple[bytes, bytes]] = REQUEST, *, end: bool = True,
             end_headers: bool = True) -> bytes:
    flags = (["END_HEADERS"] if end_headers else []) + (["END_STREAM"] if end else [])
    return HeadersFrame(sid, data=_block(fields), flags=flags).serialize()


def _frames(data: bytes) -> list[Frame]:
    out: list[Frame] = []
    pos = 0
    while pos < len(data):
        f, n = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        f.parse_body(memoryview(data[pos + 9 : pos + 9 + n]))
        out.append(f)
        pos += 9 + n
    return out


def _server(cls: type[H2Connection] = H2Connection) -> H2Connection:
    c = cls(H2Configuration(client_side=False, header_encoding=None))
    c.initiate_connection()
    c.receive_data(PREFACE + SettingsFrame(0).serialize())
    c.clear_outbound_data_buffer()
    return c


def _client(fast: bool = False) -> H2ClientConnection:
    """An upstream connection exactly as rawgate configures it (h2_client.new_h2); by default
    without the DATA fast path, so that h2 itself is what the checks see."""
    c = new_h2(UpstreamConfig(), 100, fast)
    c.initiate_connection()
    c.receive_data(SettingsFrame(0).serialize())
    c.clear_outbound_data_buffer()
    return c


# ---- h2: h2_frames' copy of _receive_frame -----------------------------------------------------


def check_dispatch_table() -> None:
    c = H2Connection(H2Configuration(client_side=False))
    table = c._frame_dispatch_table
    expect(isinstance(table, dict), f"_frame_dispatch_table is {type(table).__name__}")
    wanted = {*FRAMES.values(), ExtensionFrame}  # every class hyperframe parses a frame into
    missing = sorted(k.__name__ for k in wanted - table.keys())
    expect(not missing, f"no handler for {missing} (dispatch_frame looks up frame.__class__)")
    unbound = sorted(k.__name__ for k, v in table.items() if getattr(v, "__self__", None) is not c)
    expect(not unbound, f"handlers not bound to the connection: {unbound}")
    frame, _ = Frame.parse_frame_header(memoryview(b"\x00\x00\x00\xfa\x00\x00\x00\x00\x00"))
    expect(type(frame) in table, f"an unknown frame type parses to {type(frame).__name__}, "
           "which has no handler")


def check_prepare_for_sending() -> None:
    c = _server()
    ping = PingFrame(0, opaque_data=b"12345678")
    c._prepare_for_sending([ping])
    expect(c.data_to_send() == ping.serialize(), "frames handed over are not what is sent next")
    c._prepare_for_sending([])
    expect(c.data_to_send() == b"", "an empty list queued output")


def _closed_streams() -> H2Connection:
    """Stream 1 reset by us, stream 3 ended both ways, stream 5 open."""
    c = _server()
    c.receive_data(_headers(1, end=False) + _headers(3) + _headers(5, end=False))
    c.reset_stream(1)
    c.send_headers(3, RESPONSE, end_stream=True)
    return c


def check_closed_by_reset() -> None:
    c = _closed_streams()
    f = c._stream_is_closed_by_reset
    expect((f(1), f(3), f(5)) == (True, False, False),
           f"closed-by-reset of streams 1/3/5 is {(f(1), f(3), f(5))}, not (True, False, False)")
    c.open_inbound_streams  # h2 forgets closed streams here  # noqa: B018
    expect(1 not in c.streams and f(1) and not f(3), "wrong once the streams are forgotten")


def check_closed_by_end() -> None:
    c = _closed_streams()
    f = c._stream_is_closed_by_end
    expect((f(1), f(3), f(5)) == (False, True, False),
           f"closed-by-end of streams 1/3/5 is {(f(1), f(3), f(5))}, not (False, True, False)")
    c.open_inbound_streams  # noqa: B018
    expect(3 not in c.streams and f(3) and not f(1), "wrong once the streams are forgotten")


def check_stream_closed_events() -> None:
    e = StreamClosedError(7)
    expect(isinstance(e._events, list) and not e._events, "_events is not an empty list")
    expect(e.stream_id == 7 and e.error_code == ErrorCodes.STREAM_CLOSED,
           "stream_id / error_code are not set by the constructor")


def _names(fn: ast.AST, base: str) -> tuple[frozenset[str], ...]:
    """What a _receive_frame body touches: attributes of `base` (the connection), exceptions
    caught, attributes of the caught exceptions, names called, ErrorCodes members."""
    caught: set[str] = set()
    exc_names: set[str] = set()
    for n in ast.walk(fn):
        if isinstance(n, ast.ExceptHandler) and n.type is not None:
            caught.add(ast.unparse(n.type))
            if n.name:
                exc_names.add(n.name)
    conn, exc, calls, codes = set(), set(), set(), set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            if n.value.id == base:
                conn.add(n.attr)
            elif n.value.id in exc_names:
                exc.add(n.attr)
            elif n.value.id == "ErrorCodes":
                codes.add(n.attr)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            if not hasattr(builtins, n.func.id):
                calls.add(n.func.id)
    return frozenset(conn), frozenset(caught), frozenset(exc), frozenset(calls), frozenset(codes)


def check_receive_frame_source() -> None:
    tree = ast.parse(textwrap.dedent(inspect.getsource(H2Connection._receive_frame)))
    fn = tree.body[0]
    assert isinstance(fn, ast.FunctionDef)
    # The one line dispatch_frame leaves out on purpose (h2_frames' module note).
    fn.body = [s for s in fn.body if "logger" not in ast.unparse(s)]
    theirs = _names(fn, "self")
    mine_tree = ast.parse(inspect.getsource(dispatch_frame))
    mine = _names(mine_tree.body[0], "conn")
    labels = ("connection attributes", "exceptions caught", "exception attributes",
              "calls", "ErrorCodes")
    diffs = [f"{label}: h2 {sorted(a)} vs dispatch_frame {sorted(b)}"
             for label, a, b in zip(labels, theirs, mine, strict=True) if a != b]
    expect(not diffs, "h2's _receive_frame no longer matches its copy: " + "; ".join(diffs))


class _Witness(H2Connection):
    """Plain h2, recording which exception each frame handler raised (the branch taken)."""

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.raised: list[str] = []
        for cls, handler in list(self._frame_dispatch_table.items()):
            self._frame_dispatch_table[cls] = self._recording(handler)

    def _recording(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def run(frame: Any) -> Any:
            try:
                return handler(frame)
            except Exception as e:
                self.raised.append(type(e).__name__)
                raise
        return run


class _Copy(_Witness):
    """The same, with rawgate's copy of h2's _receive_frame."""

    def _receive_frame(self, frame: Any) -> list[Event]:
        return dispatch_frame(self, frame)


def _reset1(c: H2Connection) -> None:
    c.reset_stream(1)


def _end1(c: H2Connection) -> None:
    c.send_headers(1, RESPONSE, end_stream=True)


def _forget(c: H2Connection) -> None:
    c.open_inbound_streams  # noqa: B018


_TRAILERS = HeadersFrame(1, data=_block([(b"x-t", b"1")]), flags=["END_HEADERS", "END_STREAM"])
# name -> (steps: bytes fed or an action, the branch h2 must take on the last frame)
DISPATCH_CASES: dict[str, tuple[list[Any], str | None]] = {
    "frames on open streams": (
        [_headers(1, end=False), DataFrame(1, data=b"abc", flags=["END_STREAM"]).serialize()
         + PingFrame(0).serialize() + WindowUpdateFrame(0, window_increment=9).serialize()],
        None,
    ),
    "closed by reset, known": ([_headers(1, end=False), _reset1, _TRAILERS.serialize()],
                               "StreamClosedError"),
    "closed by end, known": ([_headers(1), _end1, _TRAILERS.serialize()], "StreamClosedError"),
    "closed by reset, forgotten": (
        [_headers(1, end=False), _reset1, _headers(3), _forget, _TRAILERS.serialize()],
        "StreamIDTooLowError",
    ),
    "closed by end, forgotten": (
        [_headers(1), _end1, _headers(3), _forget, _TRAILERS.serialize()], "StreamIDTooLowError"
    ),
    "never opened, below the highest": ([_headers(3), _TRAILERS.serialize()],
                                        "StreamIDTooLowError"),
}


def _replay(cls: type[_Witness], steps: list[Any]) -> tuple[list[Any], list[str]]:
    c = _server(cls)
    assert isinstance(c, _Witness)
    log: list[Any] = []
    for step in steps:
        if isinstance(step, bytes):
            try:
                log.append([repr(e) for e in c.receive_data(step)])
            except Exception as e:
                log.append((type(e).__name__, str(e), getattr(e, "error_code", None)))
        else:
            step(c)
        log.append([repr(f) for f in _frames(c.data_to_send())])
    return log, c.raised


def check_receive_frame_behaviour() -> None:
    for name, (steps, branch) in DISPATCH_CASES.items():
        theirs, raised = _replay(_Witness, steps)
        expect(raised[-1:] == ([branch] if branch else []),
               f"case {name!r}: h2 took the branch {raised[-1:]}, not {branch} (update the case)")
        mine, _ = _replay(_Copy, steps)
        expect(mine == theirs, f"case {name!r}: dispatch_frame gives {mine!r}, h2 {theirs!r}")


# ---- h2: the hooks rawgate overrides -----------------------------------------------------------


def check_receive_frame_hook() -> None:
    expect(list(inspect.signature(H2Connection._receive_frame).parameters) == ["self", "frame"],
           "the signature is not (self, frame)")

    class Probe(H2Connection):
        def __init__(self, config: H2Configuration) -> None:
            super().__init__(config)
            self.seen: list[str] = []

        def _receive_frame(self, frame: Any) -> list[Event]:
            self.seen.append(type(frame).__name__)
            if self.seen.count("PingFrame") == 3:  # the second of the batch below
                raise DenialOfServiceError("flood")
            return super()._receive_frame(frame)

    c = Probe(H2Configuration(client_side=False, header_encoding=None))
    c.initiate_connection()
    c.clear_outbound_data_buffer()
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    events = c.receive_data(PREFACE + SettingsFrame(0).serialize() + ping + _headers(1))
    expect(c.seen == ["SettingsFrame", "PingFrame", "HeadersFrame"],
           f"receive_data did not call _receive_frame once per frame: {c.seen}")
    expect(any(isinstance(e, RequestReceived) for e in events), "the hook's events were lost")
    c.clear_outbound_data_buffer()
    try:
        c.receive_data(ping * 3)
    except DenialOfServiceError:
        pass
    else:
        raise Moved("an exception raised by _receive_frame did not leave receive_data")
    expect(c.seen.count("PingFrame") == 3, "h2 kept parsing after the hook raised")
    acks = [f for f in _frames(c.data_to_send()) if isinstance(f, PingFrame)]
    expect(len(acks) == 1, f"{len(acks)} PING ACKs queued, not 1 (the flood cap would leak)")


def check_receive_goaway_frame() -> None:
    h = new_h2(UpstreamConfig(), 100)
    bound = h._frame_dispatch_table[GoAwayFrame]
    expect(getattr(bound, "__func__", None) is H2ClientConnection._receive_goaway_frame,
           "GOAWAY does not reach the override through the dispatch table")
    for code, extra in ((0xB, b"bye"), (0xFFF, b"")):
        frame = GoAwayFrame(0, last_stream_id=5, error_code=code, additional_data=extra)
        plain = H2Connection(H2Configuration(client_side=True))
        plain.initiate_connection()
        theirs = [e for e in plain.receive_data(frame.serialize())
                  if isinstance(e, ConnectionTerminated)]
        frames, mine = H2ClientConnection._receive_goaway_frame(h, frame)
        expect(len(theirs) == 1 and len(mine) == 1 and not frames, "not one ConnectionTerminated")
        a, b = theirs[0], mine[0]
        assert isinstance(b, ConnectionTerminated)  # the override's list is typed list[Event]
        expect((a.error_code, a.last_stream_id, a.additional_data)
               == (b.error_code, b.last_stream_id, b.additional_data),
               f"h2 reports {a!r}, the override {b!r}")


def check_open_streams_properties() -> None:
    for name in ("open_outbound_streams", "open_inbound_streams"):
        expect(isinstance(inspect.getattr_static(H2Connection, name), property),
               f"{name} is not a property")
    reads: list[str] = []

    class Probe(H2Connection):
        @property
        def open_outbound_streams(self) -> int:
            reads.append("out")
            return int(super().open_outbound_streams)

        @property
        def open_inbound_streams(self) -> int:
            reads.append("in")
            return int(super().open_inbound_streams)

    client = Probe(H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, REQUEST, end_stream=True)
    expect("out" in reads, f"send_headers did not ask open_outbound_streams: {reads}")
    reads.clear()
    server = _server(Probe)
    server.receive_data(_headers(1))
    expect("in" in reads, f"a new HEADERS did not ask open_inbound_streams: {reads}")
    server.send_headers(1, RESPONSE, end_stream=True)
    expect(1 in server.streams, "h2 forgot a closed stream before the recount")
    H2Connection.open_inbound_streams.fget(server)  # type: ignore[attr-defined]
    expect(1 not in server.streams, "the recount no longer forgets closed streams")


def check_encoder_protocol() -> None:
    class Duck:
        """Only what rawgate's encoders provide: any other attribute raises."""

        __slots__ = ("blocks", "sizes")

        def __init__(self) -> None:
            self.blocks: list[list[tuple[bytes, bytes]]] = []
            self.sizes: list[int] = []

        def encode(self, headers: Any, huffman: bool = True) -> bytes:
            self.blocks.append(list(headers))
            return _block(list(headers))

        @property
        def header_table_size(self) -> int:
            return 4096

        @header_table_size.setter
        def header_table_size(self, value: int) -> None:
            self.sizes.append(value)

    for side, fields in ((True, REQUEST), (False, RESPONSE)):
        c = H2Connection(H2Configuration(client_side=side, header_encoding=None,
                                         validate_outbound_headers=False,
                                         normalize_outbound_headers=False))
        duck = Duck()
        c.encoder = duck  # type: ignore[assignment]
        c.initiate_connection()
        if not side:
            c.receive_data(PREFACE + SettingsFrame(0).serialize() + _headers(1))
        table = SettingsFrame(0, settings={SettingCodes.HEADER_TABLE_SIZE: 100})
        c.receive_data(table.serialize())
        c.send_headers(1, fields, end_stream=True)
        expect(duck.blocks == [fields], f"encode() got {duck.blocks}, not [{fields}]")
        expect(duck.sizes == [100], f"header_table_size was set to {duck.sizes}, not [100]")


def check_decoder_header_list_limit() -> None:
    c = _server()
    c.decoder.max_header_list_size = 100
    try:
        c.receive_data(_headers(1, [*REQUEST, (b"x-big", b"v" * 200)]))
    except ProtocolError:
        return
    raise Moved("a header block over max_header_list_size was accepted")


def check_local_settings_replaced() -> None:
    # h2_server._new_h2 advertises h2_max_concurrent_streams, then swaps local_settings for a
    # harder cap that h2 enforces: the SETTINGS frame already queued must keep the first value.
    c = _new_h2(LimitsConfig(h2_max_concurrent_streams=1))
    sent = [f for f in _frames(c.data_to_send()) if isinstance(f, SettingsFrame)]
    expect(len(sent) == 1 and sent[0].settings.get(SettingCodes.MAX_CONCURRENT_STREAMS) == 1,
           f"the SETTINGS sent do not advertise the first local_settings: {sent!r}")
    ack = SettingsFrame(0, flags=["ACK"]).serialize()
    c.receive_data(PREFACE + SettingsFrame(0).serialize() + ack)
    cap = c.stream_cap
    c.receive_data(b"".join(_headers(1 + 2 * i, end=False) for i in range(cap)))
    expect(len(c.streams) == cap, f"{len(c.streams)} streams open, not the hard cap {cap}")
    try:
        c.receive_data(_headers(1 + 2 * cap, end=False))
    except TooManyStreamsError:
        return
    raise Moved("a stream past the replacing local_settings' limit was accepted")


def check_continuation_flood_text() -> None:
    c = _server()
    flood = _headers(1, end_headers=False) + ContinuationFrame(1, data=b"").serialize() * 70
    try:
        c.receive_data(flood)
    except ProtocolError as e:
        expect(_connection_error_code(e) == _CALM,
               f"h2's CONTINUATION cap error ({type(e).__name__}: {e}) is no longer mapped to "
               "ENHANCE_YOUR_CALM by its text")
        return
    raise Moved("70 CONTINUATION frames were accepted")


def check_error_code_from_int() -> None:
    from h2.errors import _error_code_from_int

    expect(_error_code_from_int(8) is ErrorCodes.CANCEL, "8 is not ErrorCodes.CANCEL")
    expect(_error_code_from_int(0xFFF) == 0xFFF, "an unknown code is not returned as an int")
    code = _error_code_from_int(7)
    expect(isinstance(code, ErrorCodes) and code.name == "REFUSED_STREAM", "ErrorCodes lost .name")


# ---- h2: what the client's DATA fast path (h2_data.FastH2 via compat) reads ------------------


def _client_with_response(*, content_length: bool = False, end: bool = False) -> H2ClientConnection:
    c = _client()
    c.send_headers(1, REQUEST, end_stream=True)
    c.send_headers(3, REQUEST, end_stream=False)
    fields = [*RESPONSE, (b"content-length", b"10")] if content_length else RESPONSE
    c.receive_data(_headers(1, fields, end=end))
    c.clear_outbound_data_buffer()
    return c


def check_data_to_send() -> None:
    c = H2Connection(H2Configuration(client_side=True))
    c.initiate_connection()
    pending = c._data_to_send
    expect(type(pending) is bytearray and pending, "not a non-empty bytearray after the preface")
    expect(c.data_to_send() == bytes(pending), "not what data_to_send() returns")
    expect(not c._data_to_send, "not emptied by data_to_send()")
    c.ping(b"12345678")
    expect(c._data_to_send, "empty while a PING is queued")


def check_connection_window_manager() -> None:
    c = _client_with_response()
    win = c._inbound_flow_control_window_manager
    expect(win.current_window_size == c.inbound_flow_control_window,
           "current_window_size is not the connection's inbound window")
    before = win.current_window_size
    c.receive_data(DataFrame(1, data=b"x" * 100).serialize())
    expect(win.current_window_size == before - 100, "a DATA frame did not shrink it by its size")
    win.current_window_size -= 5  # what the fast path does
    expect(c.inbound_flow_control_window == before - 105, "it is not writable in place")


def check_stream_window_manager() -> None:
    c = _client_with_response()
    st = c.streams[1]
    win = st._inbound_window_manager
    expect(win.current_window_size == st.inbound_flow_control_window,
           "current_window_size is not the stream's inbound window")
    before = win.current_window_size
    c.receive_data(DataFrame(1, data=b"x" * 100).serialize())
    expect(win.current_window_size == before - 100, "a DATA frame did not shrink it by its size")
    win.current_window_size -= 5
    expect(st.inbound_flow_control_window == before - 105, "it is not writable in place")


def check_expected_content_length() -> None:
    plain = _client_with_response().streams[1]
    expect(plain._expected_content_length is None, "not None without a content-length")
    sized = _client_with_response(content_length=True).streams[1]
    expect(sized._expected_content_length == 10,
           f"{sized._expected_content_length!r} for content-length 10 (with inbound header "
           "validation off, as rawgate runs it)")


def check_actual_content_length() -> None:
    from h2.exceptions import InvalidBodyLengthError

    sized = _client_with_response(content_length=True)
    st = sized.streams[1]
    expect(st._actual_content_length == 0, f"{st._actual_content_length!r} before any DATA")
    sized.receive_data(DataFrame(1, data=b"x" * 4).serialize())
    expect(st._actual_content_length == 4, "a DATA frame did not add its size")
    st._actual_content_length += 3  # what the fast path does for a frame it takes
    try:
        sized.receive_data(DataFrame(1, data=b"x" * 4, flags=["END_STREAM"]).serialize())
    except InvalidBodyLengthError:
        pass  # 11 > 10: h2 judged the body by the count the fast path kept
    else:
        raise Moved("h2 did not check the end of the body against the kept count")
    plain = _client_with_response()
    plain.receive_data(DataFrame(1, data=b"x" * 4).serialize())
    expect(plain.streams[1]._actual_content_length == 4,
           "not counted without a content-length")


def check_frame_buffer() -> None:
    from h2.frame_buffer import FrameBuffer

    c = _client()
    fb = c.incoming_buffer
    expect(isinstance(fb, FrameBuffer), f"incoming_buffer is {type(fb).__name__}")
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    c.receive_data(ping[:5])
    expect(type(fb._data) is bytearray and fb._data == ping[:5],
           "_data does not hold the start of a partial frame")
    c.receive_data(ping[5:])
    expect(not fb._data, "_data not empty after the frame completed")
    c.send_headers(1, REQUEST, end_stream=True)
    c.receive_data(_headers(1, RESPONSE, end=False, end_headers=False))
    expect(isinstance(fb._headers_buffer, list) and fb._headers_buffer,
           "_headers_buffer is not a non-empty list while a header block waits for CONTINUATION")
    events = c.receive_data(ContinuationFrame(1, data=b"", flags=["END_HEADERS"]).serialize())
    expect(not fb._headers_buffer, "_headers_buffer not empty after END_HEADERS")
    expect(any(isinstance(e, ResponseReceived) for e in events), "the response head was lost")


def check_connection_state() -> None:
    c = _client()
    c.send_headers(1, REQUEST, end_stream=True)
    expect(c.state_machine.state is ConnectionState.CLIENT_OPEN,
           f"a client that sent a request is {c.state_machine.state}, not CLIENT_OPEN")
    plain = H2Connection(H2Configuration(client_side=True))
    plain.initiate_connection()
    plain.receive_data(GoAwayFrame(0).serialize())
    expect(plain.state_machine.state is not ConnectionState.CLIENT_OPEN,
           "still CLIENT_OPEN after h2's own GOAWAY handling")


def check_stream_state() -> None:
    from h2.stream import StreamState

    c = _client()
    c.send_headers(1, REQUEST, end_stream=False)
    c.send_headers(3, REQUEST, end_stream=True)
    s1, s3 = c.streams[1].state_machine, c.streams[3].state_machine
    expect((s1.state, s3.state) == (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL),
           f"request streams are {s1.state} / {s3.state}, not OPEN / HALF_CLOSED_LOCAL")
    expect(not s3.headers_received, "headers_received set before the response head")
    c.receive_data(_headers(3, RESPONSE, end=False))
    expect(s3.headers_received is True, "headers_received not True after the response head")
    c.reset_stream(1)
    expect(c.streams[1].closed is True, "a reset stream is not .closed")


# ---- hpack ---------------------------------------------------------------------------------------


def check_static_table() -> None:
    from hpack.table import HeaderTable

    t = HeaderTable.STATIC_TABLE
    expect(len(t) == 61, f"{len(t)} entries, not RFC 7541's 61")
    expect(all(type(n) is bytes and type(v) is bytes for n, v in t), "entries are not bytes pairs")
    expect((t[0], t[1], t[7], t[27], t[60])
           == ((b":authority", b""), (b":method", b"GET"), (b":status", b"200"),
               (b"content-length", b""), (b"www-authenticate", b"")),
           "entries are not in RFC 7541 Appendix A order")


def check_decode_huffman() -> None:
    from hpack.huffman_table import decode_huffman

    out = decode_huffman(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff"))  # RFC 7541 C.4.1
    expect(out == b"www.example.com" and isinstance(out, bytes), f"decoded to {out!r}")


def check_encode_integer() -> None:
    from hpack.hpack import encode_integer

    b = encode_integer(0, 5)
    expect(type(b) is bytearray, f"returns {type(b).__name__}; compat sets bits in place")
    expect(b == b"\x00", f"0 with a 5-bit prefix is {b!r}")
    expect(encode_integer(1337, 5) == bytearray([31, 154, 10]), "1337 is not RFC 7541 C.1.2")


# ---- hyperframe ----------------------------------------------------------------------------------


def check_frame_types() -> None:
    # h2_flood.GuardedH2.on_frame compares frame.type with these numbers (RFC 9113 6).
    numbers: dict[type[Frame], int] = {
        DataFrame: 0x0, HeadersFrame: 0x1, PriorityFrame: 0x2, RstStreamFrame: 0x3,
        SettingsFrame: 0x4, PingFrame: 0x6, WindowUpdateFrame: 0x8,
        ContinuationFrame: 0x9, AltSvcFrame: 0xA,
    }  # fmt: skip
    wrong = [cls.__name__ for cls, t in numbers.items() if cls.type != t]
    expect(not wrong, f"type numbers changed for {wrong}")
    expect("ACK" in PingFrame(0, flags=["ACK"]).flags, "flags no longer support `in` by name")
    data = DataFrame(1, data=b"", flags=["END_STREAM"])
    expect("END_STREAM" in data.flags and data.data == b"", "DataFrame flags / data changed")


# ---- the list -----------------------------------------------------------------------------------

CANARIES: tuple[Canary, ...] = (
    # h11
    Canary("h11.Connection._receive_buffer", "h11", ("compat",), ("_receive_buffer",),
           "its len() before and after a head is the head's size; a fresh Connection takes it "
           "over for the next pipelined request", check_h11_receive_buffer),
    Canary("h11.ReceiveBuffer._data", "h11", ("compat",), ("_data",),
           "a bytearray of exactly the unparsed bytes, read by the fast head parser",
           check_h11_receive_buffer_data),
    Canary("h11.ReceiveBuffer.maybe_extract_at_most", "h11", ("compat",), (),
           "takes a fast-parsed head and Content-Length bodies out of h11's buffer",
           check_h11_maybe_extract_at_most),
    Canary("h11.Headers._full_items", "h11", ("compat",), ("_full_items",),
           "(raw name, lower-case name, value) triples of a parsed head",
           check_h11_full_items),
    Canary("h11 Content-Length checks", "h11", ("http/h1_server", "upstream/h1_client"), (),
           "h11 merged identical Content-Lengths and refused bad ones before rawgate reads it",
           check_h11_content_length),
    Canary("h11 Transfer-Encoding checks", "h11", ("http/h1_server", "upstream/h1_client"), (),
           "h11 accepts no Transfer-Encoding but chunked (501 otherwise)",
           check_h11_transfer_encoding),
    Canary("h11 incomplete-head limit", "h11", ("http/h1_server",), (),
           "an over-long incomplete head is a 431 hint; no LF in the buffer means 414",
           check_h11_incomplete_head_limit),
    Canary("h11.Connection.trailing_data", "h11", ("upstream/h1_client",), (),
           "after the Response event it holds the body bytes that came with the head",
           check_h11_trailing_data),
    # h2: dispatch_frame, the copy of H2Connection._receive_frame
    Canary("h2.H2Connection._frame_dispatch_table", "h2", ("compat",),
           ("_frame_dispatch_table",),
           "a dict from every hyperframe frame class to the connection's bound handler",
           check_dispatch_table),
    Canary("h2.H2Connection._prepare_for_sending", "h2", ("compat",),
           ("_prepare_for_sending",), "queues the handlers' reply frames for data_to_send()",
           check_prepare_for_sending),
    Canary("h2.H2Connection._stream_is_closed_by_reset", "h2", ("compat",),
           ("_stream_is_closed_by_reset",),
           "tells a stream closed by RST_STREAM, also once h2 forgot it", check_closed_by_reset),
    Canary("h2.H2Connection._stream_is_closed_by_end", "h2", ("compat",),
           ("_stream_is_closed_by_end",),
           "tells a stream closed by END_STREAM, also once h2 forgot it", check_closed_by_end),
    Canary("h2.exceptions.StreamClosedError._events", "h2", ("compat",), ("_events",),
           "the events to report when a frame hits a reset stream", check_stream_closed_events),
    Canary("h2.H2Connection._receive_frame (source)", "h2", ("compat",), (),
           "dispatch_frame is h2's _receive_frame minus its repr: same names, same branches",
           check_receive_frame_source),
    Canary("h2.H2Connection._receive_frame (behaviour)", "h2", ("compat",), (),
           "dispatch_frame gives h2's events, output and errors on every branch",
           check_receive_frame_behaviour),
    # h2: overridden hooks
    Canary("h2.H2Connection._receive_frame", "h2", ("compat",),
           ("override _receive_frame",),
           "receive_data calls it once per frame; an exception raised there stops the batch",
           check_receive_frame_hook),
    Canary("h2.H2Connection._receive_frame (h2's own, fast paths off)", "h2", ("compat",),
           ("_receive_frame",),
           "FrameHookH2 hands the frame on to h2's own step when fast_dispatch is off",
           check_receive_frame_hook),
    Canary("h2.H2Connection._receive_goaway_frame", "h2", ("compat",),
           ("override _receive_goaway_frame",),
           "the GOAWAY handler, reached through the dispatch table; the override reports what "
           "h2 reports", check_receive_goaway_frame),
    Canary("h2.H2Connection.open_outbound_streams/open_inbound_streams", "h2",
           ("upstream/h2_data", "http/h2_flood"), (),
           "properties h2 asks per new stream; the recount is where closed streams are forgotten",
           check_open_streams_properties),
    Canary("h2.H2Connection.encoder", "h2", ("upstream/h2_client", "http/h2_server"), (),
           "h2 uses an encoder only through encode(headers) and header_table_size = n, so "
           "rawgate's own HPACK encoders stand in", check_encoder_protocol),
    Canary("hpack.Decoder.max_header_list_size", "hpack",
           ("http/h2_server", "upstream/h2_client"), (),
           "h2 refuses a header block over it", check_decoder_header_list_limit),
    Canary("h2.H2Connection.local_settings (replaced after initiate_connection)", "h2",
           ("compat", "http/h2_server"), (),
           "the SETTINGS frame advertises the first value, h2 enforces the replacement",
           check_local_settings_replaced),
    Canary("h2 CONTINUATION flood error text", "h2", ("http/h2_server",), (),
           "the 'too many continuation frames' ProtocolError is told apart by its text",
           check_continuation_flood_text),
    Canary("h2.errors._error_code_from_int", "h2", ("compat",),
           ("import h2.errors._error_code_from_int",),
           "an int code -> ErrorCodes member (or the int when unknown)",
           check_error_code_from_int),
    # h2: the client's DATA fast path
    Canary("h2.H2Connection._data_to_send", "h2", ("compat",), ("_data_to_send",),
           "a bytearray, non-empty exactly when data_to_send() has bytes", check_data_to_send),
    Canary("h2.H2Connection._inbound_flow_control_window_manager", "h2",
           ("compat",),
           ("_inbound_flow_control_window_manager",),
           "its current_window_size is the connection window, shrunk in place per DATA frame",
           check_connection_window_manager),
    Canary("h2.stream.H2Stream._inbound_window_manager", "h2", ("compat",),
           ("_inbound_window_manager",),
           "its current_window_size is the stream window, shrunk in place per DATA frame",
           check_stream_window_manager),
    Canary("h2.stream.H2Stream._expected_content_length", "h2", ("compat",),
           ("_expected_content_length",),
           "None unless the response has a content-length to check",
           check_expected_content_length),
    Canary("h2.stream.H2Stream._actual_content_length", "h2", ("compat",),
           ("_actual_content_length",),
           "the body bytes received so far, an int h2 adds each DATA frame to and checks "
           "against _expected_content_length (over it, or short at END_STREAM, is an error)",
           check_actual_content_length),
    Canary("h2.frame_buffer.FrameBuffer._data/_headers_buffer", "h2", ("compat",),
           ("_data", "_headers_buffer"),
           "incoming_buffer's partial-frame bytes and pending header block (fast path off "
           "while either is non-empty)", check_frame_buffer),
    Canary("h2.connection.ConnectionState", "h2", ("compat",),
           ("import h2.connection.ConnectionState",),
           "state_machine.state is CLIENT_OPEN while the fast path may run",
           check_connection_state),
    Canary("h2.stream.StreamState", "h2", ("compat",),
           ("import h2.stream.StreamState",),
           "OPEN / HALF_CLOSED_LOCAL and headers_received of H2Stream.state_machine; .closed",
           check_stream_state),
    # hpack
    Canary("hpack.table.HeaderTable.STATIC_TABLE", "hpack", ("compat",),
           ("import hpack.table.HeaderTable",),
           "RFC 7541's static table as (name, value) bytes pairs, index - 1",
           check_static_table),
    Canary("hpack.huffman_table.decode_huffman", "hpack", ("emulator/fast_h2",),
           ("import hpack.huffman_table.decode_huffman",),
           "decodes an HPACK Huffman string to bytes", check_decode_huffman),
    Canary("hpack.hpack.encode_integer", "hpack", ("compat",),
           ("import hpack.hpack.encode_integer",),
           "an HPACK integer as a bytearray whose first byte takes the flag bits",
           check_encode_integer),
    # hyperframe
    Canary("hyperframe.frame.Frame.type/flags", "hyperframe", ("http/h2_flood",), (),
           "frame type numbers and flag names the flood counters compare with",
           check_frame_types),
)


@pytest.mark.parametrize("canary", CANARIES, ids=[c.id for c in CANARIES])
def test_canary(canary: Canary) -> None:
    msg = run_canary(canary)
    if msg is not None:
        pytest.fail(msg, pytrace=False)


def test_canary_ids_are_unique() -> None:
    ids = [c.id for c in CANARIES]
    assert len(ids) == len(set(ids))


# ---- the pyproject bounds ------------------------------------------------------------------------

_SPEC = re.compile(r"\s*(~=|==|!=|<=|>=|<|>)\s*([0-9][0-9a-zA-Z.]*)\s*")


def _release(v: str) -> tuple[int, ...]:
    """The numeric release of a version ("4.2.0rc1" -> (4, 2, 0)), zero-padded to 4 parts."""
    parts = []
    for p in v.split("."):
        m = re.match(r"\d+", p)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.end() != len(p):
            break
    return tuple(parts + [0] * (4 - len(parts)))


def satisfies(version: str, spec: str) -> bool:
    """A small PEP 440 comparator for the release-only bounds pyproject.toml uses."""
    v = _release(version)
    for part in spec.split(","):
        m = _SPEC.fullmatch(part)
        if m is None:
            raise ValueError(f"cannot read the version bound {part!r}")
        op, bound = m.group(1), _release(m.group(2))
        ok = {
            "==": v == bound, "!=": v != bound, "<=": v <= bound, ">=": v >= bound,
            "<": v < bound, ">": v > bound,
            "~=": v >= bound and v[: len(m.group(2).split(".")) - 1]
            == bound[: len(m.group(2).split(".")) - 1],
        }[op]
        if not ok:
            return False
    return True


def pyproject_bounds() -> dict[str, str]:
    """{library: its version specifier} for the four libraries, from pyproject.toml."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out: dict[str, str] = {}
    for dep in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", dep.split(";")[0])
        if m and m.group(1).lower() in LIBS:
            out[m.group(1).lower()] = m.group(2).strip()
    return out


def bound_failure(lib: str, version: str, spec: str) -> str | None:
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pragma: no cover - packaging comes with pytest today
        ok = satisfies(version, spec)
    else:
        ok = version in SpecifierSet(spec)
    if ok:
        return None
    return (f"{lib} {version} is installed but pyproject.toml allows {lib}{spec}: reinstall "
            f"(pip install -e '.[test]') or, after the canaries pass on {lib} {version}, widen "
            f"the bound in pyproject.toml")


def test_installed_versions_satisfy_pyproject_bounds() -> None:
    bounds = pyproject_bounds()
    assert sorted(bounds) == sorted(LIBS), f"pyproject.toml bounds only {sorted(bounds)}"
    for lib in LIBS:
        assert "<" in bounds[lib], (
            f"pyproject.toml has no upper bound on {lib}; rawgate reads its internals "
            f"(see the canaries in tests/differential/test_compat_canary.py)")
        msg = bound_failure(lib, installed(lib), bounds[lib])
        assert msg is None, msg


def test_bound_check_reports_a_version_outside_the_bounds() -> None:
    msg = bound_failure("h2", "4.5.0", ">=4.2,<4.5")
    assert msg is not None and "h2 4.5.0 is installed" in msg and "h2>=4.2,<4.5" in msg
    assert bound_failure("h2", "4.4.1", ">=4.2,<4.5") is None


@pytest.mark.parametrize("version", ["0.15.9", "0.16.0", "0.16.3", "0.17.0", "4.1.0", "4.2.0",
                                     "4.4.99", "4.5.0", "6.1.0", "6.2.0", "6.0"])
def test_small_comparator_agrees_with_packaging(version: str) -> None:
    specifiers = pytest.importorskip("packaging.specifiers")
    for spec in [*pyproject_bounds().values(), "~=4.2", "==4.2.0", "!=4.2.0,>4.1", "<=4.4"]:
        want = specifiers.SpecifierSet(spec).contains(version)
        assert satisfies(version, spec) == want, (version, spec)


# ---- keeping the list complete ------------------------------------------------------------------

# The library modules (and names) their documentation gives as API; an import from anything else
# (h2.stream, h2.frame_buffer, hpack.table, hpack.hpack, h11._util, ...) is a touch of internals.
# None: every non-underscore name of the module.
PUBLIC_IMPORTS: dict[str, frozenset[str] | None] = {
    "h11": None,
    "hpack": None,
    "hyperframe.frame": None,
    "hyperframe.flags": None,
    "hyperframe.exceptions": None,
    "h2.config": None,
    "h2.errors": frozenset({"ErrorCodes"}),
    "h2.events": None,
    "h2.exceptions": None,
    "h2.settings": frozenset({"SettingCodes", "Settings", "ChangedSetting"}),
    "h2.connection": frozenset({"H2Connection"}),
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_names(trees: Iterable[ast.AST]) -> set[str]:
    """Names a body of code defines as attributes: defs, classes, `self.x =`, class-level
    assignments and __slots__ entries."""
    out: set[str] = set()
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.add(n.name)
            elif isinstance(n, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                for t in targets:
                    for x in ast.walk(t):
                        if (isinstance(x, ast.Attribute) and isinstance(x.value, ast.Name)
                                and x.value.id in ("self", "cls")):
                            out.add(x.attr)
                        elif isinstance(x, ast.Name):
                            out.add(x.id)
                if n.value is not None and any(
                    isinstance(t, ast.Name) and t.id == "__slots__" for t in targets
                ):
                    out.update(c.value for c in ast.walk(n.value)
                               if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return out


@functools.cache
def _library_private_names() -> frozenset[str]:
    trees: list[ast.AST] = []
    for lib in LIBS:
        spec = import_util.find_spec(lib)
        assert spec is not None and spec.origin is not None
        trees.extend(ast.parse(p.read_text(encoding="utf-8"))
                     for p in Path(spec.origin).parent.rglob("*.py"))
    return frozenset(n for n in _defined_names(trees) if _private(n))


def _lib_of(module: str | None) -> str | None:
    root = (module or "").split(".")[0]
    return root if root in LIBS else None


def scan_private_touches(sources: dict[str, str]) -> dict[tuple[str, str], list[int]]:
    """(rawgate module, touch) -> line numbers, for the modules that import h11/h2/hpack/
    hyperframe. A touch is "_name" (a private attribute of a library object: read through any
    object whose attribute name the libraries define or rawgate does not, or through `self` in a
    subclass of a library class when that class does not define it), "override _name" (a
    library-class subclass redefines a private method the library has), or "import mod.name"
    (a name from an internal module, or a private name)."""
    trees = {m: ast.parse(src) for m, src in sources.items()}
    own = _defined_names(trees.values())
    lib_names = _library_private_names()
    found: dict[tuple[str, str], list[int]] = {}

    def add(module: str, touch: str, line: int) -> None:
        found.setdefault((module, touch), []).append(line)

    for module, tree in trees.items():
        lib_classes: set[str] = set()  # local names bound to library classes
        uses_lib = False
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and _lib_of(n.module):
                uses_lib = True
                public = PUBLIC_IMPORTS.get(n.module or "", frozenset())
                for a in n.names:
                    lib_classes.add(a.asname or a.name)
                    if _private(a.name) or (public is not None and a.name not in public):
                        add(module, f"import {n.module}.{a.name}", n.lineno)
            elif isinstance(n, ast.Import):
                for a in n.names:
                    if _lib_of(a.name):
                        uses_lib = True
                        if a.name not in PUBLIC_IMPORTS:
                            add(module, f"import {a.name}", n.lineno)
        if not uses_lib:
            continue
        # A class of this module deriving from one that derives from a library class is a
        # library subclass too (compat's H2ClientFastConnection over H2ClientConnection).
        grew = True
        while grew:
            grew = False
            for cls in ast.walk(tree):
                if isinstance(cls, ast.ClassDef) and cls.name not in lib_classes and any(
                    ast.unparse(b).split(".")[0] in lib_classes for b in cls.bases
                ):
                    lib_classes.add(cls.name)
                    grew = True
        subclass_nodes: set[int] = set()
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            if not any(ast.unparse(b).split(".")[0] in lib_classes | set(LIBS)
                       for b in cls.bases):
                continue
            mine = _defined_names(cls.body)
            for stmt in cls.body:
                if isinstance(stmt, ast.FunctionDef) and _private(stmt.name) \
                        and stmt.name in lib_names:
                    add(module, f"override {stmt.name}", stmt.lineno)
            for n in ast.walk(cls):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) \
                        and n.value.id == "self":
                    subclass_nodes.add(id(n))
                    if _private(n.attr) and n.attr not in mine:
                        add(module, n.attr, n.lineno)
        for n in ast.walk(tree):
            if not isinstance(n, ast.Attribute) or not _private(n.attr) or id(n) in subclass_nodes:
                continue
            if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                continue  # rawgate's own objects (library subclasses are handled above)
            if n.attr in lib_names or n.attr not in own:
                add(module, n.attr, n.lineno)
    return found


def _rawgate_sources() -> dict[str, str]:
    return {
        p.relative_to(RAWGATE).with_suffix("").as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(RAWGATE.rglob("*.py"))
    }


# Private names of rawgate's own objects that a library happens to define too (the scan cannot
# tell the objects apart): (module, touch) -> why it is rawgate's own.
OWN_TOUCHES: dict[tuple[str, str], str] = {}


def uncovered(found: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    covered = {(m, t) for c in CANARIES for m in c.users for t in c.touches}
    return sorted(k for k in found if k not in covered and k not in OWN_TOUCHES)


def uncovered_message(missing: dict[tuple[str, str], list[int]]) -> str:
    lines = [f"  rawgate/{m}.py:{','.join(map(str, sorted(set(lines))))}: {t}"
             for (m, t), lines in sorted(missing.items())]
    return ("private library internals touched without a canary:\n" + "\n".join(lines)
            + "\nadd a canary in tests/differential/test_compat_canary.py (CANARIES: the "
            "attribute, the library, the rawgate module, what it assumes, a check), or list a "
            "rawgate-own attribute in OWN_TOUCHES there")


@functools.cache
def _rawgate_touches() -> dict[tuple[str, str], list[int]]:
    return scan_private_touches(_rawgate_sources())


def test_every_private_touch_has_a_canary() -> None:
    found = _rawgate_touches()
    missing = {k: found[k] for k in uncovered(found)}
    assert not missing, uncovered_message(missing)


def test_no_canary_lists_a_touch_that_is_gone() -> None:
    found = _rawgate_touches()
    gone = [f"{c.id}: rawgate/{m}.py no longer has {t!r}"
            for c in CANARIES for m in c.users for t in c.touches if (m, t) not in found]
    gone += [f"OWN_TOUCHES: rawgate/{m}.py no longer has {t!r}"
             for (m, t) in OWN_TOUCHES if (m, t) not in found]
    assert not gone, ("the canary list names touches rawgate no longer makes (update "
                      "`touches`/`users` or drop the canary in "
                      "tests/differential/test_compat_canary.py):\n"
                      + "\n".join(gone))


def test_every_user_module_exists() -> None:
    names = set(_rawgate_sources())
    assert not [m for c in CANARIES for m in c.users if m not in names]


# ---- the canaries fail when they should ----------------------------------------------------------


def _canary(cid: str) -> Canary:
    return next(c for c in CANARIES if c.id == cid)


def _assert_names_everything(msg: str | None, c: Canary) -> None:
    assert msg is not None, f"{c.id} did not fail"
    version = installed(c.lib)
    assert msg.startswith(f"{c.id} moved: ")
    assert f"installed: {c.lib} {version}" in msg
    for m in c.users:
        assert f"rawgate/{m}.py" in msg
    assert f"pin {c.lib} below {version} in pyproject.toml" in msg
    assert f"or update rawgate/{c.users[0]}.py" in msg


@pytest.mark.parametrize(
    ("cid", "owner", "attr"),
    [
        ("h2.H2Connection._prepare_for_sending", "h2.connection.H2Connection",
         "_prepare_for_sending"),
        ("h2.H2Connection._stream_is_closed_by_reset", "h2.connection.H2Connection",
         "_stream_is_closed_by_reset"),
        ("h2.H2Connection._receive_goaway_frame", "h2.connection.H2Connection",
         "_receive_goaway_frame"),
        ("h2.H2Connection._receive_frame (source)", "h2.connection.H2Connection",
         "_receive_frame"),
        ("h11.ReceiveBuffer.maybe_extract_at_most", "h11._receivebuffer.ReceiveBuffer",
         "maybe_extract_at_most"),
        ("h11.Headers._full_items", "h11._headers.Headers", "_full_items"),
        ("hpack.table.HeaderTable.STATIC_TABLE", "hpack.table.HeaderTable", "STATIC_TABLE"),
    ],
)
def test_a_removed_attribute_fails_its_canary(
    monkeypatch: pytest.MonkeyPatch, cid: str, owner: str, attr: str
) -> None:
    c = _canary(cid)
    assert run_canary(c) is None
    module, _, cls = owner.rpartition(".")
    monkeypatch.delattr(getattr(import_module(module), cls), attr)
    msg = run_canary(c)
    _assert_names_everything(msg, c)
    assert attr in str(msg)


def test_a_changed_behaviour_fails_its_canary(monkeypatch: pytest.MonkeyPatch) -> None:
    from h11._receivebuffer import ReceiveBuffer

    # A release that copies instead of consuming, as a refactor might.
    def copy_only(self: Any, count: int) -> bytearray | None:
        return self._data[:count] or None

    c = _canary("h11.ReceiveBuffer.maybe_extract_at_most")
    monkeypatch.setattr(ReceiveBuffer, "maybe_extract_at_most", copy_only)
    msg = run_canary(c)
    _assert_names_everything(msg, c)
    assert "did not take the first n bytes out" in str(msg)


def test_a_changed_copied_method_fails_its_canary(monkeypatch: pytest.MonkeyPatch) -> None:
    # A release whose _receive_frame answers frames on reset streams differently.
    original = H2Connection._receive_frame

    def changed(self: H2Connection, frame: Any) -> list[Event]:
        try:
            return original(self, frame)
        finally:
            self._data_to_send += PingFrame(0).serialize()

    monkeypatch.setattr(H2Connection, "_receive_frame", changed)
    c = _canary("h2.H2Connection._receive_frame (behaviour)")
    msg = run_canary(c)
    _assert_names_everything(msg, c)
    assert "dispatch_frame gives" in str(msg)


def test_the_message_names_the_installed_version(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _canary("h2.H2Connection._prepare_for_sending")
    monkeypatch.setattr(metadata, "version", lambda lib: "4.5.0")
    monkeypatch.delattr(H2Connection, "_prepare_for_sending")
    msg = str(run_canary(c))
    assert "installed: h2 4.5.0" in msg
    assert 'pin h2 below 4.5.0 in pyproject.toml ("h2<4.5.0")' in msg
    assert "or update rawgate/compat.py for h2 4.5.0" in msg


def test_the_scan_finds_a_new_private_touch() -> None:
    sources = _rawgate_sources()
    sources["compat"] += (
        "\n\ndef _peek(conn: H2Connection) -> object:\n"
        "    return conn._closed_streams, conn._brand_new_private\n"
        "\n\nclass _Deeper(H2ClientFastConnection):\n"  # a library subclass two steps down
        "    def _receive_priority_frame(self, frame: Any) -> Any:\n"
        "        return self._priority_thing\n"
    )
    sources["http/h1_server"] += "\n\nfrom h11._util import bytesify\n"
    sources["upstream/h2_client"] += (
        "\n\nfrom h2.connection import H2Connection as _H2Base\n"
        "\n\nclass _More(_H2Base):\n"
        "    def _receive_ping_frame(self, frame: Any) -> Any:\n"
        "        return self._header_frames\n"
    )
    found = scan_private_touches(sources)
    missing = dict((k, found[k]) for k in uncovered(found))
    assert set(missing) == {
        ("compat", "_closed_streams"),
        ("compat", "_brand_new_private"),
        ("compat", "override _receive_priority_frame"),
        ("compat", "_priority_thing"),
        ("http/h1_server", "import h11._util.bytesify"),
        ("upstream/h2_client", "override _receive_ping_frame"),
        ("upstream/h2_client", "_header_frames"),
    }
    msg = uncovered_message(missing)
    assert "rawgate/compat.py:" in msg and ": _closed_streams" in msg
    assert "add a canary in tests/differential/test_compat_canary.py" in msg


def test_the_scan_ignores_rawgates_own_private_attributes() -> None:
    sources = {
        "compat": (
            "from h2.connection import H2Connection\n\n"
            "class _Mine:\n"
            "    def __init__(self) -> None:\n"
            "        self._hits = 0\n\n"
            "def bump(m: _Mine) -> None:\n"
            "    m._hits += 1\n"
        ),
        "sse": "class _X:\n    _data = 1\n\ndef f(x: _X) -> int:\n    return x._anything\n",
    }
    assert scan_private_touches(sources) == {}
