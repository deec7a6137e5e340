from __future__ import annotations

import pytest

from rawgate.errors import BadRequest
from rawgate.http.target import parse_target


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/v1/models", ("/v1/models", "")),
        (b"/v1/models?x=1&y", ("/v1/models", "x=1&y")),
        (b"/v1/models#frag", ("/v1/models", "")),
        (b"/healthz/../v1/models", ("/healthz/../v1/models", "")),
        (b"//v1/models", ("//v1/models", "")),
        (b"/v1%2Fmodels", ("/v1%2Fmodels", "")),
        (b"*", ("*", "")),
    ],
)
def test_parse(raw: bytes, expected: tuple[str, str]) -> None:
    assert parse_target(raw) == expected


@pytest.mark.parametrize(
    "raw", [b"http://x/v1/models", b"v1/models", b"/v1/\xc3\xa9", b"/a b", b"/a\x00", b""]
)
def test_reject(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_target(raw)
