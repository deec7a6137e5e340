"""The inbound HTTP/1.1 driver: h11 parses requests, this module writes responses.

Invariants:
- h11 parses every request (request line, headers, Content-Length and chunked bodies). Responses are
  written here from precomputed status lines and header blocks: h11's outbound path (event
  validation + state machine + writer) costs ~35 us per request on the bench box, a third of the
  whole budget of a /healthz (bench.micro: h1_head). Each request cycle gets a fresh h11.Connection
  that inherits the previous cycle's receive buffer (pipelined bytes are moved, never copied), so
  h11's client-side state machine runs in full and its server side is never used.
- Three tasks per connection. The reader is the only caller of receive(); the worker is the only
  writer and answers requests strictly in arrival order; the watchdog owns every timeout.
- The reader keeps reading while a handler runs. That is how pipelined requests queue up (at most
  limits.max_pipelined behind the one being answered, and at most limits.max_body_bytes of their
  bodies) and how a disconnect is seen at once: EOF or a reset cancels the connection's task
  group, the running handler included; the sink raises ClientDisconnected afterwards.
- The whole request body is collected (bounded by limits.max_body_bytes) before the handler runs,
  and only after the app's `admit_head` (auth on the head) accepted it: a refused head runs the
  app with an empty body (its 401), nothing of the body is read, and the connection closes.
  Bodies being collected count against ServerState.buffered_body_bytes, bounded process-wide by
  limits.max_buffered_body_bytes (503 on the head if the declared length does not fit, or as
  the bytes arrive); the count is given back when the handler takes the body or the exchange or
  connection ends, and every buffer is dropped when the connection ends (`_release`).
- A head is parsed only once its end (a blank line) is buffered, and that end is searched for in
  the bytes that arrived since the last search: a head trickled a few bytes at a time costs
  linear CPU. obs-fold in a request head is refused (400).
- Limits rawgate enforces itself, whatever h11 says: head bytes (431, counted on what h11 consumed,
  because h11 only checks heads that are still incomplete), header count (431), target length
  (414, checked first, so a long target is 414 whether its head arrived whole or in pieces),
  Content-Length over the body limit (413 before any body byte; no 100 Continue is sent),
  chunked bodies over it (413 as they arrive), Content-Length together with Transfer-Encoding (400:
  a smuggling shape). A driver-level error is answered in order, then the connection closes after
  a short lingering close (timeouts.lingering_close_s): framing after a bad request is not trusted.
- Timeouts are plain float deadlines checked by the watchdog: arming one is a float store, where a
  CancelScope costs ~4 us and fail_after ~12 us on the bench box (bench.bare_server: h1). Head
  (slowloris): 408, close. Body idle gap: 408, close. Keep-alive idle (header_read_s before the
  first request): quiet close. Write: send() returns only once the socket took the bytes (anyio's
  transports keep no buffer); no progress for timeouts.write_s aborts the connection.
- Keep-alive ends after the current response when: the client sent Connection: close or spoke
  HTTP/1.0, limits.max_requests_per_connection was reached, ServerState.draining is set, the
  handler left its response unfinished, or a response was framed by closing the connection.
- Response headers are the handler's (lower-case names, no hop-by-hop headers: seam.py). A CR or
  LF inside one is refused (response splitting) with one bytes.count over the block (bench.micro:
  h1_head).
- The sans-IO halves are http/h1_parse.py (the fast head parser, the end-of-head search, the
  limit checks) and http/h1_write.py (response heads and framing as bytes); h11's private
  buffer and header triples are reached only through compat.py.
  compat.fast_paths() is read once per connection: with it off, no fast head, no read of h11's
  buffer and no own body reader: every head and body goes through h11's next_event() and the
  unparsed bytes are read as trailing_data (bench.micro: h1_parse_post_public), same answers.
- Nothing escapes serve_h1 (cancellation aside), and it leaves no task behind.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import anyio
import h11

from rawgate import compat
from rawgate.compat import (
    h11_drop_unparsed,
    h11_header_items,
    h11_next_cycle,
    h11_take,
    h11_unparsed,
)
from rawgate.errors import (
    BadRequest,
    HeadersTooLarge,
    HTTPVersionNotSupported,
    InternalError,
    MethodNotImplemented,
    Overloaded,
    PayloadTooLarge,
    RawgateError,
    RequestTimeout,
)
from rawgate.http.h1_parse import (
    OBS_FOLD,
    FastHead,
    fast_head,
    h11_fields,
    head_end,
    head_error,
    overflow_error,
)
from rawgate.http.h1_write import (
    CHUNKED,
    CHUNKED_CLOSE,
    CONTINUE,
    END,
    END_CLOSE,
    LAST_CHUNK,
    LENGTH,
    LENGTH_CLOSE,
    NO_BODY,
    response_head,
)
from rawgate.http.server_stream import CONNECTION_GONE, close_stream
from rawgate.http.target import parse_target
from rawgate.respond import error_response
from rawgate.seam import ClientDisconnected, Header, Request, is_disconnect
from rawgate.wire import METHODS

if TYPE_CHECKING:
    from anyio.abc import ByteStream

    from rawgate.config import Config
    from rawgate.conn import ConnInfo, ServerState
    from rawgate.seam import App

__all__ = ["serve_h1"]

log = logging.getLogger("rawgate.h1")

# One receive() is at most this much: it bounds what one read can add to the parser's buffer.
_READ_BYTES = 64 * 1024
_INF = math.inf
# Closing a TLS stream may try to send close_notify to a peer that does not read: bounded.
_CLOSE_S = 1.0
# h11's error messages may quote the offending bytes; an error body must stay small.
_MAX_REASON_CHARS = 200

# What the read deadline means when it passes.
_IDLE, _HEAD, _BODY = 1, 2, 3

class _Wakeup:
    """A reusable wake-up for the one waiting worker task.

    (bench.bare_server: h1) On asyncio this is one asyncio.Event per connection, cleared after each
    wait; anyio.Event is one-shot and creating one costs ~5 us on the bench box (~1 us for
    asyncio.Event), once per keep-alive request. Other backends get a fresh anyio.Event per wait. A
    set() with nobody waiting is either kept (asyncio) or not needed: the worker looks at its queue
    before waiting.
    """

    __slots__ = ("_asyncio", "_event")

    def __init__(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio)
            self._asyncio: asyncio.Event | None = None
        else:
            self._asyncio = asyncio.Event()
        self._event: anyio.Event | None = None

    def set(self) -> None:
        if self._asyncio is not None:
            self._asyncio.set()
        elif self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        ev = self._asyncio
        if ev is not None:
            await ev.wait()
            ev.clear()
            return
        self._event = anyio.Event()
        try:
            await self._event.wait()
        finally:
            self._event = None


class _Exchange:
    """One request/response cycle: the parsed head, the collected body and the ResponseSink."""

    __slots__ = (
        "_bytes_sent",
        "_c",
        "_chunked",
        "_drop_body",
        "_ended",
        "_remaining",
        "_started",
        "_status",
        "body",
        "body_size",
        "close",
        "continue_sent",
        "done",
        "error",
        "event",
        "expect_100",
        "headers",
        "http_version",
        "is_head",
        "method",
        "path",
        "query",
        "target",
        "unread",
    )

    def __init__(self, c: _Conn) -> None:
        self._c = c
        self.method = ""
        self.target = b""
        self.path = ""
        self.query = ""
        self.headers: list[Header] = []
        self.http_version = "1.1"
        self.is_head = False
        self.body: list[bytes | bytearray] = []
        self.body_size = 0
        self.done = False  # the whole body arrived (or there is none)
        self.unread = False  # the head was refused (401): its body is never read
        self.error: RawgateError | None = None  # answer this instead, then close
        self.event: anyio.Event | None = None  # the worker waits on it for the body
        self.expect_100 = False
        self.continue_sent = False
        self.close = False  # the connection closes after this response
        self._started = False
        self._ended = False
        self._drop_body = False  # HEAD, 204, 304: body bytes from the handler are dropped
        self._chunked = False
        self._remaining: int | None = None  # declared Content-Length still to send
        self._status = 0
        self._bytes_sent = 0

    def __repr__(self) -> str:
        return (
            f"<h1 exchange {self.method} {self.path} status={self._status}"
            f" started={self._started} ended={self._ended} close={self.close}>"
        )

    # ---- ResponseSink ---------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    @property
    def status(self) -> int:
        return self._status

    def _begin(self) -> bool:
        """Checks before a head goes out; returns whether the connection closes after it."""
        if self._started:
            raise RuntimeError("response already started")
        c = self._c
        if c.dead:
            raise ClientDisconnected("connection lost")
        if not self.close and c.draining.is_set():
            self.close = True
        return self.close

    async def start(self, status: int, headers: list[Header]) -> None:
        close = self._begin()
        length: int | None = None
        for k, v in headers:
            if k == b"content-length":  # the handler knows its length: no chunked framing
                length = int(v)
        if status in NO_BODY or self.is_head:
            framing = END_CLOSE if close else END
            if status in NO_BODY:
                length = None
            elif length is None and self.http_version == "1.1":
                # A HEAD answer shows the framing the GET would have had.
                framing = CHUNKED_CLOSE if close else CHUNKED
            self._drop_body = True
        elif length is not None:
            framing = END_CLOSE if close else END
            self._remaining = length
        elif self.http_version == "1.1":
            framing = CHUNKED_CLOSE if close else CHUNKED
            self._chunked = True
        else:
            # HTTP/1.0 has no chunked coding: the body ends when the connection does.
            self.close = True
            framing = END_CLOSE
        data = response_head(status, headers, framing)
        self._started = True
        self._status = status
        self._ended = self._drop_body
        await self._c.write(data)

    async def respond(self, status: int, headers: list[Header], body: bytes) -> None:
        close = self._begin()
        n = len(body)
        if status in NO_BODY:
            data = response_head(status, headers, END_CLOSE if close else END)
        else:
            data = response_head(status, headers, (LENGTH_CLOSE if close else LENGTH) % n)
            if n and not self.is_head:
                data += body  # (bench.bare_server: h1) head and body leave in one socket write
                self._bytes_sent = n
        self._started = True
        self._ended = True
        self._status = status
        await self._c.write(data)

    async def send(self, data: bytes) -> None:
        if not self._started:
            raise RuntimeError("send() before start()")
        if self._ended:
            if self._drop_body:
                return  # HEAD / 204 / 304: the handler's bytes are dropped
            raise RuntimeError("send() after end()")
        n = len(data)
        if not n:
            return
        if self._chunked:
            data = b"".join((b"%x\r\n" % n, data, END))
        elif self._remaining is not None:
            if n > self._remaining:
                raise RuntimeError("more body than the declared content-length")
            self._remaining -= n
        self._bytes_sent += n
        await self._c.write(data)

    async def end(self, data: bytes = b"") -> None:
        if not self._started:
            raise RuntimeError("end() before start()")
        if self._ended:
            if self._drop_body:
                return
            raise RuntimeError("end() called twice")
        n = len(data)
        if self._chunked:
            data = b"".join((b"%x\r\n" % n, data, b"\r\n", LAST_CHUNK)) if n else LAST_CHUNK
        elif self._remaining is not None:
            if n > self._remaining:
                raise RuntimeError("more body than the declared content-length")
            self._remaining -= n
            if self._remaining:
                # Shorter than declared: only closing the connection tells the client.
                self.close = True
        self._ended = True
        self._bytes_sent += n
        if data:
            await self._c.write(data)


class _Conn:
    """One HTTP/1.1 connection: reader, worker and watchdog around a queue of exchanges."""

    __slots__ = (
        "_admit",
        "_app",
        "_body_s",
        "_budget",
        "_buffered",
        "_cur",
        "_ev",
        "_fast",
        "_h",
        "_h_used",
        "_head_s",
        "_head_t",
        "_idle_s",
        "_idle_t",
        "_info",
        "_length_left",
        "_lim",
        "_linger_s",
        "_max_body",
        "_max_head",
        "_max_pipelined",
        "_max_requests",
        "_queue",
        "_read_deadline",
        "_read_kind",
        "_requests",
        "_room",
        "_scanned",
        "_scopes",
        "_state",
        "_stream",
        "_tick",
        "_work",
        "_write_deadline",
        "_write_s",
        "dead",
        "discard",
        "draining",
    )

    def __init__(
        self, stream: ByteStream, app: App, cfg: Config, info: ConnInfo, state: ServerState
    ) -> None:
        lim = cfg.limits
        t = cfg.timeouts
        self._stream = stream
        self._app = app
        self._info = info
        self._state = state
        self.draining = state.draining
        self._lim = lim
        self._max_head = lim.max_header_bytes
        self._max_body = lim.max_body_bytes
        self._budget: float = lim.max_buffered_body_bytes or _INF
        # The app's auth decision on a head alone (GatewayApp.admit_head), asked before a body
        # is read; apps without one get every body.
        self._admit: Callable[[str, str, str, list[Header]], bool] | None = getattr(
            app, "admit_head", None
        )
        self._max_pipelined = max(1, lim.max_pipelined)
        self._max_requests = lim.max_requests_per_connection
        # A timeout of 0 means "off": an infinite deadline.
        self._head_s = t.header_read_s or _INF
        self._body_s = t.body_read_s or _INF
        self._idle_s = t.keepalive_idle_s or _INF
        self._write_s = t.write_s or _INF
        self._linger_s = t.lingering_close_s
        # The watchdog never sleeps longer than the shortest timeout, so a deadline armed while
        # it sleeps is never seen late (a new deadline is at least that far in the future).
        self._tick = min(self._head_s, self._body_s, self._idle_s, self._write_s)
        # Read once per connection: with it off only h11's public API is used (compat).
        self._fast = compat.fast_paths()
        self._h = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        self._ev: h11.Request | None = None  # the head _h11_head just parsed
        self._h_used = False  # h11 parsed a head: the next cycle needs a fresh h11.Connection
        self._queue: deque[_Exchange] = deque()
        self._cur: _Exchange | None = None  # receiving its body
        self._length_left = 0  # Content-Length body bytes still to come for _cur (0: chunked)
        self._head_t: float | None = None  # when the first byte of the pending head arrived
        self._scanned = 0  # leading bytes of the pending head known to hold no end of head
        self._idle_t = time.monotonic()
        self._read_deadline = _INF
        self._read_kind = 0
        self._write_deadline = _INF
        self._work = _Wakeup()  # the worker waits on it for a request
        self._room: anyio.Event | None = None  # the reader waits for queue room
        self._buffered = 0  # body bytes held for exchanges not yet handed to the app
        self._requests = 0
        # One scope per task (reader, watchdog, worker). The connection ends by cancelling them,
        # not the task group: a task whose own scope caught the cancellation returns normally.
        # A child task that dies of CancelledError is kept, with its exception, in a cycle
        # inside anyio's task_done (exception -> traceback -> task_done frame -> exception),
        # and that traceback holds the child's frame, hence this _Conn and every body it
        # buffers: an aborted 31 MiB upload stayed alive until some later full collection.
        self._scopes = (anyio.CancelScope(), anyio.CancelScope(), anyio.CancelScope())
        self.discard = False  # nothing more will be answered: read only to see EOF
        self.dead = False  # the peer is gone or stuck: nothing more can be written

    # ---- output ---------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        if self.dead:
            raise ClientDisconnected("connection lost")
        # (bench.bare_server: h1) a float store instead of fail_after(); the watchdog aborts
        # if it passes.
        self._write_deadline = time.monotonic() + self._write_s
        try:
            await self._stream.send(data)
        except CONNECTION_GONE:
            self.dead = True
            raise ClientDisconnected("connection lost") from None
        finally:
            self._write_deadline = _INF

    def _cancel(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    # ---- input ----------------------------------------------------------------------------

    def _should_pause(self) -> bool:
        return len(self._queue) > self._max_pipelined or self._buffered > self._max_body

    async def _reader(self, initial: bytes) -> None:
        if initial:
            self._feed(initial)
        receive = self._stream.receive
        while True:
            if self._should_pause() and not self.discard:
                ev = self._room = anyio.Event()
                self._arm_read()
                await ev.wait()  # the worker clears self._room when it sets the event
                self._parse()
                self._arm_read()
                continue
            try:
                data = await receive(_READ_BYTES)
            except CONNECTION_GONE:
                # EOF or reset: the client is gone. Whatever runs for it stops now.
                self.dead = True
                self._cancel()
                return
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self.discard:
            return
        self._h.receive_data(data)
        self._parse()
        self._arm_read()

    def _parse(self) -> None:
        """Turn buffered bytes into exchanges and body pieces until more bytes are needed."""
        if not self._fast:
            self._parse_public()
            return
        while not self.discard:
            h = self._h
            ex = self._cur
            if ex is None:
                # h11's unparsed bytes (compat): their length before and after the head is the
                # exact number of head bytes.
                data = h11_unparsed(h)
                before = len(data)
                if not before:
                    self._head_t = None
                    self._scanned = 0
                    return
                if self._should_pause():
                    return  # parse the rest once the worker has caught up
                # (tests/e2e/test_server_reliability.py: bytes scanned) Nothing parses a head before
                # its end is here, and the search for that end starts where the last one stopped: a
                # head sent a few bytes at a time is scanned once, not once per read (the fast
                # regex rescanned all of it every time).
                end = head_end(data, self._scanned)
                if end < 0:
                    self._scanned = before
                    if self._head_t is None:
                        self._head_t = time.monotonic()
                    if before > self._max_head:
                        self._fail(self._overflow_error(data))
                    return
                self._scanned = 0
                fast = fast_head(data)
                if fast is not None:
                    self._head_t = None
                    h11_take(h, fast.size)  # consumes the head
                    self._on_fast_head(fast)
                    continue
                if not self._h11_head(data, end):
                    return
                self._on_head(cast(h11.Request, self._ev), before - len(h11_unparsed(h)))
                continue
            left = self._length_left
            if left:
                # (bench.micro: h1_parse_post) A Content-Length body is taken straight from
                # h11's buffer (compat): h11's Data + EndOfMessage events cost two state-machine
                # rounds per request.
                piece = h11_take(h, left)
                if piece is None:
                    return
                self._length_left = left - len(piece)
                if not self._add_body(ex, piece):
                    return
                if not self._length_left:
                    self._end_body(ex)
                continue
            if not self._h11_body(ex):
                return

    def _parse_public(self) -> None:
        """_parse on h11's public API alone (compat.fast_paths() off): every head and body goes
        through next_event(), and the unparsed bytes are read as trailing_data (a copy, made
        once per read while a head is pending and twice per head)."""
        while not self.discard:
            h = self._h
            ex = self._cur
            if ex is None:
                data = h.trailing_data[0]
                before = len(data)
                if not before:
                    self._head_t = None
                    self._scanned = 0
                    return
                if self._should_pause():
                    return
                end = head_end(data, self._scanned)
                if end < 0:
                    self._scanned = before
                    if self._head_t is None:
                        self._head_t = time.monotonic()
                    if before > self._max_head:
                        self._fail(self._overflow_error(data))
                    return
                self._scanned = 0
                if not self._h11_head(data, end):
                    return
                after = len(h.trailing_data[0])
                self._on_head(cast(h11.Request, self._ev), before - after)
                continue
            if not self._h11_body(ex):
                return

    def _h11_head(self, data: bytes | bytearray, end: int) -> bool:
        """h11 parses the complete head at the start of `data` (its end at `end`) into self._ev;
        False when the connection cannot go on (the error is queued)."""
        if OBS_FOLD.search(data, 0, end) is not None:
            # h11 joins a folded line to the previous value, so a folded Authorization would
            # reach auth as one header that no proxy in front of us saw.
            self._fail(BadRequest("obsolete line folding in the request head"))
            return False
        h = self._h
        try:
            ev = h.next_event()
        except h11.RemoteProtocolError as e:
            self._fail(_protocol_error(e, h))
            return False
        if ev is h11.NEED_DATA:  # cannot happen: the head's end is buffered
            if self._head_t is None:
                self._head_t = time.monotonic()
            return False
        self._head_t = None
        if type(ev) is not h11.Request:  # cannot happen: no EOF is ever fed to h11
            self._fail(BadRequest("unexpected HTTP/1.1 event"))
            return False
        self._h_used = True
        self._ev = ev
        return True

    def _h11_body(self, ex: _Exchange) -> bool:
        """One body event from h11 (chunked bodies; every body with fast paths off); False when
        more bytes are needed or the body failed."""
        try:
            ev = self._h.next_event()
        except h11.RemoteProtocolError as e:
            self._body_error(ex, BadRequest(_reason("malformed request body", e)))
            return False
        t = type(ev)
        if t is h11.Data:
            return self._add_body(ex, cast(h11.Data, ev).data)
        if t is h11.EndOfMessage:
            self._end_body(ex)
            return True
        return False  # NEED_DATA (PAUSED cannot happen before EndOfMessage)

    def _add_body(self, ex: _Exchange, data: bytes | bytearray) -> bool:
        n = len(data)
        if ex.body_size + n > self._max_body:
            self._body_error(ex, PayloadTooLarge.body_over(self._max_body))
            return False
        state = self._state
        if state.buffered_body_bytes + n > self._budget:
            self._body_error(ex, Overloaded.body_budget())
            return False
        ex.body_size += n
        self._buffered += n
        state.buffered_body_bytes += n
        ex.body.append(data)
        return True

    def _end_body(self, ex: _Exchange) -> None:
        ex.done = True
        self._cur = None
        if ex.close:
            self.discard = True  # nothing after this request is answered
        # (no micro case: pipelining) The next cycle parses with a fresh h11.Connection that
        # takes over this one's buffer (compat): pipelined bytes are moved, not copied, so n
        # pipelined requests in one read cost O(n), not O(n^2) as trailing_data's copies would.
        # After a fast-parsed head h11 saw no event and is still IDLE: it is kept.
        if self._h_used:
            self._h_used = False
            h = self._h
            if self._fast:
                self._h = h11_next_cycle(h, self._max_head)
            else:
                nxt = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
                rest = h.trailing_data[0]
                if rest:
                    nxt.receive_data(rest)
                self._h = nxt
        if ex.event is not None:
            ex.event.set()

    def _new_exchange(self) -> _Exchange:
        ex = _Exchange(self)
        self._requests += 1
        if self._max_requests and self._requests >= self._max_requests:
            ex.close = True  # bounds what one connection can make us do
        return ex

    def _head_error(self, head_bytes: int, n_headers: int, target: bytes) -> RawgateError | None:
        lim = self._lim
        return head_error(
            head_bytes,
            n_headers,
            target,
            max_url=lim.max_url_bytes,
            max_head=self._max_head,
            max_count=lim.max_header_count,
        )

    def _overflow_error(self, data: bytes | bytearray) -> RawgateError:
        return overflow_error(data, max_url=self._lim.max_url_bytes, max_head=self._max_head)

    def _on_head(self, ev: h11.Request, head_bytes: int) -> None:
        ex = self._new_exchange()
        version = ev.http_version
        if version != b"1.1":
            ex.http_version = "1.0"
            ex.close = True  # h11 (and rawgate) keep HTTP/1.0 connections for one request
            if version != b"1.0":  # h11 accepts any digit.digit
                self._reject(ex, _version_error(version))
                return
        method = ev.method
        ex.is_head = method == b"HEAD"
        target = ev.target
        if self._fast:
            # (no micro case) h11's own header triples, no __getitem__ per header.
            headers = [(name, value) for _, name, value in h11_header_items(ev)]
        else:
            headers = list(ev.headers)
        err = self._head_error(head_bytes, len(headers), target)
        if err is not None:
            self._reject(ex, err)
            return
        length, chunked, close = h11_fields(headers)
        if close:
            ex.close = True
        self._start(ex, method, target, headers, length, chunked, h11_expect=True)

    def _on_fast_head(self, head: FastHead) -> None:
        """A head parsed by fast_head: HTTP/1.1, no transfer-encoding, no expect."""
        ex = self._new_exchange()
        ex.is_head = head.method == b"HEAD"
        headers = head.headers
        err = self._head_error(head.size, len(headers), head.target)
        if err is not None:
            self._reject(ex, err)
            return
        if head.close:
            ex.close = True
        self._start(ex, head.method, head.target, headers, head.length, False, h11_expect=False)

    def _start(
        self,
        ex: _Exchange,
        method: bytes,
        target: bytes,
        headers: list[Header],
        length: bytes | None,
        chunked: bool,
        *,
        h11_expect: bool,
    ) -> None:
        """Queue a parsed, size-checked head; then take its body (or end it at once)."""
        size = int(length) if length is not None else 0
        err: RawgateError | None = None
        if chunked and length is not None:
            # Two framings at once is the request-smuggling shape; h11 would let TE win.
            err = BadRequest("both Content-Length and Transfer-Encoding sent")
        elif size > self._max_body:
            err = PayloadTooLarge.body_over(self._max_body)
        else:
            try:
                ex.path, ex.query = parse_target(target)
            except BadRequest as e:
                err = e
        if err is not None:
            self._reject(ex, err)
            return
        known = METHODS.get(method)
        ex.method = known if known is not None else method.decode("ascii")  # h11: a token
        ex.target = target
        ex.headers = headers
        if chunked or size:
            admit = self._admit
            if admit is not None and not admit(ex.method, ex.path, ex.query, headers):
                # Auth fails on the head: the app answers 401 now, no body byte is read, and the
                # connection closes (after a lingering close) since its framing is not consumed.
                ex.unread = True
                ex.close = True
                self._enqueue(ex)
                self._end_body(ex)
                return
            if size > self._budget - self._state.buffered_body_bytes:
                self._reject(ex, Overloaded.body_budget())
                return
        # A fast-parsed head has no expect header (h1_parse.fast_head hands those to h11).
        ex.expect_100 = h11_expect and self._h.they_are_waiting_for_100_continue
        self._enqueue(ex)
        self._cur = ex
        if chunked:
            self._length_left = 0
        elif size:
            # With fast paths off h11 frames Content-Length bodies too (_length_left stays 0).
            self._length_left = size if self._fast else 0
        else:
            # (bench.micro: h1_parse_get) No body: the request is complete now, without asking
            # h11 for EndOfMessage.
            self._end_body(ex)

    def _enqueue(self, ex: _Exchange) -> None:
        self._queue.append(ex)
        self._work.set()

    def _reject(self, ex: _Exchange, err: RawgateError) -> None:
        ex.error = err
        ex.done = True
        ex.close = True
        self.discard = True
        self._enqueue(ex)

    def _fail(self, err: RawgateError) -> None:
        """An error before any request head could be parsed: answer it in order, then close."""
        self._reject(_Exchange(self), err)

    def _body_error(self, ex: _Exchange, err: RawgateError) -> None:
        ex.error = err
        ex.close = True
        self._buffered -= ex.body_size
        self._state.buffered_body_bytes -= ex.body_size
        ex.body = []
        ex.body_size = 0
        self._cur = None
        self.discard = True
        if ex.event is not None:
            ex.event.set()

    # ---- deadlines ------------------------------------------------------------------------

    def _arm_read(self) -> None:
        """Recompute the read deadline from the connection's state (a float store)."""
        if self.discard or self._room is not None:
            self._read_deadline = _INF  # not reading on purpose: nothing to time
            return
        ex = self._cur
        if ex is not None:
            if ex.expect_100 and not ex.continue_sent and not ex.body_size:
                self._read_deadline = _INF  # the client waits for our 100 Continue
            else:
                self._read_deadline = time.monotonic() + self._body_s
                self._read_kind = _BODY
        elif self._head_t is not None:
            self._read_deadline = self._head_t + self._head_s
            self._read_kind = _HEAD
        elif not self._queue:
            # Before the first request a connection gets header_read_s, not the keep-alive
            # allowance: a connection that never sends is the cheapest slowloris.
            wait = self._idle_s if self._requests else self._head_s
            self._read_deadline = self._idle_t + wait
            self._read_kind = _IDLE
        else:
            self._read_deadline = _INF  # a request is being answered

    async def _watchdog(self) -> None:
        draining = self.draining
        drain_seen = False
        while True:
            now = time.monotonic()
            if self._write_deadline <= now:
                log.info(
                    "h1 client %s: no write progress for %g s; closing",
                    self._info.client,
                    self._write_s,
                )
                self.dead = True
                self._cancel()
                return
            if self._read_deadline <= now:
                self._expire_read()
                continue
            if not drain_seen and draining.is_set():
                drain_seen = True
                if not self._queue:
                    self._cancel()  # idle (or half a head): nothing in flight to finish
                    return
            wait = min(self._read_deadline, self._write_deadline, now + self._tick) - now
            if drain_seen:
                if wait == _INF:
                    await anyio.sleep_forever()
                await anyio.sleep(wait)
            else:
                with anyio.move_on_after(wait):
                    await draining.wait()

    def _expire_read(self) -> None:
        kind = self._read_kind
        self._read_deadline = _INF
        if kind == _IDLE:
            self._cancel()  # quiet close: no request was in progress
        elif kind == _HEAD:
            self._fail(RequestTimeout(f"request head not received within {self._head_s:g} s"))
        elif kind == _BODY and self._cur is not None:
            self._body_error(
                self._cur, RequestTimeout(f"no request body bytes for {self._body_s:g} s")
            )

    # ---- the worker -----------------------------------------------------------------------

    async def _worker(self) -> None:
        q = self._queue
        try:
            while True:
                if not q:
                    if self.discard:
                        return  # the last request said close; nothing else will come
                    self._idle_t = time.monotonic()
                    self._arm_read()
                    await self._work.wait()
                    continue
                ex = q[0]
                if ex.error is None and not ex.done:
                    await self._wait_body(ex)
                if ex.error is not None:
                    await self._answer_error(ex)
                    return
                await self._run(ex)
                q.popleft()
                if ex.unread and not self.dead:
                    await self._linger()  # the refused body may still be on its way
                if ex.close or self.dead or self.draining.is_set():
                    return
                room = self._room
                if room is not None and not self._should_pause():
                    self._room = None
                    room.set()
        except ClientDisconnected:
            return

    async def _wait_body(self, ex: _Exchange) -> None:
        if ex.expect_100 and not ex.continue_sent and not ex.body_size:
            ex.continue_sent = True
            await self.write(CONTINUE)
            self._arm_read()  # the body clock starts now
        while not ex.done and ex.error is None:
            ev = ex.event = anyio.Event()
            await ev.wait()
        ex.event = None

    async def _answer_error(self, ex: _Exchange) -> None:
        assert ex.error is not None
        ex.close = True
        await error_response(ex, ex.error)
        await self._linger()

    async def _linger(self) -> None:
        # Lingering close: the client may still be sending the body we refused. Closing with
        # unread bytes makes the kernel send RST, which can destroy our answer in the client's
        # receive buffer. Half-close, keep reading (and dropping) until EOF or the timeout.
        if self._linger_s > 0:
            with anyio.move_on_after(self._linger_s):
                try:
                    await self._stream.send_eof()
                except (NotImplementedError, *CONNECTION_GONE):
                    pass  # TLS has no half-close: the client sees connection: close
                await anyio.sleep(self._linger_s)  # the reader's EOF cancels this early

    async def _run(self, ex: _Exchange) -> None:
        # Always a join: h11's pieces are bytearrays, and the app gets bytes.
        body = b"".join(ex.body) if ex.body else b""
        ex.body = []
        self._buffered -= ex.body_size
        self._state.buffered_body_bytes -= ex.body_size
        info = self._info
        request = Request(
            ex.method,
            ex.target,
            ex.path,
            ex.query,
            ex.headers,
            body,
            http_version=ex.http_version,
            scheme=info.scheme,
            client=info.client,
        )
        state = self._state
        state.in_flight += 1
        try:
            await self._app(request, ex)
        except Exception as e:
            if is_disconnect(e) or self.dead:
                ex.close = True
                return
            log.exception("h1 handler failed: %s", request)
            if not ex._started:
                await error_response(ex, InternalError("internal server error"))
            elif not ex._ended:
                ex.close = True
            return
        finally:
            state.in_flight -= 1
        if not ex._started:
            log.error("handler returned without a response: %s", request)
            await error_response(ex, InternalError("the handler sent no response"))
        elif not ex._ended:
            ex.close = True  # the client cannot tell where this response ends otherwise

    # ---- lifecycle ------------------------------------------------------------------------

    async def run(self, initial: bytes, waited: float = 0.0) -> None:
        # The time the listener spent reading `initial` counts: header_read_s runs from the
        # connection's first byte, not from here.
        if initial:
            self._head_t = time.monotonic() - waited
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run_reader, initial)
                tg.start_soon(self._run_watchdog)
                with self._scopes[2]:
                    await self._worker()
                self._cancel()
        finally:
            self._release()
            await self._close_stream()

    async def _run_reader(self, initial: bytes) -> None:
        with self._scopes[0]:
            await self._reader(initial)

    async def _run_watchdog(self) -> None:
        with self._scopes[1]:
            await self._watchdog()

    def _release(self) -> None:
        """Drop every buffer the connection holds, at once, when it ends.

        An exchange left in the queue (an aborted upload) points back at this _Conn (ex._c):
        a cycle that refcounting never frees, so it is emptied here. And whatever may still point
        at the _Conn (a handler's sink, a cancellation from outside that killed the tasks: see
        _scopes), the bytes go now, not at some later collection."""
        self._state.buffered_body_bytes -= self._buffered
        self._buffered = 0
        for ex in self._queue:
            ex.body = []
        if self._cur is not None:
            self._cur.body = []
        self._queue.clear()
        self._cur = None
        if self._fast:
            h11_drop_unparsed(self._h)
        else:  # public API: the old Connection (and its bytes) goes with the last reference
            self._h = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)

    async def _close_stream(self) -> None:
        await close_stream(self._stream, _CLOSE_S)


def _reason(prefix: str, e: h11.RemoteProtocolError) -> str:
    text = str(e)
    if len(text) > _MAX_REASON_CHARS:
        text = text[:_MAX_REASON_CHARS] + "..."
    return f"{prefix}: {text}"


def _version_error(version: bytes) -> RawgateError:
    return HTTPVersionNotSupported(
        f"HTTP/{version.decode('ascii', 'replace')} is not supported; use HTTP/1.1 or HTTP/2"
    )


def _protocol_error(e: h11.RemoteProtocolError, h: h11.Connection) -> RawgateError:
    hint = e.error_status_hint
    if hint == 431:  # not expected: h11 only sees heads whose end is buffered (_overflow_error)
        return HeadersTooLarge("request head too large")
    if hint == 501:
        return MethodNotImplemented(_reason("not implemented", e))
    return BadRequest(_reason("malformed HTTP/1.1 request", e))


async def serve_h1(
    stream: ByteStream,
    app: App,
    cfg: Config,
    info: ConnInfo,
    state: ServerState,
    initial: bytes = b"",
    waited: float = 0.0,
) -> None:
    """Serve one HTTP/1.1 connection until it closes. Never raises (cancellation aside).

    `initial` holds bytes the listener already read while sniffing for the h2c preface, in
    `waited` seconds (they count against timeouts.header_read_s). The stream is closed on
    return.
    """
    state.open_connections["h1"] += 1
    try:
        conn = _Conn(stream, app, cfg, info, state)
        await conn.run(initial, waited)
    except Exception:
        log.exception("h1 connection from %s failed", info.client)
    finally:
        state.open_connections["h1"] -= 1
