"""`rawgate emulate`: run the built-in Gemini emulator (Developer API, Code Assist, OAuth /token).

Every flag maps onto one field of `emulator_state.Settings`; the defaults give a ready demo
(an API key, an OAuth client and a refresh token), printed at start so a user can copy them.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import anyio
import msgspec

from rawgate.config import ConfigError
from rawgate.emulator.state import DEMO_ACCOUNT, OAuthAccount, Settings

__all__ = ["add_parser", "build_settings", "run"]

_D = Settings()  # the defaults shown in --help


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "emulate",
        help="run the built-in Gemini emulator (no account, no network)",
        description="Serve an emulated Gemini Developer API (/v1beta, /v1), Cloud Code Assist "
        "(/v1internal) and an OAuth token endpoint (/token) with deterministic replies that "
        "prompts can steer with [[emu:...]] directives (see the README).",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8046, help="port to listen on, 0 = any free port "
                   "(default: %(default)s)")
    p.add_argument("--tls-cert", default="", metavar="FILE", help="PEM certificate: serve HTTPS "
                   "with ALPN h2 and http/1.1 (needs --tls-key)")
    p.add_argument("--tls-key", default="", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--engine", choices=("standard", "fast"), default="standard",
                   help="standard: rawgate's listener (HTTP/1.1, h2c, TLS h2); fast: a minimal "
                   "HTTP/1.1-only server for benchmarks (default: %(default)s)")
    g = p.add_argument_group("credentials")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="accepted API key (repeatable; default: the demo key)")
    g.add_argument("--no-auth", action="store_true", help="accept any or no credential")
    g.add_argument("--client-id", default=_D.oauth_client_id,
                   help="OAuth client id /token accepts (default: %(default)s)")
    g.add_argument("--client-secret", default=_D.oauth_client_secret,
                   help="OAuth client secret /token accepts")
    g.add_argument("--refresh-token", action="append", default=None, metavar="TOKEN",
                   help="accepted OAuth refresh token (repeatable; account N gets email "
                   "userN@rawgate.invalid and project emu-project-N; default: the demo account)")
    g.add_argument("--token-lifetime", type=float, default=_D.access_token_lifetime_s,
                   metavar="S", help="access token lifetime in seconds (default: %(default)s)")
    g = p.add_argument_group("quotas")
    g.add_argument("--quota", type=int, default=None, metavar="N",
                   help="generate calls per credential per window, then 429 RESOURCE_EXHAUSTED "
                   "with RetryInfo (default: unlimited)")
    g.add_argument("--quota-window", type=float, default=_D.quota_window_s, metavar="S",
                   help="quota window in seconds (default: %(default)s)")
    g = p.add_argument_group("replies")
    g.add_argument("--chunks", type=int, default=_D.chunks, metavar="N",
                   help="text chunks per streamed reply (default: %(default)s)")
    g.add_argument("--chunk-chars", type=int, default=0, metavar="N",
                   help="fixed chunk size in characters instead of --chunks")
    g.add_argument("--chunk-delay-ms", type=float, default=0.0, metavar="MS",
                   help="delay between stream chunks (default: 0)")
    g.add_argument("--first-byte-ms", type=float, default=0.0, metavar="MS",
                   help="delay before every response head (default: 0)")
    g.add_argument("--stall-max", type=float, default=_D.stall_max_s, metavar="S",
                   help="a stall/hang directive drops the connection after this (default: "
                   "%(default)s)")
    g.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="serve an extra model id besides the built-in catalog (repeatable)")
    g.add_argument("--no-validate", action="store_true",
                   help="skip the Google-like request validation")
    g.add_argument("--h2-max-streams", type=int, default=100, metavar="N",
                   help="HTTP/2 MAX_CONCURRENT_STREAMS (Google: 100; default: %(default)s)")
    p.set_defaults(run=run)


def build_settings(args: argparse.Namespace) -> Settings:
    if args.refresh_token:
        accounts = tuple(OAuthAccount(f"user{i}@rawgate.invalid", tok, f"emu-project-{i}")
                         for i, tok in enumerate(args.refresh_token, 1))
    else:
        accounts = (DEMO_ACCOUNT,)
    return Settings(
        api_keys=tuple(args.api_key) if args.api_key else _D.api_keys,
        oauth_client_id=args.client_id,
        oauth_client_secret=args.client_secret,
        oauth_accounts=accounts,
        access_token_lifetime_s=args.token_lifetime,
        quota_requests=args.quota,
        quota_window_s=args.quota_window,
        chunks=max(1, args.chunks),
        chunk_chars=max(0, args.chunk_chars),
        chunk_delay_s=max(0.0, args.chunk_delay_ms) / 1000.0,
        first_byte_delay_s=max(0.0, args.first_byte_ms) / 1000.0,
        stall_max_s=args.stall_max,
        validate=not args.no_validate,
        require_auth=not args.no_auth,
        extra_models=tuple(args.model or ()),
    )


def run(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        print("rawgate emulate: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    settings = build_settings(args)
    try:
        import uvloop  # noqa: F401

        options: dict[str, Any] = {"use_uvloop": True}
    except ImportError:
        options = {}
    try:
        anyio.run(_main, args, settings, backend="asyncio", backend_options=options)
    except KeyboardInterrupt:
        pass
    except ConfigError as e:
        print(f"rawgate emulate: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"rawgate emulate: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


async def _main(args: argparse.Namespace, settings: Settings) -> None:
    from rawgate.emulator import server as emulator
    from rawgate.http.listener import server_ssl_context

    cfg = emulator.emulator_config(h2_max_streams=args.h2_max_streams)
    ctx = None
    if args.tls_cert:
        server = msgspec.structs.replace(cfg.server, tls_cert=args.tls_cert, tls_key=args.tls_key)
        ctx = server_ssl_context(msgspec.structs.replace(cfg, server=server))
    async with emulator.serve(host=args.host, port=args.port, settings=settings,
                              ssl_context=ctx, engine=args.engine, config=cfg) as emu:
        acct = emu.account
        print(f"rawgate emulator ({args.engine}) listening on {emu.base_url}\n"
              f"  Gemini API:   {emu.base_url}/v1beta  api key: {emu.api_key or '(none)'}\n"
              f"  Code Assist:  {emu.base_url}/v1internal  OAuth token URL: {emu.token_url}\n"
              f"  OAuth client: {emu.client_id} / {emu.client_secret}\n"
              f"  account:      {acct.email} refresh token: {acct.refresh_token} "
              f"project: {acct.project}", flush=True)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
