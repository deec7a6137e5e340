"""Server-sent events, sans-IO: the upstream decoder and the downstream frame encoders.

Invariants (decoder):
- `SSEDecoder.feed(bytes)` returns the data payloads of the events completed by those bytes, as
  bytes, in order; `close()` returns what the end of the body completes. Payloads are never split
  or decoded here, so a multi-byte UTF-8 sequence cut by a TCP read is never broken: the
  transcoders see whole JSON records.
- Full SSE line semantics: lines end in CRLF, LF or CR (a CR at the end of a read is held until
  the next byte shows whether an LF follows); `:` lines are comments; consecutive `data:` lines
  join with "\\n" (Code Assist's pretty-printed events, protocols.md A5 rule 10); one space after
  the colon is dropped; `event:`, `id:`, `retry:` and unknown fields are ignored; a blank line
  dispatches; an event without data dispatches nothing; a leading UTF-8 BOM is dropped.
- A `[DONE]` payload (some Gemini-compatible proxies append one) is swallowed.
- Google writes an error after the 200 head as raw, pretty-printed JSON with no `data:` prefix
  (A5 rule 9). A line whose first non-blank byte is `{` or `[` outside an event starts such an
  object; lines are collected until its brackets balance (counted outside JSON strings) and the
  object is returned as one payload, like python-genai does.
- The final event of a body that ends without a blank line is still delivered by `close()`
  (the seed system dropped it).
- Memory is bounded: an incomplete line or event longer than `max_event_bytes` raises
  `UpstreamProtocolError` instead of growing the buffer. Bytes are scanned at most twice.
- The CRLF fast path (`_feed_fast`) runs only while `compat.fast_paths()` was on when the
  decoder was made; with it off every byte goes through the general parser.

Encoders: `data_frame` / `event_frame` build downstream frames from a payload that has no
newline (orjson output never has one); `DONE` ends Chat/Completions streams; `HEARTBEAT` is a
comment, the only keep-alive every SSE client skips (an `event:`-only block makes openai-python
call json.loads("") and crash, protocols.md C6).
"""

from __future__ import annotations

from rawgate import compat
from rawgate.errors import UpstreamProtocolError

__all__ = [
    "DONE",
    "HEARTBEAT",
    "MAX_EVENT_BYTES",
    "SSEDecoder",
    "data_frame",
    "event_frame",
]

# A Gemini event is one GenerateContentResponse; image models put whole base64 images in one
# (a 4 MP PNG is ~8 MiB of base64), so 16 MiB leaves room while still bounding a hostile stream.
MAX_EVENT_BYTES = 16 * 1024 * 1024

HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"

_BOM = b"\xef\xbb\xbf"
_DONE_PAYLOAD = b"[DONE]"


_SEP = b"\r\n\r\n"


def _odd_blank(data: bytes) -> bool:
    """Does `data` (holding no CRLF CRLF) contain a blank line in LF or CR framing? A final
    CR LF CR is the start of a CRLF CRLF still to come, not a blank line."""
    if b"\n\n" in data or b"\r\r" in data:
        return True
    i = data.find(b"\n\r")
    return i >= 0 and not (i == len(data) - 2 and data[i - 1 : i] == b"\r")


def data_frame(payload: bytes) -> bytes:
    """`data: <payload>` + blank line (Chat and legacy Completions streams)."""
    return b"data: " + payload + b"\n\n"


def event_frame(event: bytes, payload: bytes) -> bytes:
    """`event: <name>` + `data: <payload>` + blank line (Responses streams)."""
    return b"event: " + event + b"\ndata: " + payload + b"\n\n"


class SSEDecoder:
    """Incremental SSE parser for an upstream body (see the module invariants)."""

    __slots__ = (
        "_buf",
        "_cr",
        "_data",
        "_data_len",
        "_esc",
        "_fast",
        "_in_str",
        "_max",
        "_raw",
        "_raw_depth",
        "_raw_len",
        "_start",
    )

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()  # bytes after the last blank line (an incomplete event)
        self._cr = False  # the previous read ended in CR: maybe half of a CRLF
        self._start = True  # nothing fed yet (BOM check)
        # Gemini's own framing so far (see _feed_fast); the switch is read once per decoder
        self._fast = compat.fast_paths()
        self._data: list[bytes] = []  # data lines of the event being read (slow path)
        self._data_len = 0
        self._raw: list[bytes] | None = None  # lines of a raw JSON object being collected
        self._raw_len = 0
        self._raw_depth = 0
        self._in_str = False
        self._esc = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if not chunk:
            return []
        if self._start:
            self._start = False
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        if self._fast:
            return self._feed_fast(chunk)
        return self._feed_general(chunk)

    def _feed_fast(self, chunk: bytes) -> list[bytes]:
        """Gemini's exact framing: one `data: ` line per event, CRLF CRLF after it. One split
        on the separator and two memchr checks per event, no CRLF normalisation pass: 1.3 us per
        event instead of 2.0 us on 16 KiB reads (bench/micro.py, `sse decode` lines). Any
        other shape (LF or CR framing, multi-line data, fields, a raw JSON error) hands the
        rest of the stream to the general parser, for good."""
        buf = self._buf
        if buf:
            edge = bytes(buf[-3:]) + chunk[:3]
            if _SEP not in chunk and _SEP not in edge:
                if _odd_blank(bytes(buf[-2:]) + chunk):
                    rest = bytes(buf) + chunk
                    buf.clear()
                    return self._leave_fast(rest)
                buf += chunk
                if len(buf) > self._max:
                    self._too_big()
                return []
            data = bytes(buf) + chunk
            buf.clear()
        else:
            data = chunk
        blocks = data.split(_SEP)
        tail = blocks.pop()
        out: list[bytes] = []
        for k, block in enumerate(blocks):
            # (bench.micro: sse_decode) int needles: `10 in b` is a memchr (26 ns on a 330 B
            # event), `b"\n" in b` goes through the general substring search (250 ns): 0.45 us
            # per event.
            if 10 not in block and 13 not in block and len(block) <= self._max:
                if block.startswith(b"data: "):
                    payload = block[6:]
                    if len(payload) > 16 or payload.strip() != _DONE_PAYLOAD:
                        out.append(payload)
                    continue
                if block.startswith(b":"):
                    continue  # a keep-alive comment
            blocks.append(tail)
            return out + self._leave_fast(_SEP.join(blocks[k:]))
        if tail:
            if _odd_blank(tail) or tail.lstrip()[:1] in (b"{", b"["):
                return out + self._leave_fast(tail)
            if len(tail) > self._max:
                self._too_big()
            buf += tail
        return out

    def _leave_fast(self, rest: bytes) -> list[bytes]:
        self._fast = False
        return self._feed_general(rest) if rest else []

    def _feed_general(self, chunk: bytes) -> list[bytes]:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                self._cr = True
            # Two C passes (~2.4 us per KiB on the bench machine: why Gemini's CRLF framing
            # gets the fast path above instead).
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf
        if buf:
            # An event is pending: only join and re-split when this read can complete it, so a
            # large event arriving in many reads is copied once, not once per read.
            if chunk.find(b"\n\n") < 0 and not (buf[-1:] == b"\n" and chunk[:1] == b"\n"):
                buf += chunk
                if len(buf) > self._max:
                    self._too_big()
                return []
            data = bytes(buf) + chunk
            buf.clear()
        else:
            data = chunk
        blocks = data.split(b"\n\n")
        tail = blocks.pop()
        if len(tail) > self._max:
            self._too_big()
        if tail:
            buf += tail
        out: list[bytes] = []
        for block in blocks:
            # Fast path, one event per block as Gemini sends it: `data: {...}` on one line.
            # Skips the per-line loop: 1.1 us instead of 1.5 us per event (LF framing).
            if self._raw is None and block.startswith(b"data: "):
                if b"\n" not in block:
                    if len(block) > self._max:
                        self._too_big()
                    payload = block[6:]
                    if len(payload) > 16 or payload.strip() != _DONE_PAYLOAD:
                        out.append(payload)
                    continue
            self._lines(block, out)
            self._dispatch(out)
        return out

    def close(self) -> list[bytes]:
        """End of body: deliver the last event even without its blank line, then reset."""
        out: list[bytes] = []
        if self._fast and self._buf:
            rest = bytes(self._buf)
            self._buf.clear()
            out += self._leave_fast(rest)
        self._cr = False  # a held CR ends the last line, which ends here anyway
        if self._buf:
            block = bytes(self._buf)
            self._buf.clear()
            self._lines(block, out)
        self._dispatch(out)
        if self._raw is not None:
            out.append(b"\n".join(self._raw))  # unbalanced: the caller's JSON decode will say so
            self._raw = None
        self._raw_depth = 0
        self._in_str = self._esc = False
        self._start = self._fast = True
        return out

    # ---- slow path ------------------------------------------------------------------------

    def _too_big(self) -> None:
        self._buf.clear()
        self._data.clear()
        self._data_len = 0
        self._raw = None
        raise UpstreamProtocolError(
            f"upstream sent an SSE event larger than {self._max} bytes",
            code="upstream_sse_too_large",
        )

    def _lines(self, block: bytes, out: list[bytes]) -> None:
        for line in block.split(b"\n"):
            if self._raw is not None:
                self._raw_line(line, out)
            elif not line:
                self._dispatch(out)
            elif line.startswith(b"data:"):
                value = line[5:]
                if value[:1] == b" ":
                    value = value[1:]
                self._data.append(value)
                self._data_len += len(value) + 1
                if self._data_len > self._max:
                    self._too_big()
            elif line == b"data":  # a field name alone has an empty value
                self._data.append(b"")
            elif line[:1] == b":":
                continue  # comment / keep-alive
            elif line.lstrip()[:1] in (b"{", b"["):
                self._dispatch(out)
                self._raw = []
                self._raw_len = self._raw_depth = 0
                self._in_str = self._esc = False
                self._raw_line(line, out)
            # event:, id:, retry: and unknown fields carry nothing rawgate uses

    def _raw_line(self, line: bytes, out: list[bytes]) -> None:
        raw = self._raw
        assert raw is not None
        raw.append(line)
        self._raw_len += len(line) + 1
        if self._raw_len > self._max:
            self._too_big()
        depth, in_str, esc = self._raw_depth, self._in_str, self._esc
        # Error objects are small and rare: a byte loop is fine here.
        for c in line:
            if in_str:
                if esc:
                    esc = False
                elif c == 0x5C:  # backslash
                    esc = True
                elif c == 0x22:  # quote
                    in_str = False
            elif c == 0x22:
                in_str = True
            elif c in (0x7B, 0x5B):  # { [
                depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                depth -= 1
                if depth <= 0:
                    break
        self._raw_depth, self._in_str, self._esc = depth, in_str, esc
        if depth <= 0:
            out.append(b"\n".join(raw))
            self._raw = None
            self._raw_depth = 0

    def _dispatch(self, out: list[bytes]) -> None:
        data = self._data
        if not data:
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        data.clear()
        self._data_len = 0
        if len(payload) > 16 or payload.strip() != _DONE_PAYLOAD:
            out.append(payload)
