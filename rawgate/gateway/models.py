"""The model listing behind GET /v1/models: the upstream's models, cached, with a fallback.

Invariants:
- One upstream listing per MODELS_CACHE_S (models change rarely), asked of the first enabled API
  key account that answers; a listing that does not answer within MODELS_FETCH_TIMEOUT_S is
  skipped. Code Assist accounts cannot list: with no usable listing, FALLBACK_MODELS.
- A change of accounts (hot reload) drops the cache.
- The listing never carries a key: the request's key travels in a header, never in the URL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import anyio
import orjson

from rawgate.accounts.store import Account
from rawgate.errors import RawgateError
from rawgate.seam import Header
from rawgate.upstream.client import UpstreamClient

__all__ = ["FALLBACK_MODELS", "MODELS_CACHE_S", "MODELS_FETCH_TIMEOUT_S", "ModelListing"]


# Upstream model listings change rarely; one fetch per 10 minutes keeps /v1/models cheap.
MODELS_CACHE_S = 600.0
# A model listing that does not answer within this is skipped (the fallback list is used).
MODELS_FETCH_TIMEOUT_S = 10.0
# Listed when no account can list models (Code Assist accounts only, or the listing failed).
FALLBACK_MODELS = (
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-3-pro-preview",
    "gemini-3-flash-preview",
)


class ModelListing:
    """Gemini model names from the upstream (`gemini_base`: .../v1beta/models/), cached."""

    def __init__(
        self,
        client: UpstreamClient,
        gemini_base: str,
        accounts: Callable[[], Iterable[Account]],
        user_agent: Header,
    ) -> None:
        self._client = client
        self._url = gemini_base.rstrip("/") + "?pageSize=1000"
        self._accounts = accounts
        self._user_agent = user_agent
        self._cache: tuple[float, list[str]] | None = None

    def invalidate(self) -> None:
        self._cache = None

    async def names(self) -> list[str]:
        now = time.monotonic()
        cache = self._cache
        if cache is not None and now - cache[0] < MODELS_CACHE_S:
            return cache[1]
        names: list[str] = []
        for acc in self._accounts():
            if acc.kind != "api_key" or not acc.enabled:
                continue
            try:
                with anyio.fail_after(MODELS_FETCH_TIMEOUT_S):
                    headers = [self._user_agent, (b"x-goog-api-key", acc.api_key.encode())]
                    resp = await self._client.request("GET", self._url, headers)
                    async with resp:
                        raw = await resp.read()
                        ok = resp.status == 200
            except (RawgateError, TimeoutError):
                continue
            if ok:
                names = _model_names(raw)
                if names:
                    break
        if not names:
            names = list(FALLBACK_MODELS)
        self._cache = (now, names)
        return names


def _model_names(raw: bytes) -> list[str]:
    try:
        doc = orjson.loads(raw)
        out: list[str] = []
        for m in doc.get("models", []):
            methods = m.get("supportedGenerationMethods")
            if methods and "generateContent" not in methods:
                continue
            out.append(str(m["name"]).removeprefix("models/"))
        return out
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return []
