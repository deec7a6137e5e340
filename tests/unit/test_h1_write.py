"""rawgate/http/h1_write.py, the response half of the HTTP/1.1 driver, tested in bytes: every head
parses with h11 (as a client would read it) into the status, headers and framing given."""

from __future__ import annotations

import re

import h11
import pytest

from rawgate.http.h1_write import (
    CHUNKED,
    CHUNKED_CLOSE,
    END,
    END_CLOSE,
    LAST_CHUNK,
    LENGTH,
    LENGTH_CLOSE,
    STATUS_LINE,
    response_head,
)

DATE = re.compile(rb"\r\ndate: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")


def _client_reads(data: bytes) -> h11.Response:
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    c.send(h11.EndOfMessage())
    c.receive_data(data)
    ev = c.next_event()
    assert isinstance(ev, h11.Response), ev
    return ev


@pytest.mark.parametrize(
    ("framing", "want"),
    [
        (LENGTH % 5, [(b"content-length", b"5")]),
        (LENGTH_CLOSE % 0, [(b"content-length", b"0"), (b"connection", b"close")]),
        (CHUNKED, [(b"transfer-encoding", b"chunked")]),
        (CHUNKED_CLOSE, [(b"transfer-encoding", b"chunked"), (b"connection", b"close")]),
        (END_CLOSE, [(b"connection", b"close")]),
    ],
)
def test_head_reads_back(framing: bytes, want: list[tuple[bytes, bytes]]) -> None:
    head = response_head(201, [(b"content-type", b"application/json"), (b"x-a", b"1")], framing)
    assert head.startswith(b"HTTP/1.1 201 Created\r\n")
    assert DATE.search(head) is not None
    assert head.endswith(b"\r\n\r\n")
    ev = _client_reads(head)
    assert ev.status_code == 201
    got = [(n, v) for n, v in ev.headers if n != b"date"]
    assert got == [(b"server", b"rawgate"), (b"content-type", b"application/json"),
                   (b"x-a", b"1"), *want]


def test_no_headers_and_end() -> None:
    head = response_head(204, [], END)
    assert head.startswith(b"HTTP/1.1 204 No Content\r\n") and head.endswith(b"rawgate\r\n\r\n")
    assert _client_reads(head).status_code == 204


def test_status_lines() -> None:
    assert STATUS_LINE[200] == b"HTTP/1.1 200 OK\r\n"
    assert STATUS_LINE[599] == b"HTTP/1.1 599 \r\n"  # no phrase known: h11 reads it all the same
    assert _client_reads(response_head(599, [], END)).status_code == 599
    assert LAST_CHUNK == b"0\r\n\r\n"


@pytest.mark.parametrize("status", [100, 101, 199, 600, 0])
def test_only_final_statuses(status: int) -> None:
    with pytest.raises(ValueError, match="final status"):
        response_head(status, [], END)


@pytest.mark.parametrize(
    "header",
    [(b"x-a", b"1\r\nset-cookie: a=b"), (b"x-a", b"1\n"), (b"x-a", b"a\rb"), (b"x\r\na", b"1"),
     (b"x-a", b"a\0b")],
)
def test_response_splitting_refused(header: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        response_head(200, [(b"content-type", b"text/plain"), header], LENGTH % 0)
