"""A minimal HTTP/2 server session for the emulator's fast engine (h2c or TLS + ALPN h2).

Why hand-rolled: on the bench box the `h2` library costs ~240 us per request on the server side
(header validation, state machines, HPACK), and rawgate's anyio h2 driver ~190 us; either would
make the emulator the bottleneck of an h2 benchmark (the gateway aims at ~2,000 req/s). This
session does only what a benchmark upstream needs, in a few microseconds per request.

Invariants:
- Benchmark-only: it trusts well-behaved clients (rawgate's pool, h2load, curl). Framing errors,
  PUSH_PROMISE, frames over our max size or a header block over MAX_HEADER_BLOCK_BYTES end the
  connection with GOAWAY(PROTOCOL_ERROR); there are no flood guards. The gateway never uses it.
- HPACK: a complete decoder (static + dynamic table, size updates, Huffman via hpack's table);
  responses are encoded without touching any dynamic table (literal, never indexed, static-table
  names where they exist), so header blocks are built once per header tuple and cached.
- Flow control both ways: our windows are large (STREAM_WINDOW, CONNECTION_WINDOW) and received
  DATA is acknowledged per read batch; outgoing DATA never exceeds the peer's stream/connection
  windows or its MAX_FRAME_SIZE, the rest waits in the stream's pending buffer and the stream's
  script pauses until WINDOW_UPDATE.
- Replies come from the shared sans-IO core; timed replies are generators driven by call_later,
  as in emulator_fast.py. A scripted fault resets the stream (RST_STREAM CANCEL).
- One `transport.write` per read batch or timer tick.
- Request bodies are acknowledged on the connection only; a body over STREAM_WINDOW (16 MiB)
  would stall, which no benchmark request comes near.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Generator

from hpack import HPACKError
from hpack.huffman_table import decode_huffman

from rawgate.compat import HPACK_STATIC_TABLE
from rawgate.emulator.core import Emulator, Reply
from rawgate.emulator.state import Header
from rawgate.errors import BadRequest
from rawgate.http.target import parse_target
from rawgate.wire import hpack_int as _int

__all__ = ["PREFACE", "H2Session"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_WINDOW = 1 << 24  # our receive windows: request bodies never wait for a WINDOW_UPDATE
CONNECTION_WINDOW = 1 << 30
MAX_HEADER_BLOCK_BYTES = 256 * 1024
_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WU, _CONT = range(10)
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIO = 0x1, 0x1, 0x4, 0x8, 0x20
_PROTOCOL_ERROR, _CANCEL, _REFUSED = 0x1, 0x8, 0x7
_STATIC = HPACK_STATIC_TABLE
_STATIC_NAMES = {name: i + 1 for i, (name, _) in reversed(list(enumerate(_STATIC)))}
_FRAME = struct.Struct(">IBBI")  # 8-bit pad + 24-bit length, type, flags, stream id


def _frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(len(payload), kind, flags, sid)[1:] + payload


def _encode_block(headers: tuple[Header, ...], status: int) -> bytes:
    """Literal never-indexed fields (RFC 7541 6.2.3): no encoder state, so cacheable."""
    out = bytearray(b"\x88" if status == 200 else _int(8, 4, 0x10) + _int(3, 7, 0)
                    + str(status).encode())
    for name, value in headers:
        idx = _STATIC_NAMES.get(name)
        out += _int(idx, 4, 0x10) if idx else b"\x10" + _int(len(name), 7, 0) + name
        out += _int(len(value), 7, 0) + value
    return bytes(out)


_BLOCKS: dict[tuple[int, tuple[Header, ...]], bytes] = {}


class _Decoder:
    """HPACK decoding (RFC 7541) with the dynamic table the peer's encoder assumes."""

    def __init__(self) -> None:
        self.table: list[Header] = []  # newest first
        self.size = 0
        self.max_size = 4096

    def _integer(self, data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            b = data[pos]
            pos += 1
            value += (b & 127) << shift
            shift += 7
            if not b & 128:
                return value, pos

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        huff = data[pos] & 128
        n, pos = self._integer(data, pos, 7)
        raw = data[pos : pos + n]
        if len(raw) != n:
            raise ValueError("truncated HPACK string")
        return (decode_huffman(raw) if huff else raw), pos + n

    def _get(self, index: int) -> Header:
        if 0 < index <= len(_STATIC):
            return _STATIC[index - 1]
        return self.table[index - len(_STATIC) - 1]  # IndexError = a broken block

    def _add(self, h: Header) -> None:
        self.table.insert(0, h)
        self.size += 32 + len(h[0]) + len(h[1])
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.table:
            n, v = self.table.pop()
            self.size -= 32 + len(n) + len(v)

    def decode(self, data: bytes) -> list[Header]:
        out: list[Header] = []
        pos = 0
        end = len(data)
        while pos < end:
            b = data[pos]
            if b & 0x80:  # indexed field
                index, pos = self._integer(data, pos, 7)
                out.append(self._get(index))
                continue
            if b & 0xE0 == 0x20:  # dynamic table size update
                self.max_size, pos = self._integer(data, pos, 5)
                self._evict()
                continue
            indexing = bool(b & 0x40)
            index, pos = self._integer(data, pos, 6 if indexing else 4)
            if index:
                name = self._get(index)[0]
            else:
                name, pos = self._string(data, pos)
            value, pos = self._string(data, pos)
            h = (name, value)
            if indexing:
                self._add(h)
            out.append(h)
        return out


class _Stream:
    __slots__ = ("block", "body", "end", "ended", "headers", "pending", "script", "sent",
                 "timer", "waiting", "window")

    def __init__(self, window: int) -> None:
        self.block = b""  # header block fragments until END_HEADERS
        self.headers: list[Header] = []
        self.body: list[bytes] = []
        self.ended = False  # the request ended with its HEADERS (no body)
        self.window = window  # peer's window for our DATA on this stream
        self.pending = b""  # our bytes waiting for window (b"" once all are out)
        self.sent = 0  # how much of `pending` is already framed (an offset, see _pump)
        self.end = False  # end the stream once `pending` is out
        self.script: Generator[float | None, None, None] | None = None
        self.timer: asyncio.Handle | None = None
        self.waiting = False  # the script waits for window


class H2Session:
    def __init__(self, core: Emulator, loop: asyncio.AbstractEventLoop,
                 transport: asyncio.Transport, max_streams: int,
                 on_close: Callable[[], None]) -> None:
        self.core = core
        self.loop = loop
        self.transport = transport
        self.on_close = on_close
        self.max_streams = max_streams
        self.streams: dict[int, _Stream] = {}
        self.buf = bytearray()
        self.preface_done = False
        self.decoder = _Decoder()
        self.peer_window = 65535  # connection-level window for our DATA
        self.peer_initial = 65535
        self.peer_max_frame = 16384
        self.out: list[bytes | memoryview] = []  # joined by flush()
        self.unacked = 0  # DATA bytes received since the last connection WINDOW_UPDATE
        self.closed = False
        settings = struct.pack(">HIHI", 3, max_streams, 4, STREAM_WINDOW)
        self.out.append(_frame(_SETTINGS, 0, 0, settings)
                        + _frame(_WU, 0, 0, struct.pack(">I", CONNECTION_WINDOW - 65535)))
        self.flush()

    def flush(self) -> None:
        if self.unacked:
            self.out.append(_frame(_WU, 0, 0, struct.pack(">I", self.unacked)))
            self.unacked = 0
        if self.out and not self.closed:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def close(self) -> None:
        for st in self.streams.values():
            _stop(st)
        self.streams.clear()
        self.closed = True

    def _goaway(self, code: int) -> None:
        last = max(self.streams, default=0)
        self.out.append(_frame(_GOAWAY, 0, 0, struct.pack(">II", last, code)))
        self.flush()
        self.transport.close()
        self.close()
        self.on_close()

    # -- reading --

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        buf = self.buf
        buf += data
        if not self.preface_done:
            if len(buf) < len(PREFACE):
                return
            if not buf.startswith(PREFACE):
                self._goaway(_PROTOCOL_ERROR)
                return
            del buf[: len(PREFACE)]
            self.preface_done = True
        pos = 0
        try:
            while len(buf) - pos >= 9:
                length = int.from_bytes(buf[pos : pos + 3], "big")
                if length > STREAM_WINDOW:
                    raise ValueError("frame too large")
                if len(buf) - pos < 9 + length:
                    break
                kind, flags = buf[pos + 3], buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame_in(kind, flags, sid, payload)
                if self.transport.is_closing():  # GOAWAY received or sent
                    return
        except (ValueError, IndexError, struct.error, HPACKError):  # a bad Huffman string too
            self._goaway(_PROTOCOL_ERROR)
            return
        del buf[:pos]
        self.flush()

    def _frame_in(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == _DATA:
            self.unacked += len(payload)
            st = self.streams.get(sid)
            if flags & _PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if st is not None:
                st.body.append(payload)
                if flags & _END_STREAM:
                    self._dispatch(sid, st)
        elif kind in (_HEADERS, _CONT):
            if kind == _HEADERS:
                if flags & _PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & _PRIO:
                    payload = payload[5:]
                if len(self.streams) >= self.max_streams:
                    self.out.append(_frame(_RST, 0, sid, struct.pack(">I", _REFUSED)))
                    self.decoder.decode(payload)  # keep HPACK state in sync
                    return
                st = self.streams[sid] = _Stream(self.peer_initial)
                st.ended = bool(flags & _END_STREAM)
            else:
                st = self.streams[sid]
            st.block += payload
            if len(st.block) > MAX_HEADER_BLOCK_BYTES:
                raise ValueError("header block too large")
            if flags & _END_HEADERS:
                st.headers = self.decoder.decode(st.block)
                st.block = b""
                if st.ended:
                    self._dispatch(sid, st)
        elif kind == _SETTINGS:
            if flags & _ACK:
                return
            for i in range(0, len(payload) - 5, 6):
                ident, value = struct.unpack_from(">HI", payload, i)
                if ident == 4:  # INITIAL_WINDOW_SIZE applies to open streams as a delta
                    for s in self.streams.values():
                        s.window += value - self.peer_initial
                    self.peer_initial = value
                elif ident == 5:
                    self.peer_max_frame = value
            self.out.append(_frame(_SETTINGS, _ACK, 0))
            self._pump_all()
        elif kind == _WU:
            inc = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self.peer_window += inc
                self._pump_all()
            elif (st := self.streams.get(sid)) is not None:
                st.window += inc
                self._pump(sid, st)
        elif kind == _PING:
            if not flags & _ACK:
                self.out.append(_frame(_PING, _ACK, 0, payload))
        elif kind == _RST:
            st = self.streams.pop(sid, None)
            if st is not None:
                if st.script is not None:
                    self.core.count("streams_cancelled")
                _stop(st)
        elif kind == _GOAWAY:
            self.flush()
            self.transport.close()
            self.close()
            self.on_close()
        elif kind == _PUSH:
            raise ValueError("PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored (RFC 9113 5.5).

    # -- answering --

    def _dispatch(self, sid: int, st: _Stream) -> None:
        method = path = b""
        headers: list[Header] = []
        for k, v in st.headers:
            if k[:1] == b":":
                if k == b":method":
                    method = v
                elif k == b":path":
                    path = v
            else:
                headers.append((k, v))
        body = b"".join(st.body)
        st.body = []
        try:
            p, q = parse_target(path)
        except BadRequest:
            self._head(sid, Reply(400, ()), end=True)
            self.streams.pop(sid, None)
            return
        reply = self.core.handle(method.decode("latin-1"), p, q, headers, body)
        if method == b"HEAD":
            reply = Reply(reply.status, reply.headers, b"")
        if not (reply.cut or reply.first_byte_delay_s or reply.drip_s or reply.chunk_delay_s):
            data = reply.body if reply.chunks is None else b"".join(reply.chunks)
            self._head(sid, reply, end=not data)
            if data:
                self._send(sid, data, True)
            else:
                self.streams.pop(sid, None)
            if reply.chunks is not None:
                self.core.count("streams_completed")
            return
        st.script = self._play(sid, reply)
        self._advance(sid)

    def _head(self, sid: int, r: Reply, end: bool = False) -> None:
        key = (r.status, r.headers)
        block = _BLOCKS.get(key)
        if block is None:
            block = _BLOCKS[key] = _encode_block(r.headers, r.status)
        self.out.append(_frame(_HEADERS, _END_HEADERS | (_END_STREAM if end else 0), sid, block))

    def _send(self, sid: int, data: bytes, end: bool) -> None:
        st = self.streams.get(sid)
        if st is not None:
            if st.sent:  # rare: new bytes while a window-bound tail waits
                st.pending, st.sent = st.pending[st.sent :], 0
            st.pending += data
            st.end = st.end or end
            self._pump(sid, st)

    def _pump_all(self) -> None:
        for sid, st in list(self.streams.items()):
            if st.pending or st.end:
                self._pump(sid, st)

    def _pump(self, sid: int, st: _Stream) -> None:
        # DATA payloads are memoryview slices of `pending` at an offset, joined once by flush():
        # re-slicing the rest (`pending = pending[n:]`) per frame copied O(n^2) bytes, ~47 % of
        # the emulator's CPU on a 6.5 MB batchEmbedContents answer in 16 KiB frames (py-spy;
        # 197 ms CPU per request over h2c vs 91 ms over HTTP/1.1, 8 sequential requests).
        # bench.micro emulator_h2_large_body: 106 ms -> 0.95 ms to frame that answer.
        data = st.pending
        if data:
            view = memoryview(data)
            at, total = st.sent, len(data)
            out = self.out
            while at < total:
                n = min(st.window, self.peer_window, self.peer_max_frame, total - at)
                if n <= 0:
                    st.sent = at
                    return  # window shut: WINDOW_UPDATE calls _pump again
                st.window -= n
                self.peer_window -= n
                last = st.end and at + n == total
                out.append(_FRAME.pack(n, _DATA, _END_STREAM if last else 0, sid)[1:])
                out.append(view[at : at + n])
                at += n
            st.pending, st.sent = b"", 0
            if st.end:
                self.streams.pop(sid, None)
                return
        if st.end:
            self.out.append(_frame(_DATA, _END_STREAM, sid))
            self.streams.pop(sid, None)
        elif st.waiting and st.script is not None:  # paused on a full window: resume
            st.waiting = False
            st.timer = self.loop.call_soon(self._advance, sid)

    # -- timed replies --

    def _advance(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is None or st.script is None or self.closed:
            return
        st.timer = None
        try:
            delay = next(st.script)
        except StopIteration:
            st.script = None
        else:
            if delay is None:
                st.waiting = True
            else:
                st.timer = self.loop.call_later(delay, self._advance, sid)
        self.flush()

    def _reset(self, sid: int) -> None:
        self.streams.pop(sid, None)
        self.out.append(_frame(_RST, 0, sid, struct.pack(">I", _CANCEL)))

    def _play(self, sid: int, r: Reply) -> Generator[float | None, None, None]:
        stall = self.core.settings.stall_max_s
        if r.first_byte_delay_s:
            yield r.first_byte_delay_s
        if r.cut == "hang" or (r.cut == "stall" and r.chunks is None):
            yield stall
            self._reset(sid)
            return
        if r.cut == "reset":
            self._reset(sid)
            return
        self._head(sid, r)
        chunks = [r.body] if r.chunks is None else r.chunks
        stop = r.cut_after if r.cut in ("drop", "stall") and r.chunks is not None else len(chunks)
        if r.cut == "drop" and r.chunks is None:
            stop = 0
        for i, chunk in enumerate(chunks[:stop]):
            if i and r.chunk_delay_s:
                yield r.chunk_delay_s
            for piece in [chunk[j : j + 1] for j in range(len(chunk))] if r.drip_s else [chunk]:
                self._send(sid, piece, False)
                st = self.streams.get(sid)
                if st is not None and st.pending:
                    yield None  # resumed by _pump once the window opens
                if r.drip_s:
                    yield r.drip_s
        if r.cut == "stall":
            yield stall
        if r.cut:
            self._reset(sid)
            return
        if r.chunks is not None:
            self.core.count("streams_completed")
        self._send(sid, b"", True)


def _stop(st: _Stream) -> None:
    if st.timer is not None:
        st.timer.cancel()
        st.timer = None
    if st.script is not None:
        st.script.close()
        st.script = None
