"""Errors carry their status by type (errors.py), and the gateway classifies failures by type:
every upstream failure in tests/error_cases.py comes out byte for byte as before (status,
headers, JSON body, retry hint) and with the same decision (cooldown kind, rotate, retry
budget). tests/data/errors/classification.jsonl was written by the number-based code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rawgate import errors
from rawgate.errors import RawgateError
from rawgate.gateway.attempts import failure_kind, retryable
from rawgate.translate.gemini import decode_reply, error_from_upstream
from tests.error_cases import CASES, outcome

GOLDEN = Path(__file__).parent / "data" / "errors" / "classification.jsonl"
EXPECTED = {d["name"]: d for d in map(json.loads, GOLDEN.read_text().splitlines())}


@pytest.mark.parametrize(("name", "status", "body"), CASES, ids=[c[0] for c in CASES])
def test_wire_answer_and_decision_unchanged(name: str, status: int, body: bytes) -> None:
    assert outcome(name, status, body) == EXPECTED[name]


def _err(status: int, body: bytes) -> RawgateError:
    if status:
        return error_from_upstream(status, body, None)
    with pytest.raises(RawgateError) as ei:
        decode_reply(body)
    return ei.value


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("402", errors.InsufficientQuota),
        ("429 per day", errors.InsufficientQuota),
        ("429 retry", errors.RateLimited),
        ("503", errors.UpstreamUnavailable),
        ("408", errors.UpstreamRequestTimeout),
        ("409", errors.UpstreamRejected),
        ("in answer 429", errors.UpstreamRateLimited),
        ("in answer 429 day", errors.UpstreamQuotaExhausted),
        ("in answer 400", errors.UpstreamRejectedInAnswer),
    ],
)
def test_each_failure_has_its_class(name: str, cls: type[RawgateError]) -> None:
    _, status, body = next(c for c in CASES if c[0] == name)
    assert type(_err(status, body)) is cls


def test_classes_name_their_status() -> None:
    assert errors.MethodNotImplemented("x").status == 501
    assert errors.HTTPVersionNotSupported("x").status == 505
    assert errors.AccountsAuthResting("x").status == 503
    assert errors.InsufficientQuota("x").to_dict()["error"] == {
        "message": "x",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }


def test_classification_ignores_the_number() -> None:
    """A status number alone decides nothing: the same 429 or 503 on a class that is not a
    rate limit or a server fault is not one (only the class counts)."""

    class Odd(RawgateError):
        status = 429
        type = "invalid_request_error"

    assert failure_kind(Odd("x")) is None and not retryable(Odd("x"))
    assert failure_kind(errors.UpstreamRateLimited("x")) == "rate_limited"
    assert failure_kind(errors.UpstreamRejectedInAnswer("x", status=400)) is None
    assert retryable(errors.UpstreamRejectedInAnswer("x", status=400))
    assert failure_kind(errors.ServiceUnavailable("x")) == "server"
