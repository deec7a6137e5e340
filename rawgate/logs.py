"""Logging set-up (`--log-format text|json`, `--log-level`) and the one-line-per-request access log.

Invariants:
- Everything rawgate logs goes through loggers under "rawgate"; `configure_logging` installs
  exactly one handler there (calling it again replaces it) and leaves the root logger alone, so
  library loggers (h2 at DEBUG is very chatty) stay quiet.
- The access log carries method, path (never the query string: `?key=` lives there), status,
  protocol, duration, bytes out, model, mapped model, account label and request id. Never a
  header value, never a key. Client-chosen strings (model names) are escaped so they cannot
  forge extra log lines.
- An access record stores its fields as positional `args`; the text format is plain %-formatting
  and the JSON formatter zips the same args with ACCESS_FIELDS. No per-request dict is built
  unless the JSON format is on.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import orjson

__all__ = [
    "ACCESS_FIELDS",
    "ACCESS_LOGGER",
    "JsonFormatter",
    "configure_logging",
    "log_access",
    "safe_text",
]

ACCESS_LOGGER = "rawgate.access"
access_log = logging.getLogger(ACCESS_LOGGER)

ACCESS_FIELDS = (
    "method",
    "path",
    "status",
    "protocol",
    "duration_ms",
    "bytes_out",
    "model",
    "mapped_model",
    "account",
    "request_id",
)
_ACCESS_FMT = "%s %s %d %s %.2fms %dB model=%s mapped=%s account=%s rid=%s"
# One shared `extra` mapping marks access records for the JSON formatter without a per-call dict.
_ACCESS_EXTRA = {"rawgate_access": True}
# Model names come from request bodies; a line feed in one must not start a fake log line, and a
# megabyte of name must not become a megabyte of log.
_MAX_FIELD_CHARS = 200

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def safe_text(value: str) -> str:
    """`value` made safe for a one-line log: printable, bounded; "-" when empty."""
    if not value:
        return "-"
    if len(value) > _MAX_FIELD_CHARS:
        value = value[:_MAX_FIELD_CHARS] + "..."
    if value.isprintable() and " " not in value:
        return value
    return value.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")


def log_access(
    method: str,
    path: str,
    status: int,
    protocol: str,
    duration_s: float,
    bytes_out: int,
    model: str,
    mapped_model: str,
    account: str,
    request_id: str,
) -> None:
    """Write the access-log line of one finished request (no-op when INFO is off)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    access_log.info(
        _ACCESS_FMT,
        method,
        safe_text(path),
        status,
        protocol,
        duration_s * 1000.0,
        bytes_out,
        safe_text(model),
        safe_text(mapped_model),
        safe_text(account),
        request_id or "-",
        extra=_ACCESS_EXTRA,
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, access fields, exc (traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if getattr(record, "rawgate_access", False) and isinstance(record.args, tuple):
            out["msg"] = "access"
            out.update(zip(ACCESS_FIELDS, record.args, strict=False))
            out["duration_ms"] = round(float(out.get("duration_ms", 0.0)), 3)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        # default=str: a stray non-JSON arg must degrade to text, never lose the line.
        return orjson.dumps(out, default=str).decode()


def _iso_utc(created: float) -> str:
    secs = int(created)
    ms = int((created - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


class _RawgateHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging owns, so a second call replaces it."""


def configure_logging(
    fmt: str = "text", level: str = "info", stream: TextIO | None = None
) -> logging.Handler:
    """Send rawgate's logs to `stream` (default stderr) as text or JSON lines at `level`."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    lvl = _LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, not {level!r}")
    root = logging.getLogger("rawgate")
    for h in list(root.handlers):
        if isinstance(h, _RawgateHandler):
            root.removeHandler(h)
            h.close()
    handler = _RawgateHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        formatter.converter = time.gmtime  # UTC timestamps, like the JSON format
        handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(lvl)
    # Our handler is the output; do not print every line twice via a root handler.
    root.propagate = False
    return handler
