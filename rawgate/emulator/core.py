"""The emulator's sans-IO request handler: (method, path, query, headers, body) -> `Reply`.

Invariants:
- No I/O and no awaiting: `Emulator.handle()` returns a `Reply` (status, headers, body or stream
  chunks, and the timing/fault plan); the seam App (emulator.py) and the fast HTTP/1.1 protocol
  (emulator_fast.py) only play it.
- Google's order of checks: credentials (400 API_KEY_INVALID / 401 / 403), model (404), request
  validation (400), then the reply plan; a directive `error` wins over quota, and only accepted
  generate calls consume quota.
- Errors use the google.rpc.Status envelope; on the non-alt stream endpoint and on Code Assist
  streams they are wrapped in a one-element JSON array, as Google does (protocols.md A6/B5).
  Unknown paths get Google's HTML 404 page, not JSON.
- A reply is a pure function of (model, API, request body) except its responseId/traceId, so the
  validated plan and its encoded bytes are memoised per exact body (MEMO_ENTRIES, bodies up to
  MEMO_MAX_BODY_BYTES), encoded around a placeholder that `bytes.join` replaces by each request's
  id. A benchmark's repeated request then costs a dict lookup instead of ~30 us of validation,
  planning and encoding on this machine. State-dependent decisions (quota, `times=`/`for=`
  error directives) are taken per request, never memoised.
- Every table that grows with traffic is bounded (memo, `times=` counters, recent requests).
"""

from __future__ import annotations

import base64
import html
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import orjson

from rawgate.emulator.directives import ScriptError, parse_directives
from rawgate.emulator.embed import EmbedInvalid, embed_batch, embed_one
from rawgate.emulator.models import CATALOG, ModelSpec, extra_model, model_object
from rawgate.emulator.script import Options, Plan, build_plan, prompt_tokens
from rawgate.emulator.state import (
    MAX_TABLE_ENTRIES,
    Credentials,
    Header,
    Rejected,
    Settings,
)
from rawgate.emulator.validate import Invalid, validate_request
from rawgate.emulator.wire import encode_array, encode_sse, google_error

__all__ = ["JSON_HEADERS", "SSE_HEADERS", "Emulator", "Reply"]

log = logging.getLogger("rawgate.emulator.server")

RECENT_REQUESTS = 64  # kept for tests to inspect what was sent
MEMO_ENTRIES = 256
MEMO_MAX_BODY_BYTES = 256 * 1024  # bigger bodies are planned afresh (bounds the memo's memory)
_RID = "@@emu-response-id@@"  # placeholder in memoised bytes, replaced per request
_RID_B = _RID.encode()


@dataclass(slots=True)
class Reply:
    status: int
    headers: tuple[Header, ...]
    body: bytes = b""
    chunks: list[bytes] | None = None  # a stream: body pieces in order (None = one body)
    first_byte_delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    drip_s: float = 0.0  # > 0: write one byte at a time with this gap
    cut: str = ""  # "", "reset" (before head), "hang", "drop" (after cut_after chunks), "stall"
    cut_after: int = 0


class _Fail(Exception):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply


@dataclass(slots=True)
class _Prepared:
    """A validated plan and its encodings, split around the response-id placeholder."""

    plan: Plan
    unary: list[bytes] | None = None
    sse: list[list[bytes]] | None = None
    array: list[list[bytes]] | None = None


_COMMON: tuple[Header, ...] = (
    (b"vary", b"Origin, X-Origin, Referer"),
    (b"x-content-type-options", b"nosniff"),
)
JSON_HEADERS: tuple[Header, ...] = ((b"content-type", b"application/json; charset=UTF-8"),
                                    *_COMMON)
SSE_HEADERS: tuple[Header, ...] = ((b"content-type", b"text/event-stream"),
                                   (b"content-disposition", b"attachment"), *_COMMON)
HTML_HEADERS: tuple[Header, ...] = ((b"content-type", b"text/html; charset=UTF-8"), *_COMMON)
TEXT_HEADERS: tuple[Header, ...] = ((b"content-type", b"text/plain; charset=utf-8"),)
_OPS = frozenset({"generateContent", "streamGenerateContent", "countTokens"})
_EMBED_OPS = frozenset({"embedContent", "batchEmbedContents"})
_ENVELOPE = frozenset({"model", "project", "request", "user_prompt_id", "userPromptId",
                       "enabled_credit_types", "enabledCreditTypes", "requestId", "userAgent",
                       "requestType"})


def _json(status: int, obj: Any, array: bool = False) -> Reply:
    return Reply(status, JSON_HEADERS, orjson.dumps([obj] if array else obj))


def _fail(status: int, obj: Any, array: bool = False) -> _Fail:
    return _Fail(_json(status, obj, array))


def _query(q: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if q:
        for item in q.split("&"):
            k, _, v = item.partition("=")
            out.setdefault(k, unquote_plus(v) if "%" in v or "+" in v else v)
    return out


class Emulator:
    """One emulated Google: routes, models, credentials, memo and counters."""

    def __init__(self, settings: Settings | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.settings = s = settings or Settings()
        self.creds = Credentials(s) if clock is None else Credentials(s, clock)
        self.options = Options(s.chunks, s.chunk_chars, s.chunk_delay_s, s.first_byte_delay_s)
        self.models: dict[str, ModelSpec] = dict(CATALOG)
        for name in s.extra_models:
            self.models.setdefault(name, extra_model(name))
        self._memo: dict[tuple[str, bool, bytes], _Prepared] = {}
        self._times: dict[str, int] = {}
        self._seq = 0
        self.stats: dict[str, int] = {}
        self.recent: deque[tuple[str, str, str, list[Header], bytes]] = deque(
            maxlen=RECENT_REQUESTS)

    # ---- hooks for tests and the CLI ----

    def advance(self, seconds: float) -> None:
        """Move the emulator's clock forward (token expiry, quota windows)."""
        self.creds.offset_s += seconds

    def revoke(self, refresh_token: str) -> None:
        """Revoke a refresh token and every access token issued from it."""
        self.creds.revoked.add(refresh_token)

    def reset_quotas(self) -> None:
        self.creds.windows.clear()

    def expire_access_tokens(self) -> None:
        self.creds.access.clear()

    def count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    # ---- entry point ----

    def handle(self, method: str, path: str, query: str, headers: list[Header],
               body: bytes) -> Reply:
        self.count("requests")
        self.recent.append((method, path, query, headers, body))
        try:
            reply = self._route(method, path, query, headers, body)
        except _Fail as f:
            reply = f.reply
        except Exception:
            log.exception("emulator handler failed on %s %s", method, path)
            reply = _json(500, google_error(500))
        if reply.status >= 400:
            self.count(f"status_{reply.status}")
        return reply

    def _route(self, method: str, path: str, query: str, headers: list[Header],
               body: bytes) -> Reply:
        if path.startswith(("/v1beta/", "/v1/")):
            version, _, rest = path[1:].partition("/")
            return self._developer(method, version, rest, _query(query), headers, body)
        if path.startswith("/v1internal"):
            return self._code_assist(method, path[len("/v1internal"):], _query(query), headers,
                                     body)
        if path == "/token" and method == "POST":
            self.count("token")
            status, obj = self.creds.token(headers, body)
            return _json(status, obj)
        if path == "/o/oauth2/v2/auth" and method == "GET":
            self.count("authorize")
            status, location, text = self.creds.authorize(_query(query))
            page = (f"<!DOCTYPE html><meta charset=utf-8><title>Sign in - Google Accounts"
                    f"</title><p id=msg>{html.escape(text)}</p>").encode()
            loc: tuple[Header, ...] = ((b"location", location.encode()),) if location else ()
            return Reply(status, (*HTML_HEADERS, *loc), page)
        if path in ("/", "/healthz") and method in ("GET", "HEAD"):
            return Reply(200, TEXT_HEADERS, b"rawgate Gemini emulator\n")
        return _not_found_html(path)

    # ---- Gemini Developer API ----

    def _developer(self, method: str, version: str, rest: str, q: dict[str, str],
                   headers: list[Header], body: bytes) -> Reply:
        if rest == "models" and method == "GET":
            self._auth(headers, q, False)
            self.count("models")
            return self._list_models(q)
        if not rest.startswith("models/"):
            return _not_found_html(f"/{version}/{rest}")
        name, sep, verb = rest[len("models/"):].rpartition(":")
        if not sep:
            name, verb = rest[len("models/"):], ""
        if not verb and method == "GET":
            self._auth(headers, q, False)
            self.count("models")
            return _json(200, model_object(self._model(name, version, "get", False)))
        if (verb not in _OPS and verb not in _EMBED_OPS) or method != "POST":
            return _not_found_html(f"/{version}/{rest}")
        stream = verb == "streamGenerateContent"
        sse = q.get("alt") == "sse"
        array = stream and not sse
        label = self._auth(headers, q, array)
        spec = self._model(name, version, verb, array)
        if (verb in _EMBED_OPS) != spec.embedding and verb != "countTokens":
            raise _fail(404, google_error(404, (
                f"models/{name} is not found for API version {version}, or is not supported for "
                f"{verb}. Call ListModels to see the list of available models and their "
                "supported methods.")), array)
        if verb in _EMBED_OPS:
            return self._embed(body, spec, label, verb == "batchEmbedContents")
        if verb == "countTokens":
            return self._count_tokens(_decode(body, False), spec, version)
        return self._generate(body, None, spec, version, label, stream, sse, array, False)

    def _auth(self, headers: list[Header], q: dict[str, str], array: bool) -> str:
        try:
            return self.creds.developer(headers, q.get("key"))
        except Rejected as r:
            raise _fail(r.status, r.body, array)

    def _model(self, name: str, version: str, verb: str, array: bool) -> ModelSpec:
        spec = self.models.get(name)
        if spec is None:
            raise _fail(404, google_error(404, (
                f"models/{name} is not found for API version {version}, or is not supported for "
                f"{verb}. Call ListModels to see the list of available models and their "
                "supported methods.")), array)
        return spec

    def _list_models(self, q: dict[str, str]) -> Reply:
        names = sorted(self.models)
        try:
            size = int(q.get("pageSize") or 50)
            token = q.get("pageToken")
            start = int(base64.urlsafe_b64decode(token).decode()) if token else 0
        except (ValueError, UnicodeDecodeError):
            raise _fail(400, google_error(400, "Invalid page token or page size."))
        size = max(1, min(size, 1000))
        out: dict[str, Any] = {"models": [model_object(self.models[n])
                                          for n in names[start:start + size]]}
        if start + size < len(names):
            out["nextPageToken"] = base64.urlsafe_b64encode(str(start + size).encode()).decode()
        return _json(200, out)

    def _invalid(self, e: Invalid, array: bool) -> _Fail:
        details = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": f, "description": d} for f, d in e.violations]}]
        return _fail(400, google_error(400, e.message, details), array)

    def _count_tokens(self, req: Any, spec: ModelSpec, version: str,
                      code_assist: bool = False) -> Reply:
        self.count("count_tokens")
        if not isinstance(req, dict):
            raise _fail(400, google_error(400, "Invalid JSON payload received."))
        inner = req.get("generateContentRequest") or req.get("generate_content_request")
        body = dict(inner) if isinstance(inner, dict) else {"contents": req.get("contents")}
        body.pop("model", None)
        if self.settings.validate:
            try:
                validate_request(body, spec, api=version)
            except Invalid as e:
                raise self._invalid(e, False)
        n = prompt_tokens(body)
        out: dict[str, Any] = {"totalTokens": n}
        if not code_assist:
            out["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": n}]
        return _json(200, out)

    # ---- generation (both APIs) ----

    def _prepare(self, body: bytes, req: Any, spec: ModelSpec, version: str,
                 code_assist: bool, array: bool) -> _Prepared:
        key = (spec.name, code_assist, body)
        prep = self._memo.get(key)
        if prep is not None:
            return prep
        if req is None:
            req = _decode(body, array)
        if self.settings.validate:
            try:
                validate_request(req, spec, api=version, code_assist=code_assist)
            except Invalid as e:
                raise self._invalid(e, array)
        elif not isinstance(req, dict):
            req = {}
        thinking = spec.thinking is not None and _budget(req) != 0
        try:
            plan = build_plan(req, spec.name, self.options, _RID, thinking=thinking)
        except ScriptError as e:
            raise _fail(400, google_error(400, f"emulator directive: {e}"), array)
        prep = _Prepared(plan)
        if len(body) <= MEMO_MAX_BODY_BYTES:
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = prep
        return prep

    def _generate(self, body: bytes, req: Any, spec: ModelSpec, version: str, label: str,
                  stream: bool, sse: bool, array: bool, code_assist: bool) -> Reply:
        prep = self._prepare(body, req, spec, version, code_assist, array)
        plan = prep.plan
        if plan.error is not None and self._fires(plan, label):
            return self._directive_error(plan, spec, label, array, code_assist)
        retry = self.creds.take_quota(label)
        if retry is not None:
            self.count("quota_429")
            return _json(429, self.creds.quota_error(retry, spec.name, label, code_assist), array)
        self.count("stream" if stream else "generate")
        self._seq += 1
        rid = b"emu-%d" % self._seq
        trace = _RID if code_assist else None
        if not stream:
            if prep.unary is None:
                one = orjson.dumps(plan.unary)
                if trace is not None:
                    one = b'{"response":' + one + b',"traceId":"' + _RID_B + b'"}'
                prep.unary = one.split(_RID_B)
            r = Reply(200, JSON_HEADERS, rid.join(prep.unary))
        else:
            parts = prep.sse if sse else prep.array
            if parts is None:
                events, err = plan.events, None
                if plan.stream_error is not None:
                    after, err = plan.stream_error
                    events = events[:after]
                if sse:
                    chunks = encode_sse(events, trace, err, plan.quirks)
                else:
                    chunks = encode_array(events, trace, err)
                parts = [c.split(_RID_B) for c in chunks]
                if sse:
                    prep.sse = parts
                else:
                    prep.array = parts
            r = Reply(200, SSE_HEADERS if sse else JSON_HEADERS,
                      chunks=[rid.join(p) for p in parts])
        r.first_byte_delay_s = plan.first_byte_delay_s
        r.chunk_delay_s = plan.chunk_delay_s
        r.drip_s = plan.drip_s
        r.cut, r.cut_after = plan.cut, plan.cut_after
        return r

    def _embed(self, body: bytes, spec: ModelSpec, label: str, batch: bool) -> Reply:
        req = _decode(body, False)
        try:
            if batch:
                vectors, texts = embed_batch(req, spec.name)
            else:
                one, text = embed_one(req, spec.name)
                vectors, texts = [one], [text]
        except EmbedInvalid as e:
            raise self._invalid(Invalid([(e.field, e.description)]), False) from None
        # An `error` directive in any text answers instead, as on generate calls.
        for text in texts:
            try:
                found, _ = parse_directives(text)
            except ScriptError as e:
                raise _fail(400, google_error(400, f"emulator directive: {e}")) from None
            err = next((d for d in found if d.name == "error"), None)
            if err is not None:
                plan = Plan(events=[], unary={}, error=err, prompt=text)
                if self._fires(plan, label):
                    return self._directive_error(plan, spec, label, False, False)
        retry = self.creds.take_quota(label)
        if retry is not None:
            self.count("quota_429")
            return _json(429, self.creds.quota_error(retry, spec.name, label, False))
        self.count("embed")
        if batch:
            return _json(200, {"embeddings": [{"values": v} for v in vectors]})
        return _json(200, {"embedding": {"values": vectors[0]}})

    def _fires(self, plan: Plan, label: str) -> bool:
        d = plan.error
        assert d is not None
        target = d.args.get("for")
        if target is not None and str(target) != label:
            return False
        times = d.args.get("times")
        if times is None:
            return True
        key = f"{d.raw}\x00{plan.prompt}"
        done = self._times.get(key, 0)
        if not isinstance(times, int) or done >= times:
            return False
        if len(self._times) >= MAX_TABLE_ENTRIES:
            self._times.pop(next(iter(self._times)))
        self._times[key] = done + 1
        return True

    def _directive_error(self, plan: Plan, spec: ModelSpec, label: str, array: bool,
                         code_assist: bool) -> Reply:
        d = plan.error
        assert d is not None
        status = d.args.get("status", 500)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise _fail(400, google_error(400, "emulator directive: error status must be an "
                                               "integer 400..599"), array)
        if d.args.get("html"):
            page = f"<html><head><title>{status} Error</title></head><body>Error {status}</body>"
            return Reply(status, HTML_HEADERS, page.encode() + b"</html>\n")
        if status == 429:
            self.count("quota_429")
            delay = d.args.get("retry_delay", "7s")
            try:
                seconds = None if delay == "none" else float(str(delay).removesuffix("s"))
            except ValueError:
                raise _fail(400, google_error(400, "emulator directive: retry_delay must look "
                                                   "like 7s or 3.5s, or be none"), array)
            body = self.creds.quota_error(seconds, spec.name, label, code_assist,
                                          d.args.get("limit"), d.args.get("message"))
            return _json(429, body, array)
        details: list[dict[str, Any]] = []
        if d.args.get("reason"):
            domain = "cloudcode-pa.googleapis.com" if code_assist else (
                "generativelanguage.googleapis.com")
            details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": str(d.args["reason"]), "domain": domain})
        return _json(status, google_error(status, d.args.get("message"), details), array)

    # ---- Cloud Code Assist ----

    def _code_assist(self, method: str, rest: str, q: dict[str, str], headers: list[Header],
                     body: bytes) -> Reply:
        stream = rest == ":streamGenerateContent"
        array = stream  # Code Assist stream errors come array-wrapped (protocols.md B5)
        if rest.startswith("/operations/") and method == "GET":
            self._bearer(headers, False)
            return _json(200, {"name": rest[1:], "done": True})
        if not rest.startswith(":") or method != "POST":
            return _not_found_html("/v1internal" + rest)
        verb = rest[1:]
        account = self._bearer(headers, array)
        env = _decode(body, array)
        if not isinstance(env, dict):
            raise _fail(400, google_error(400, "Invalid JSON payload received."), array)
        try:
            if verb == "loadCodeAssist":
                self.count("load_code_assist")
                return _json(200, self.creds.load_code_assist(account))
            if verb == "onboardUser":
                return _json(200, self.creds.onboard(account, env))
        except Rejected as r:
            raise _fail(r.status, r.body)
        if verb not in _OPS:
            return _not_found_html("/v1internal" + rest)
        if verb == "countTokens":
            inner = env.get("request") if isinstance(env.get("request"), dict) else {}
            assert isinstance(inner, dict)
            name = str(inner.get("model", "")).removeprefix("models/")
            spec = self._model(name, "v1internal", verb, False)
            return self._count_tokens({"contents": inner.get("contents")}, spec, "v1internal",
                                      True)
        unknown = [k for k in env if k not in _ENVELOPE]
        if unknown:
            raise _fail(400, google_error(400, "\n".join(
                f'Invalid JSON payload received. Unknown name "{k}": Cannot find field.'
                for k in unknown)), array)
        model = env.get("model")
        if not isinstance(model, str) or not model:
            raise _fail(400, google_error(400, "model is required."), array)
        spec_or_none = self.models.get(model.removeprefix("models/"))
        if spec_or_none is None:
            raise _fail(404, google_error(404), array)
        project = env.get("project")
        if project != account.project or account.email not in self.creds.onboarded:
            raise _fail(403, google_error(403, f"Permission denied on resource project "
                                               f"{project}."), array)
        if "request" not in env:
            raise _fail(400, google_error(400, "request is required."), array)
        return self._generate(body, env["request"], spec_or_none, "v1internal", account.email,
                              stream, q.get("alt") == "sse", array, True)

    def _bearer(self, headers: list[Header], array: bool) -> Any:
        try:
            return self.creds.bearer(headers, True)
        except Rejected as r:
            raise _fail(r.status, r.body, array)


def _decode(body: bytes, array: bool) -> Any:
    if not body.strip():
        return {}
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise _fail(400, google_error(
            400, f"Invalid JSON payload received. Unexpected token. ({e.msg} at {e.pos})"), array)


def _not_found_html(path: str) -> Reply:
    # Google's front end answers unknown paths with an HTML page, not JSON.
    page = ("<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
            "  <title>Error 404 (Not Found)!!1</title>\n  <p><b>404.</b> <ins>That's an "
            f"error.</ins>\n  <p>The requested URL <code>{html.escape(path)}</code> was not "
            "found on this server.  <ins>That's all we know.</ins>\n")
    return Reply(404, HTML_HEADERS, page.encode())


def _budget(req: Any) -> Any:
    gen = req.get("generationConfig") or req.get("generation_config") if isinstance(
        req, dict) else None
    tc = (gen.get("thinkingConfig") or gen.get("thinking_config")) if isinstance(
        gen, dict) else None
    return tc.get("thinkingBudget", tc.get("thinking_budget")) if isinstance(tc, dict) else None
