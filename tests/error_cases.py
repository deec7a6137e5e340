"""Upstream failures fed to gemini.error_from_upstream / decode_reply, and how each one comes out
on the wire and in the gateway's classification. `python -m tests.error_cases > FILE` writes the
table that tests/test_error_types.py compares against (made from the number-based code, before
errors were classified by type: the refactor must not change a byte)."""

from __future__ import annotations

import json
import sys
from typing import Any

import orjson

from rawgate.errors import RawgateError


def _doc(code: int, status: str, message: str, details: list[Any] | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "status": status, "message": message}
    if details is not None:
        err["details"] = details
    return orjson.dumps({"error": err})


_RETRY = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
_LONG = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7200s"}
_DAY = {
    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
    "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel"}],
}
_KEY = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}

# (name, HTTP status, body)
CASES: list[tuple[str, int, bytes]] = [
    ("400 invalid argument", 400, _doc(400, "INVALID_ARGUMENT", "bad field")),
    ("400 context", 400, _doc(400, "INVALID_ARGUMENT", "The input token count (9) exceeds it")),
    ("400 precondition", 400, _doc(400, "FAILED_PRECONDITION", "region")),
    ("400 api key invalid", 400, _doc(400, "INVALID_ARGUMENT", "key", [_KEY])),
    ("401", 401, _doc(401, "UNAUTHENTICATED", "who")),
    ("402", 402, _doc(402, "", "billing")),
    ("403", 403, _doc(403, "PERMISSION_DENIED", "no")),
    ("404 model", 404, _doc(404, "NOT_FOUND", "model x is not found")),
    ("404 other", 404, _doc(404, "NOT_FOUND", "nothing here")),
    ("408", 408, _doc(408, "", "slow")),
    ("409", 409, _doc(409, "ABORTED", "conflict")),
    ("413", 413, b"<html>too big</html>"),
    ("422", 422, _doc(422, "", "unprocessable")),
    ("429 retry", 429, _doc(429, "RESOURCE_EXHAUSTED", "slow down", [_RETRY])),
    ("429 bare", 429, _doc(429, "RESOURCE_EXHAUSTED", "slow down")),
    ("429 long", 429, _doc(429, "RESOURCE_EXHAUSTED", "later", [_LONG])),
    ("429 per day", 429, _doc(429, "RESOURCE_EXHAUSTED", "day", [_DAY])),
    ("500", 500, _doc(500, "INTERNAL", "oops")),
    ("502 html", 502, b"<html><body>Bad Gateway</body></html>"),
    ("503", 503, _doc(503, "UNAVAILABLE", "overloaded", [_RETRY])),
    ("504", 504, _doc(504, "DEADLINE_EXCEEDED", "late")),
    ("in answer 429", 0, _doc(429, "RESOURCE_EXHAUSTED", "mid", [_RETRY])),
    ("in answer 429 day", 0, _doc(429, "RESOURCE_EXHAUSTED", "mid", [_DAY])),
    ("in answer 400", 0, _doc(400, "INVALID_ARGUMENT", "mid bad")),
    ("in answer 404", 0, _doc(404, "NOT_FOUND", "mid model gone")),
    ("in answer 408", 0, _doc(408, "", "mid slow")),
    ("in answer 403", 0, _doc(403, "PERMISSION_DENIED", "mid no")),
    ("in answer 500", 0, _doc(500, "INTERNAL", "mid oops")),
    ("in answer 503", 0, _doc(503, "UNAVAILABLE", "mid busy")),
]


def outcome(name: str, status: int, body: bytes) -> dict[str, Any]:
    from rawgate.gateway.attempts import charges_budget, failure_kind, retryable
    from rawgate.translate.gemini import decode_reply, error_from_upstream

    err: RawgateError
    if status:
        err = error_from_upstream(status, body, None)
    else:  # an error object inside a 200 answer
        try:
            decode_reply(body)
        except RawgateError as e:
            err = e
        else:
            raise AssertionError(name)
    return {
        "name": name,
        "status": err.status,
        "headers": [[k.decode(), v.decode()] for k, v in err.headers],
        "json": err.to_json().decode(),
        "retry_after_s": err.retry_after_s,
        "kind": failure_kind(err),
        "retryable": retryable(err),
        "charges_budget": charges_budget(err),
    }


def main() -> int:
    for case in CASES:
        print(json.dumps(outcome(*case), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
