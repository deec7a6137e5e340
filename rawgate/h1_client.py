"""The upstream HTTP/1.1 connection: one h11.Connection(CLIENT) driven by the caller's task.

Invariants:
- One exchange at a time (capacity 1); no background task: the caller's own reads drive h11.
- A connection goes back to the pool as IDLE only when both sides of the previous exchange ended
  cleanly (h11 DONE/DONE and no `Connection: close`). Anything else (an error, a timeout,
  cancellation, a body the caller abandoned) closes it: a half-read response would otherwise be
  read by the next request as its own answer.
- Every exchange releases its pool slot exactly once, on every path.
- A reused connection whose first write fails was closed by the peer before it saw a byte of
  this request: that raises StaleConnection (retried once by the client). A reused connection
  that hits EOF after the request was written is NOT retried: the server may have acted on it.
- Timeouts: the response head must arrive within upstream_headers_s of the request being
  written (UpstreamHeadersTimeout); then each gap between body reads is bounded by
  upstream_read_idle_s (UpstreamReadTimeout), never the total; writes by upstream_write_s.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import h11

from rawgate.errors import (
    UpstreamClosed,
    UpstreamHeadersTimeout,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamTimeout,
)
from rawgate.pool import ConnState, StaleConnection

if TYPE_CHECKING:
    from rawgate.backends import NetworkStream
    from rawgate.config import TimeoutsConfig, UpstreamConfig
    from rawgate.pool import OriginPool

__all__ = ["H1Connection", "H1Exchange"]

Header = tuple[bytes, bytes]

# One read is at most this much: a typical SSE chunk is < 1 KiB, a non-stream reply tens of
# KiB; 64 KiB takes those in one syscall without holding megabytes per connection.
READ_BYTES = 64 * 1024
# Bodies up to this are sent in the same write as the head (one syscall, one TCP segment for
# a typical 2-10 KiB chat request); bigger ones are written separately to avoid a copy.
COALESCE_BODY_BYTES = 64 * 1024
_NEED_DATA = h11.NEED_DATA
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


class H1Connection:
    http2 = False
    capacity = 1

    __slots__ = (
        "_error",
        "_gap_end",
        "_h11",
        "_idle_s",
        "_stream",
        "_t",
        "authority",
        "id",
        "idle_since",
        "in_use",
        "pool",
        "requests",
        "state",
    )

    def __init__(
        self,
        conn_id: int,
        stream: NetworkStream,
        pool: OriginPool,
        authority: bytes,
        cfg: UpstreamConfig,
        timeouts: TimeoutsConfig,
    ) -> None:
        self.id = conn_id
        self._stream = stream
        self.pool = pool
        self.authority = authority
        self._t = timeouts
        self._idle_s = timeouts.upstream_read_idle_s
        self._h11 = h11.Connection(
            h11.CLIENT, max_incomplete_event_size=cfg.max_response_header_bytes
        )
        self.state = ConnState.IDLE
        self.in_use = 0
        self.idle_since = time.monotonic()
        self.requests = 0
        self._error: UpstreamClosed | None = None  # met after data: raised by the next read
        self._gap_end = 0.0  # when the current silence hits upstream_read_idle_s (0: no gap)

    def is_stale(self) -> bool:
        # Idle and readable means the server sent EOF (or junk) between exchanges.
        return self._stream.is_readable()

    async def aclose(self) -> None:
        self.state = ConnState.CLOSED
        await self._stream.aclose()

    def __repr__(self) -> str:
        return f"<H1Connection #{self.id} {self.state.name} requests={self.requests}>"

    async def start(
        self, method: bytes, target: bytes, headers: list[Header], body: bytes
    ) -> H1Exchange:
        """Send one request and return once the response head arrived. The caller holds one
        pool slot on this connection; from here on this method owns it (released on error)."""
        h = self._h11
        reused = self.requests > 0
        self.requests += 1
        hdrs = [(b"host", self.authority), *headers]
        if body or method in _BODY_METHODS:
            hdrs.append((b"content-length", b"%d" % len(body)))
        try:
            try:
                head = h.send(h11.Request(method=method, target=target, headers=hdrs))
                # passthrough: h11 frames the body without joining it into a copy
                parts = h.send_with_data_passthrough(h11.Data(data=body)) if body else []
                tail = h.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                # h11's message quotes the offending value, which may be an API key.
                raise UpstreamProtocolError(
                    "invalid request header name or value for the upstream"
                ) from None
            assert head is not None and tail is not None
            try:
                if len(body) > COALESCE_BODY_BYTES:
                    for part in (head, *(parts or ()), tail):
                        if part:
                            await self._stream.write(bytes(part), self._t.upstream_write_s)
                else:
                    data = b"".join((head, *(parts or ()), tail))
                    await self._stream.write(data, self._t.upstream_write_s)
            except UpstreamClosed:
                if reused:
                    raise StaleConnection() from None
                raise
            status, resp_headers, version = await self._read_head()
        except BaseException:
            await self._drop()
            raise
        return H1Exchange(self, status, resp_headers, version)

    async def _read_head(self) -> tuple[int, list[Header], str]:
        h = self._h11
        stream = self._stream
        deadline = time.monotonic() + self._t.upstream_headers_s
        got_any = False
        while True:
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError as e:
                if got_any:
                    raise UpstreamProtocolError(f"bad response head from upstream: {e}") from None
                raise UpstreamClosed("upstream closed the connection before answering") from None
            if ev is _NEED_DATA:
                data = await stream.read(
                    READ_BYTES, deadline - time.monotonic(), UpstreamHeadersTimeout
                )
                got_any = got_any or bool(data)
                h.receive_data(data)
                continue
            if type(ev) is h11.Response:
                return ev.status_code, list(ev.headers), "HTTP/" + ev.http_version.decode()
            if type(ev) is h11.ConnectionClosed:
                raise UpstreamClosed("upstream closed the connection before answering")
            # InformationalResponse (100 Continue, 103 Early Hints): wait for the real one.

    async def _receive(self, quiet_s: float | None) -> tuple[bytes, bool] | None:
        """(body bytes, ended): every Data event h11 can already parse, joined, before waiting
        for the next read; ended once EndOfMessage was seen (the connection is then released
        and must not be touched again by this exchange). None: nothing arrived for quiet_s
        (upstream_read_idle_s still counts from the last data).

        (1) One piece per read instead of one per chunked-encoding chunk: an SSE stream whose
        events arrive together costs the caller one async step and one downstream write per
        read, not one per event (stream-chat c=16 over an HTTP/1.1 upstream: 100 steps per
        stream -> ~3). An error met after some data is kept and raised by the next call, so
        the data parsed before it still reaches the caller first."""
        h = self._h11
        err = self._error
        if err is not None:
            self._error = None
            raise err
        parts: list[bytes] = []
        while True:
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError as e:
                err = UpstreamClosed(f"upstream response body cut short: {e}")
            else:
                tp = type(ev)
                if tp is h11.Data:
                    if ev.data:  # type: ignore[union-attr]
                        parts.append(ev.data)  # type: ignore[union-attr]
                    continue
                if ev is _NEED_DATA:
                    if parts:
                        break
                    if quiet_s is None:
                        h.receive_data(await self._stream.read(READ_BYTES, self._idle_s))
                        continue
                    got = await self._read_within(quiet_s)
                    if got is None:
                        return None
                    self._gap_end = 0.0
                    h.receive_data(got)
                    continue
                if tp is h11.EndOfMessage:
                    await self._finish()
                    return _join(parts), True
                if tp is h11.ConnectionClosed:
                    err = UpstreamClosed("upstream closed the connection mid-body")
                else:
                    continue
            if not parts:
                raise err from None
            self._error = err
            break
        return _join(parts), False

    async def _read_within(self, quiet_s: float) -> bytes | None:
        idle = self._idle_s
        now = time.monotonic()
        if not self._gap_end:
            self._gap_end = now + idle
        left = self._gap_end - now
        if quiet_s < left:
            try:
                return await self._stream.read(READ_BYTES, quiet_s, _Quiet)
            except _Quiet:
                return None
        try:
            return await self._stream.read(READ_BYTES, max(0.0, left))
        except UpstreamReadTimeout:
            raise UpstreamReadTimeout(f"upstream sent nothing for {idle:g} s") from None

    async def _finish(self) -> None:
        h = self._h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()  # clean: reusable
            await self.pool.release(self)
        else:  # MUST_CLOSE / CLOSED: the server asked for it (Connection: close) or HTTP/1.0
            await self._drop()

    async def _drop(self) -> None:
        """Close (not reusable) and release the slot; safe under cancellation."""
        self.state = ConnState.CLOSED
        await self._stream.aclose()  # shielded inside
        await self.pool.release(self)  # bookkeeping first; closes inside are shielded


class _Quiet(UpstreamTimeout):
    """A quiet period the caller asked about ended (not an error: never leaves this module)."""


def _join(parts: list[bytes]) -> bytes:
    # h11 hands out bytes or bytearray slices; the caller gets immutable bytes either way.
    if len(parts) == 1:
        return bytes(parts[0])
    return b"".join(parts)


class H1Exchange:
    """One response on an H1Connection: the head, then body chunks pulled by the caller."""

    __slots__ = ("_conn", "done", "headers", "http_version", "status")

    def __init__(self, conn: H1Connection, status: int, headers: list[Header], version: str):
        self._conn = conn
        self.status = status
        self.headers = headers
        self.http_version = version
        self.done = False

    async def receive(self) -> bytes:
        return await self.receive_within(None) or b""

    async def receive_within(self, quiet_s: float | None) -> bytes | None:
        """receive(), or None when nothing arrived for quiet_s (the exchange stays open)."""
        if self.done:
            return b""
        try:
            got = await self._conn._receive(quiet_s)
        except BaseException:
            self.done = True
            await self._conn._drop()
            raise
        if got is None:
            return None
        data, ended = got
        if ended:
            self.done = True
        return data

    async def aclose(self) -> None:
        """Abandon what is left of the body: the connection is closed, not reused."""
        if not self.done:
            self.done = True
            await self._conn._drop()

    def __repr__(self) -> str:
        return f"<H1Exchange {self.status} on #{self._conn.id}{' done' if self.done else ''}>"

