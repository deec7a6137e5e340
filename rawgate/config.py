"""Configuration: frozen msgspec Structs, one per config.toml section, with documented defaults.

Invariants:
- Precedence: defaults < config file < RAWGATE_<SECTION>_<KEY> environment < command-line flags.
- Unknown keys and wrong values are start-up errors naming the key, the value and what is allowed.
- Every limit carries its unit in its name (`_bytes`, `_s`, `_count`) and a comment saying why.
- Objects are immutable once loaded: a reload builds a new Config.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

# server.cors_allowed_origins entries and server.allowed_hosts entries (checked at start-up).
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(:(\*|[0-9]{1,5}))?\Z")
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(:[0-9]{1,5})?\Z")

KiB = 1024
MiB = 1024 * KiB


# Browser pages served from this machine, on any port (dev servers): the CORS default.
LOOPBACK_ORIGINS = (
    "http://localhost:*",
    "http://127.0.0.1:*",
    "http://[::1]:*",
    "https://localhost:*",
    "https://127.0.0.1:*",
    "https://[::1]:*",
)


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = ""  # "" = 127.0.0.1, or 0.0.0.0 (+ ::) when allow_lan_access is true
    port: int = 8045
    allow_lan_access: bool = False
    workers: int = 1
    tls_cert: str = ""  # both set: TLS with ALPN h2, http/1.1
    tls_key: str = ""
    # CORS: browser origins allowed to call rawgate ("scheme://host[:port]"; ":*" = any port;
    # "*" = any origin). Default: pages served from this machine only; a foreign Origin is a 403.
    cors_allowed_origins: list[str] = msgspec.field(
        default_factory=lambda: list(LOOPBACK_ORIGINS)
    )
    # Host names (or host:port) accepted besides localhost, 127.0.0.1 and [::1]. Checked while
    # listening on loopback only, or whenever this is set (DNS rebinding); "*" = no check.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    # Off: every fast path that reads h11/h2/hpack internals (and rawgate's own fast parsers)
    # is skipped, the public library APIs alone serve (rawgate/compat.py). For diagnosis.
    fast_paths: bool = True
    # How long a browser may cache a preflight answer; 10 min (Chromium's own cap is 2 h).
    cors_max_age_s: int = 600


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mode: Literal["off", "strict", "all_except_health", "auto"] = "auto"
    api_keys: list[str] = msgspec.field(default_factory=list)


class UpstreamConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    gemini_base_url: str = "https://generativelanguage.googleapis.com"  # /v1beta appended
    code_assist_base_url: str = "https://cloudcode-pa.googleapis.com"  # /v1internal appended
    oauth_token_url: str = "https://oauth2.googleapis.com/token"
    # Where `rawgate accounts login` sends the browser (Google's installed-app consent page).
    oauth_auth_url: str = "https://accounts.google.com/o/oauth2/v2/auth"
    oauth_client_id: str = ""  # supplied by the user for Code Assist accounts
    oauth_client_secret: str = ""
    proxy: str = ""  # http://host:port, CONNECT tunnel
    http2: bool = True  # offer h2 by ALPN (TLS) / use h2c prior knowledge (cleartext) if true
    # Per origin. Google allows 100 streams per h2 connection; a few connections cover thousands.
    max_connections: int = 32
    max_keepalive_connections: int = 32
    keepalive_expiry_s: float = 60.0  # idle connections older than this are closed
    ping_interval_s: float = 30.0  # h2 PING on idle connections to detect dead peers
    # A PING unanswered this long means the peer is dead: the connection is dropped.
    ping_timeout_s: float = 10.0
    # PEM bundle trusted for upstream TLS instead of the system store ("" = system store).
    ca_file: str = ""
    # http:// origins when http2 is true. "auto": h2c prior knowledge, and an origin that does
    # not answer the preface with SETTINGS is remembered as HTTP/1.1-only (local servers often
    # speak only HTTP/1.1 in cleartext); "prior_knowledge": h2c, no fallback; "off": HTTP/1.1.
    cleartext_http2: Literal["auto", "prior_knowledge", "off"] = "auto"
    # Streams per h2 connection even if the peer allows more (Google allows 100); the peer's
    # MAX_CONCURRENT_STREAMS lowers it. Beyond it a second connection opens.
    h2_max_streams_per_connection: int = 100
    # Per-stream receive window = the most rawgate buffers for a caller that does not read.
    # 256 KiB still moves 2.5 MB/s per stream at 100 ms RTT; LLM streams need kB/s.
    h2_stream_window_bytes: int = 256 * KiB
    # Connection window: credit is returned on receipt (per-stream windows bound the buffers),
    # so this only caps bytes in flight on the wire: 4 MiB = 40 MB/s at 100 ms RTT.
    h2_connection_window_bytes: int = 4 * MiB
    # Upstream response heads over this are an upstream fault (502), not something to buffer.
    max_response_header_bytes: int = 64 * KiB
    # Default bound of UpstreamResponse.read(): non-stream replies with inline images are MBs.
    max_response_bytes: int = 64 * MiB


class RoutingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    default_model: str = "gemini-2.5-flash"  # where the built-in OpenAI aliases point
    # Targets of two rows of the built-in alias table (router.py): strong reasoning/coding
    # names (gpt-5*, o1, o3, codex) -> pro_model; the -nano names -> lite_model.
    pro_model: str = "gemini-2.5-pro"
    lite_model: str = "gemini-2.5-flash-lite"
    scheduling: Literal["round_robin", "least_loaded", "sticky"] = "round_robin"
    max_attempts: int = 3  # per request, bounded by the number of usable accounts
    expose_account_header: bool = True  # X-Account-Email
    # Re-sends after 5xx, timeouts and connection failures may add at most this fraction of
    # in-flight requests (Envoy's retry budget) so a failing upstream is not hammered. Moving a
    # request off a rate-limited account, or one that never received it, is not charged.
    retry_budget_ratio: float = 0.2
    retry_budget_min: int = 3  # re-sends always allowed per window, however quiet the gateway
    retry_budget_window_s: float = 10.0  # the budget's sliding window
    custom_mapping: dict[str, str] = msgspec.field(default_factory=dict)
    # Where POST /v1/embeddings sends the OpenAI embedding names (text-embedding-3-small,
    # text-embedding-3-large, text-embedding-ada-002, text-embedding-004).
    embedding_model: str = "gemini-embedding-001"


class LimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Request line + headers. h11 only checks while a head is incomplete, so rawgate counts itself.
    max_header_bytes: int = 64 * KiB
    max_header_count: int = 100  # Envoy's default
    max_url_bytes: int = 8 * KiB  # nginx's large_client_header_buffers; over it: 414
    max_body_bytes: int = 32 * MiB  # images inflate chat requests; over it: 413
    # Request bodies the server holds at once, all connections together (bodies being received,
    # before the handler takes them); over it: 503 + Retry-After before more is read. 0 = none.
    max_buffered_body_bytes: int = 256 * MiB
    max_json_depth: int = 64  # deeper JSON is an attack, not a chat request
    max_connections: int = 4096  # over it, new connections wait in the accept backlog
    # Accept backlog per listening socket (the kernel caps it at net.core.somaxconn); connections
    # over max_connections wait here.
    listen_backlog: int = 4096
    max_in_flight: int = 1024  # requests being handled at once; over it: 503 + Retry-After
    max_pipelined: int = 16  # queued HTTP/1.1 pipelined requests per connection
    max_requests_per_connection: int = 10000  # then Connection: close / GOAWAY
    h2_max_concurrent_streams: int = 100
    h2_initial_window_bytes: int = 64 * KiB - 1  # RFC 7540 default stream window
    h2_connection_window_bytes: int = 1 * MiB
    h2_max_header_list_bytes: int = 64 * KiB
    # Flood caps per connection per second (CVE-2019-9512/9515/9518, CVE-2023-44487).
    h2_max_pings_per_s: int = 20
    h2_max_settings_per_s: int = 20
    h2_max_resets_per_s: int = 200
    h2_max_empty_frames: int = 100
    # Frames that cost CPU but carry no work: standalone PRIORITY, unknown frame types, and
    # WINDOW_UPDATEs beyond two per DATA frame we sent (CVE-2019-9513 / stream-0 WU floods).
    h2_max_noop_frames_per_s: int = 200
    # Bytes a connection may have queued for a peer that does not read (then we stop producing).
    max_pending_output_bytes: int = 1 * MiB
    sse_heartbeat_s: float = 15.0  # SSE comment while upstream is silent; 0 = off
    # One upstream SSE event (a Gemini chunk). Image models send whole base64 images in one
    # (~8 MiB for 4 MP); beyond this the stream is an error, not unbounded buffering.
    upstream_max_event_bytes: int = 16 * MiB
    # Stored Responses (previous_response_id). Codex sends store:false and resends history, so
    # the store serves SDK users chaining turns: 1024 conversations for an hour is plenty for a
    # local gateway and bounds memory (the oldest go first).
    response_store_max_count: int = 1024
    # POST /v1/embeddings: upstream batchEmbedContents calls (100 inputs each) one request may
    # have in flight at once; the others wait their turn.
    embedding_parallel_chunks: int = 4
    response_store_max_age_s: float = 3600.0
    # Bytes of the distinct items the store holds (a chain's shared history counts once); the
    # oldest go first. A response larger than this alone is not stored: a later
    # previous_response_id naming it gets 400 previous_response_not_found.
    response_store_max_bytes: int = 256 * MiB
    # Cleaned tool schemas memoised across requests (agents resend the same tools every turn);
    # bounded by bytes held, least recently used first; a larger schema is cleaned, not kept.
    tool_schema_cache_max_bytes: int = 64 * MiB
    # Work for all tool schemas of one request: one unit per schema node, per $ref followed and
    # per value copied (enum values, required names, merged keys; 256 characters of built text).
    # ~1 us per unit: it bounds one request's schema CPU to ~0.1 s, about what decoding a
    # max_body_bytes body costs. Over it: 400 naming the tool.
    tool_schema_max_work: int = 100_000
    # Of that, the cleaning (memo misses) done on the event loop; a request needing more is mapped
    # again in a worker thread (the memo keeps what was done), so it holds other requests up for
    # ~5 ms at most.
    tool_schema_inline_work: int = 5_000


class TimeoutsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    header_read_s: float = 10.0  # whole request head (slowloris); then 408 and close
    body_read_s: float = 30.0  # idle gap while reading a body; then 408
    keepalive_idle_s: float = 75.0  # idle keep-alive connection (nginx's default)
    write_s: float = 60.0  # no progress writing to a client; then abort
    shutdown_grace_s: float = 30.0  # in-flight requests may finish within this on SIGTERM
    # Last words to a peer being closed (GOAWAY, h2): a peer that does not read gets no longer.
    h2_goaway_flush_s: float = 2.0
    tls_handshake_s: float = 10.0
    # After an error answer that closes an HTTP/1.1 connection (413, 408, 400 ...), keep reading
    # and dropping the client's bytes this long so its kernel does not see a RST that destroys
    # our answer (nginx's lingering_close).
    lingering_close_s: float = 2.0
    upstream_connect_s: float = 10.0
    upstream_pool_s: float = 30.0  # waiting for a free pooled connection
    upstream_headers_s: float = 120.0  # time to response headers (thinking models are slow)
    upstream_read_idle_s: float = 120.0  # gap between body chunks; not a total limit
    upstream_write_s: float = 30.0


class StateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What several rawgate processes or machines share (rawgate/state/)."""

    # local: files under RAWGATE_HOME (one machine) | redis: Redis >= 7 or Valkey
    backend: Literal["local", "redis"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"  # redis://, rediss:// (TLS) or unix://
    # Every key and channel starts with this; the part in {braces} after it is the hash tag.
    key_prefix: str = "rawgate:"
    # redis_url names one node of a Redis Cluster; the others are discovered from it.
    redis_cluster: bool = False
    # One Redis call (connect included) may take this long; then the call is served from local
    # state and the episode starts. Same-datacenter round trips are ~0.2-1 ms.
    redis_timeout_ms: int = 250
    # While degraded, Redis is retried after 0.5 s, doubling up to this (then every this long):
    # an instance is back at most about this long after Redis is (one connection attempt per
    # instance every 5 s costs Redis nothing; 30 s meant up to 30 s degraded after a restart).
    redis_backoff_max_s: float = 5.0
    # Connections to Redis per process; calls are pipelined over them (coredis multiplexes).
    redis_max_connections: int = 16
    # Per-key limits while Redis is unreachable: open = serve without limits (logged once per
    # episode), closed = refuse with 429 until it is back. Never silently per-process.
    limits_fail: Literal["open", "closed"] = "open"
    # Stored Responses (previous_response_id) in Redis: one entry larger than this is not
    # stored (its follow-up gets previous_response_not_found); each lives
    # limits.response_store_max_age_s.
    response_max_bytes: int = 4 * MiB
    # Hourly usage buckets (per key, account and model) are kept this many days.
    usage_days: int = 35
    # Redis: `record_usage` adds to an in-memory buffer (same fields merged) that goes to
    # Redis every this long in one pipelined round trip (the usage hash and the keys' token
    # windows), at shutdown and after a recovery; a key's buffered tokens also ride along
    # with its next limit check on this instance. Other instances' tpm/daily_tokens checks
    # see tokens up to this late. 0 = one round trip per answer (~100 us CPU each on the lean
    # path, ~220 through coredis, against ~6 batched: bench.state_cost).
    usage_flush_ms: int = 100
    # Redis (redis:// or unix://, not a cluster): the hot path's script calls (limit check,
    # usage flush) are written and read by the calling task on a leased connection of their
    # own (state/lean_redis.py) instead of through coredis' connection tasks: ~half the CPU
    # per check (bench.state_cost). false = everything through coredis. rediss:// (TLS) and
    # clusters always use coredis.
    redis_lean_path: bool = True
    # OAuth refreshes across the fleet (redis): the instance refreshing an account's access
    # token holds a lock that lapses after this long, so one that died mid-refresh blocks the
    # others no longer than this. Above the refresh's own timeout (30 s), so a live holder
    # never loses it mid-call.
    oauth_refresh_lock_s: float = 45.0
    # A request that needs a token another instance is refreshing waits this long for it
    # (polling the shared token every 50 ms); then that attempt fails (oauth_refresh_failed)
    # and the request moves on to another account.
    oauth_refresh_wait_s: float = 10.0


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # One row per request in RAWGATE_HOME/requests.db (SQLite, WAL; never bodies or secrets),
    # written off the event loop; kept request_log_days days; at most request_log_queue rows
    # wait for the writer (more are dropped and counted, never slowing a request).
    request_log: bool = True
    request_log_days: float = 7.0
    request_log_queue: int = 10_000


class AdminConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The dashboard (/ui) and its JSON API (/admin/...)."""

    # Keys for /admin/... (header only: Authorization: Bearer or X-Admin-Key). Empty: `serve`
    # generates one into RAWGATE_HOME/admin_key (0600, reused) and prints the /ui URL with it.
    # Admin keys are not client keys, and client keys are not admin keys.
    api_keys: list[str] = msgspec.field(default_factory=list)


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)


class ConfigError(Exception):
    """A wrong key or value; the message is the one line printed at start-up."""


def _client_keys_possible(cfg: Config) -> bool:
    """Whether client keys may exist (the Redis store, or a keys.json in RAWGATE_HOME)."""
    return cfg.state.backend == "redis" or (rawgate_home() / "keys.json").exists()


def rawgate_home(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env  # type: ignore[assignment]
    assert env is not None
    return Path(env.get("RAWGATE_HOME") or Path.home() / ".rawgate")


def load_config(
    path: str | Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    flags: dict[tuple[str, str], str] | None = None,
) -> Config:
    """Build a Config from defaults, a TOML file, RAWGATE_* variables and flag overrides.

    `flags` names the command-line flag behind each override, e.g. {("server", "port"):
    "--port"}, so an error names what the user typed."""
    env = dict(os.environ) if env is None else env
    explicit = path is not None
    cfg_path = config_path(path, env)
    raw: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            raw = tomllib.loads(cfg_path.read_text("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_path}: not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{cfg_path}: cannot read: {e.strerror or e}") from None
    elif explicit:
        raise ConfigError(f"{cfg_path}: config file not found")
    return build_config(raw, env, overrides or {}, source=str(cfg_path), flags=flags)


def config_path(path: str | Path | None = None, env: dict[str, str] | None = None) -> Path:
    """The file load_config reads: `path`, else $RAWGATE_HOME/config.toml."""
    return Path(path) if path is not None else rawgate_home(env) / "config.toml"


# Never echoed in an error: they are credentials (a proxy URL may carry user:password).
_SECRET_KEYS = frozenset(
    {
        "auth.api_keys",
        "admin.api_keys",
        "upstream.oauth_client_secret",
        "upstream.proxy",
        "state.redis_url",
    }
)


class _Origins:
    """Where each setting came from: the file read, a RAWGATE_* variable or a flag; an error
    names that, never a file that was not read."""

    __slots__ = ("by_key", "file")

    def __init__(self, file: str) -> None:
        self.file = file
        self.by_key: dict[tuple[str, str], str] = {}

    def of(self, section: str, key: str) -> str:
        return self.by_key.get((section, key), "default")

    def fail(self, section: str, key: str, value: Any, problem: str) -> ConfigError:
        dotted = f"{section}.{key}"
        shown = "" if dotted in _SECRET_KEYS else f" = {value!r}"
        return ConfigError(f"{self.of(section, key)}: {dotted}{shown}: {problem}")


def build_config(
    raw: dict[str, Any],
    env: dict[str, str],
    overrides: dict[str, dict[str, Any]],
    *,
    source: str = "config",
    flags: dict[tuple[str, str], str] | None = None,
) -> Config:
    """Validate and merge; see load_config. Raises ConfigError with a one-line message that
    starts with where the wrong value came from (`source` is the name of the file `raw` was
    read from)."""
    origins = _Origins(source)
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    sections = {f.name: f.type for f in msgspec.structs.fields(Config)}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(
                f"{source}: unknown section [{name}]; allowed: {', '.join(sorted(sections))}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, got {value!r}")
        for key in value:
            origins.by_key[(name, key)] = source
    for var, text in env.items():
        if not var.startswith("RAWGATE_") or var == "RAWGATE_HOME":
            continue
        rest = var[len("RAWGATE_") :].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            continue
        key = rest[len(section) + 1 :]
        merged.setdefault(section, {})[key] = _from_env(section, key, text, var)
        origins.by_key[(section, key)] = var
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
        for key in values:
            origins.by_key[(section, key)] = (flags or {}).get((section, key), "command line")
    try:
        cfg = msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as e:
        raise _explain(e, merged, origins) from None
    _check_semantics(cfg, origins)
    return cfg


def _field_type(section: str, key: str) -> Any:
    sec_type = next(f.type for f in msgspec.structs.fields(Config) if f.name == section)
    for f in msgspec.structs.fields(sec_type):
        if f.name == key:
            return f.type
    return None


def _from_env(section: str, key: str, text: str, var: str) -> Any:
    """Environment values are strings; lists are comma-separated, dicts are JSON."""
    t = _field_type(section, key)
    if t is None:
        raise ConfigError(f"{var}: unknown setting {section}.{key}")
    origin = getattr(t, "__origin__", None)
    if origin is list:
        return [p.strip() for p in text.split(",") if p.strip()]
    if origin is dict:
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError:
            raise ConfigError(f"{var}: {section}.{key}: expected a JSON object") from None
    return text


def _expected(t: Any) -> str | None:
    """What a setting of type `t` must be, in the user's words (None: say what msgspec said)."""
    if getattr(t, "__origin__", None) is Literal:
        return "must be one of " + ", ".join(str(a) for a in t.__args__)
    origin = getattr(t, "__origin__", None)
    if origin is list:
        return "expected a list of strings (environment: comma-separated)"
    if origin is dict:
        return "expected a table of strings (environment: a JSON object)"
    return {
        bool: "expected true or false",
        int: "expected an integer",
        float: "expected a number",
        str: "expected a string",
    }.get(t)


def _explain(e: msgspec.ValidationError, merged: dict[str, Any], origins: _Origins) -> ConfigError:
    # msgspec says e.g. "Expected `int`, got `str` - at `$.server.port`": turn that into the
    # setting's origin, its value and what is allowed.
    msg = str(e)
    loc = msg.rsplit("at `$.", 1)
    if len(loc) != 2:
        return ConfigError(f"{origins.file}: {msg}")
    parts = loc[1].rstrip("`").split(".")
    what = loc[0].removesuffix(" - ").strip()
    if what.startswith("Object contains unknown field") and len(parts) == 1:
        key = what.split("`")[1] if "`" in what else "?"
        return ConfigError(f"{origins.of(parts[0], key)}: unknown key {parts[0]}.{key}")
    if len(parts) < 2:
        return ConfigError(f"{origins.file}: {msg}")
    # "api_keys[0]": an element of a list; the setting is what the user wrote.
    section, key = parts[0], parts[1].split("[", 1)[0]
    value = merged.get(section, {}).get(key)
    whole = len(parts) == 2 and "[" not in parts[1]
    expected = _expected(_field_type(section, key)) if whole else None
    return origins.fail(section, key, value, expected or what)


def _check_semantics(cfg: Config, origins: _Origins) -> None:
    fail = origins.fail
    s = cfg.server
    if not 0 <= s.port <= 65535:
        raise fail("server", "port", s.port, "must be 0..65535")
    if s.workers < 1:
        raise fail("server", "workers", s.workers, "must be >= 1")
    if bool(s.tls_cert) != bool(s.tls_key):
        key = "tls_cert" if s.tls_cert else "tls_key"
        raise ConfigError(
            f"{origins.of('server', key)}: server.tls_cert and server.tls_key must be set together"
        )
    for key in ("tls_cert", "tls_key"):  # a wrong path is named with its source here; a file
        path = getattr(s, key)  # that is there but is no PEM fails when the listener loads it
        if path and not os.path.isfile(path):
            raise fail("server", key, path, "no such file")
    for o in s.cors_allowed_origins:
        if o != "*" and not _ORIGIN.match(o):
            raise fail(
                "server",
                "cors_allowed_origins",
                o,
                'must be "*" or an origin like http://localhost:3000 (":*" for any port),'
                " without a path",
            )
    for h in s.allowed_hosts:
        if h != "*" and not _HOST.match(h):
            raise fail(
                "server",
                "allowed_hosts",
                h,
                'must be "*" or a host name or address, optionally with :port'
                " (no scheme, no path)",
            )
    up = cfg.upstream
    for key in ("gemini_base_url", "code_assist_base_url", "oauth_token_url", "oauth_auth_url"):
        url = getattr(up, key)
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise fail("upstream", key, url, "must be an http(s):// URL")
    if up.proxy:
        from rawgate.netaddr import parse_proxy

        try:
            parse_proxy(up.proxy)
        except ValueError:
            # The value may carry proxy credentials: name the key, not the value.
            raise fail(
                "upstream", "proxy", None, "must look like http://[user:password@]host:port"
            ) from None
    if cfg.routing.max_attempts < 1:
        raise fail("routing", "max_attempts", cfg.routing.max_attempts, "must be >= 1")
    # Model names go into upstream URLs: a bad mapping or target is a start-up line (exit 2),
    # not a traceback when the gateway is built.
    from rawgate.model_router import ModelRouter  # the router imports this module

    r = cfg.routing
    try:
        ModelRouter(
            r.default_model, dict(r.custom_mapping), pro_model=r.pro_model, lite_model=r.lite_model
        )
    except ConfigError as e:
        text = str(e)
        tier = next(
            (k for k in ("default", "pro", "lite") if f"the {k} model" in text), None
        )
        key = f"{tier}_model" if tier else "custom_mapping"
        raise ConfigError(f"{origins.of('routing', key)}: {e}") from None
    from rawgate.model_router import GEMINI_MODEL

    if not GEMINI_MODEL.match(r.embedding_model):
        raise fail("routing", "embedding_model", r.embedding_model, "must be a Gemini model id")
    if cfg.limits.embedding_parallel_chunks < 1:
        raise fail(
            "limits", "embedding_parallel_chunks", cfg.limits.embedding_parallel_chunks,
            "must be >= 1",
        )
    if r.retry_budget_ratio < 0:
        raise fail("routing", "retry_budget_ratio", r.retry_budget_ratio, "must be >= 0")
    if r.retry_budget_min < 0:
        raise fail("routing", "retry_budget_min", r.retry_budget_min, "must be >= 0")
    if not r.retry_budget_window_s > 0:
        raise fail("routing", "retry_budget_window_s", r.retry_budget_window_s, "must be > 0")
    st = cfg.state
    if st.backend == "redis" and not st.redis_url.startswith(("redis://", "rediss://", "unix://")):
        # The URL may carry a password: name the key, not the value.
        raise fail("state", "redis_url", None, "must start with redis://, rediss:// or unix://")
    if st.redis_cluster and not st.redis_url.startswith(("redis://", "rediss://")):
        raise fail("state", "redis_cluster", st.redis_cluster, "needs a redis:// or rediss:// URL")
    if not st.key_prefix or any(c in st.key_prefix for c in "{} \t\r\n"):
        raise fail(
            "state", "key_prefix", st.key_prefix, "must be non-empty, without braces or spaces"
        )
    if st.redis_timeout_ms < 1:
        raise fail("state", "redis_timeout_ms", st.redis_timeout_ms, "must be >= 1")
    if st.redis_max_connections < 1:
        raise fail("state", "redis_max_connections", st.redis_max_connections, "must be >= 1")
    if not st.oauth_refresh_lock_s > 0:
        raise fail("state", "oauth_refresh_lock_s", st.oauth_refresh_lock_s, "must be > 0")
    for sec in (cfg.limits, cfg.timeouts, cfg.state):
        name = type(sec).__name__.removesuffix("Config").lower()
        for f in msgspec.structs.fields(type(sec)):
            v = getattr(sec, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
                raise fail(name, f.name, v, "must be >= 0")
    # Checked here, not only where the app is built, so that `serve --workers N` refuses it
    # once in the parent and a SIGHUP reload refuses it before any worker sees it. Client keys
    # (`rawgate keys`: keys.json, or Redis) may be the only keys: then the app, which sees them,
    # makes the final check at start-up.
    mode = auth_mode(cfg)
    if mode != "off":
        if not cfg.auth.api_keys and not _client_keys_possible(cfg):
            why = ("auth", "mode") if cfg.auth.mode != "auto" else ("server", "allow_lan_access")
            raise ConfigError(
                f"{origins.of(*why)}: auth.mode = {mode!r} needs at least one key in"
                " auth.api_keys (or RAWGATE_AUTH_API_KEYS) or a client key (rawgate keys add"
                " NAME); refusing to start with an open door"
            )
        if any(not k.strip() for k in cfg.auth.api_keys):
            raise fail("auth", "api_keys", None, "contains an empty key")
    if any(not k.strip() for k in cfg.admin.api_keys):
        raise fail("admin", "api_keys", None, "contains an empty key")
    if set(cfg.admin.api_keys) & set(cfg.auth.api_keys):
        # One key for both would let a client drive the admin API (and the reverse).
        raise fail("admin", "api_keys", None, "must not repeat a key of auth.api_keys")


def auth_mode(cfg: Config) -> str:
    """The effective auth mode: `auto` resolves on allow_lan_access."""
    if cfg.auth.mode == "auto":
        return "all_except_health" if cfg.server.allow_lan_access else "off"
    return cfg.auth.mode


# Settings a SIGHUP reload cannot apply: they shape sockets, processes or objects built once at
# start (the listening sockets and their accept cap, the worker count, TLS, the upstream pool and
# its timeouts, the response store). A dotted name is one key, a bare name a whole section.
RESTART_SETTINGS: frozenset[str] = frozenset(
    {
        "server.host",
        "server.port",
        "server.allow_lan_access",
        "server.workers",
        "server.tls_cert",
        "server.tls_key",
        "server.fast_paths",
        "upstream",
        "limits.max_connections",
        "limits.listen_backlog",
        "limits.response_store_max_count",
        "limits.response_store_max_age_s",
        "limits.response_store_max_bytes",
        "limits.tool_schema_cache_max_bytes",
        "limits.tool_schema_max_work",
        "timeouts.upstream_connect_s",
        "timeouts.upstream_pool_s",
        "timeouts.upstream_headers_s",
        "timeouts.upstream_read_idle_s",
        "timeouts.upstream_write_s",
        # Opened once at start-up (cli/stack.py): the store connection and the log's writer.
        "state",
        "log.request_log",
        "log.request_log_days",
        "log.request_log_queue",
    }
)


def split_reload(running: Config, new: Config) -> tuple[Config, list[str]]:
    """What a reload applies: `new` with every RESTART_SETTINGS value kept from `running`, and
    the dotted names of those settings `new` changes (they wait for a restart)."""
    pending: list[str] = []
    sections: dict[str, Any] = {}
    for f in msgspec.structs.fields(Config):
        old_sec, new_sec = getattr(running, f.name), getattr(new, f.name)
        kept: dict[str, Any] = {}
        for g in msgspec.structs.fields(type(new_sec)):
            dotted = f"{f.name}.{g.name}"
            if f.name not in RESTART_SETTINGS and dotted not in RESTART_SETTINGS:
                continue
            old_v = getattr(old_sec, g.name)
            if old_v != getattr(new_sec, g.name):
                pending.append(dotted)
                kept[g.name] = old_v
        sections[f.name] = msgspec.structs.replace(new_sec, **kept) if kept else new_sec
    return Config(**sections), pending
