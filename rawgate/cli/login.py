"""`rawgate accounts login`: Google's installed-app OAuth flow, then the account is stored.

Invariants:
- The decisions (PKCE pair, state, the URL, reading a redirect, the code exchange's answer) are
  oauth.py's, pure; this module does the I/O: a loopback listener (rawgate's own, on
  127.0.0.1 and a free port) that receives the browser's redirect, stdin for a pasted
  redirect or code, and rawgate's upstream client for the token endpoint and Code Assist (so
  upstream.proxy / ca_file apply as they do to `rawgate serve`).
- Both modes listen on the loopback: with a browser the redirect lands there; without one
  (`--no-browser`, or no display) the user opens the URL elsewhere and pastes the address the
  browser ended on (or the bare code), and a redirect reaching the loopback still counts.
- A redirect or paste with another `state` is refused and the wait goes on; the whole wait is
  bounded by `--timeout`. Nothing printed or raised contains the code, the verifier, the
  client secret or a token.
- The refresh token is stored even when project discovery fails (it cannot be had again
  without a new sign-in): the gateway then discovers the project on first use, as it does for
  `add-oauth` without `--project`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode

import anyio
import anyio.from_thread
import anyio.lowlevel
import orjson

from rawgate import __version__
from rawgate.accounts.oauth import (
    LoginRequest,
    OAuthError,
    OAuthLoginFailed,
    OAuthLoginTimeout,
    code_from_redirect,
    discover_project,
    parse_code_response,
)
from rawgate.accounts.store import Account, AccountStore
from rawgate.config import Config
from rawgate.errors import RawgateError
from rawgate.seam import Request, ResponseSink
from rawgate.translate.gemini import error_from_upstream

__all__ = ["LOGIN_TIMEOUT_S", "LoginOptions", "has_display", "login"]

# Default of --timeout: how long the sign-in may take, from the printed URL to the code.
LOGIN_TIMEOUT_S = 300.0
# Bodies read from the token endpoint / Code Assist during login (JSON of a few hundred bytes).
LOGIN_BODY_MAX_BYTES = 64 * 1024
LOOPBACK_HOST = "127.0.0.1"

Header = tuple[bytes, bytes]
_UA: Header = (b"user-agent", f"rawgate/{__version__}".encode())
_HTML: list[Header] = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control",
                                                                         b"no-store")]


def has_display(env: dict[str, str] | None = None, platform: str = sys.platform) -> bool:
    """Whether a local browser can be opened: macOS and Windows always, else X11 or Wayland."""
    env = dict(os.environ) if env is None else env
    if platform == "darwin" or platform.startswith(("win", "cygwin")):
        return True
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


@dataclass(slots=True)
class LoginOptions:
    no_browser: bool = False
    email: str = ""
    project: str = ""
    label: str = ""
    timeout_s: float = LOGIN_TIMEOUT_S


def _page(title: str, text: str) -> bytes:
    return (f"<!DOCTYPE html><meta charset=utf-8><title>rawgate: {title}</title>"
            f"<h1>{title}</h1><p>{text}</p>").encode()


class _Waiter:
    """Collects the first acceptable code, from the loopback redirect or from stdin."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.code = ""
        self.error: OAuthError | None = None
        self.done = anyio.Event()
        self.refused = 0  # redirects/pastes with a foreign state

    def offer(self, text: str) -> OAuthError | None:
        """Take a redirect URL/query or pasted code; the error when it is refused."""
        if self.done.is_set():
            return None
        try:
            self.code = code_from_redirect(text, self.state)
        except OAuthError as e:
            if e.code == "oauth_state_mismatch":
                self.refused += 1
                return e  # someone else's redirect: keep waiting for ours
            self.error = e
        self.done.set()
        return self.error

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        """The loopback app: Google redirects the browser here with ?code=&state=."""
        params = dict(parse_qsl(request.query))
        if request.method != "GET" or not ({"code", "error"} & params.keys()):
            await sink.respond(404, _HTML, _page("not found", "This is rawgate's sign-in "
                                                              "listener."))
            return
        if self.done.is_set():
            await sink.respond(200, _HTML, _page("already done", "You can close this tab."))
            return
        err = self.offer(request.query)
        if err is None:
            await sink.respond(200, _HTML, _page(
                "Signed in", "rawgate received the sign-in; you can close this tab."))
        elif err.code == "oauth_state_mismatch":
            await sink.respond(400, _HTML, _page("Refused", "This redirect does not belong to "
                                                            "the running sign-in."))
        else:
            await sink.respond(400, _HTML, _page("Sign-in failed", err.message))


def _read_stdin(stream: IO[str], token: Any, deliver: Callable[[str], None]) -> None:
    # A daemon thread: a blocked readline must not keep the process alive once login is done.
    for line in stream:
        if line.strip():
            try:
                anyio.from_thread.run_sync(deliver, line, token=token)
            except RuntimeError:  # the event loop is gone
                return


async def login(
    cfg: Config,
    store: AccountStore,
    opts: LoginOptions,
    *,
    out: IO[str] = sys.stdout,
    stdin: IO[str] = sys.stdin,
    open_browser: Callable[[str], bool] = webbrowser.open,
) -> tuple[Account, str]:
    """Run the flow; returns the stored account and a warning ("" if none).

    Raises RawgateError (OAuthError, ...) with a message fit for the user.
    """
    from rawgate.http.listener import open_server
    from rawgate.upstream.client import UpstreamClient

    up = cfg.upstream
    if not up.oauth_client_id or not up.oauth_client_secret:
        raise OAuthLoginFailed(
            "rawgate ships no OAuth client: set upstream.oauth_client_id and "
            "upstream.oauth_client_secret in config.toml (or RAWGATE_UPSTREAM_OAUTH_CLIENT_ID / "
            "RAWGATE_UPSTREAM_OAUTH_CLIENT_SECRET) to an installed-app (Desktop) OAuth client",
            code="oauth_not_configured",
        )
    paste = opts.no_browser or not has_display()
    waiter = _Waiter("")  # its state is set once the port, hence the redirect_uri, is known
    async with open_server(waiter, Config(), host=LOOPBACK_HOST, port=0) as server:
        redirect_uri = f"http://{LOOPBACK_HOST}:{server.port}/"
        req = LoginRequest.new(up.oauth_auth_url, up.oauth_client_id, redirect_uri, opts.email)
        waiter.state = req.state
        _say(out, "Sign in with the Google account to add (Code Assist), at this URL:\n\n"
                  f"  {req.url}\n")
        if not paste:
            try:
                opened = open_browser(req.url)
            except Exception:  # webbrowser.Error, a broken $BROWSER: the paste flow still works
                opened = False
            paste = not opened
        if paste:
            _say(out, "After you approve, the browser goes to "
                      f"{redirect_uri}?... which may not load on another machine: paste that "
                      "page's full address (or the code it shows) here and press Enter:")
            token = anyio.lowlevel.current_token()

            def deliver(line: str) -> None:
                err = waiter.offer(line)
                if err is not None and err.code == "oauth_state_mismatch":
                    _say(out, f"{err.message}; paste the address of this sign-in:")

            threading.Thread(target=_read_stdin, args=(stdin, token, deliver), daemon=True,
                             name="rawgate-login-stdin").start()
        else:
            _say(out, f"Waiting for the browser to come back to {redirect_uri} ...")
        with anyio.move_on_after(opts.timeout_s):
            await waiter.done.wait()
        if not waiter.done.is_set():
            raise OAuthLoginTimeout(f"no sign-in within {opts.timeout_s:g} s (--timeout)")
        if waiter.error is not None:
            raise waiter.error
    async with UpstreamClient(up, cfg.timeouts) as client:
        return await _finish(client, cfg, store, req, waiter.code, opts)


def _say(out: IO[str], text: str) -> None:
    print(text, file=out, flush=True)


async def _finish(client: Any, cfg: Config, store: AccountStore, req: LoginRequest, code: str,
                  opts: LoginOptions) -> tuple[Account, str]:
    up = cfg.upstream
    fields = req.token_fields(code, up.oauth_client_id, up.oauth_client_secret)
    secrets = (code, req.verifier, up.oauth_client_secret)
    try:
        resp = await client.request(
            "POST", up.oauth_token_url,
            [(b"content-type", b"application/x-www-form-urlencoded"), _UA],
            urlencode(fields).encode(),
        )
        async with resp:
            status, body = resp.status, await resp.read(LOGIN_BODY_MAX_BYTES)
    except RawgateError as e:
        raise OAuthError(f"the token endpoint {up.oauth_token_url} could not be reached: "
                         f"{e.message}", code="oauth_login_failed") from None
    grant = parse_code_response(status, body, time.time(), secrets)
    acc = Account(id="", kind="oauth", refresh_token=grant.refresh_token,
                  email=opts.email or grant.email, project=opts.project, label=opts.label,
                  created=int(time.time()))
    ca_base = up.code_assist_base_url.rstrip("/") + "/v1internal:"

    async def post_json(method: str, token: str, payload: dict[str, Any]) -> bytes:
        headers = [(b"content-type", b"application/json"), _UA,
                   (b"authorization", b"Bearer " + token.encode())]
        r = await client.request("POST", ca_base + method, headers, orjson.dumps(payload))
        async with r:
            raw = await r.read(LOGIN_BODY_MAX_BYTES)
            if r.status != 200:
                raise error_from_upstream(r.status, raw, r.headers)
            return bytes(raw)

    warning = ""
    try:
        acc.project = await discover_project(acc, grant.access_token, post_json)
    except RawgateError as e:
        warning = (f"the Code Assist project was not found ({e.message}); rawgate tries again "
                   "on the account's first request")
    stored = store.add(acc)
    return stored, warning
