"""Gemini thought signatures given to Anthropic clients, tagged so only rawgate's come back.

Invariants:
- A signature leaves rawgate only inside a tagged wrapper: a thinking block's `signature` is
  `rgs1.<mac>.<signature>` and a tool_use id is `toolu_<12 random>-ts-<mac><signature in
  base64url>`; `<mac>` is 22 base64url characters, the first 16 bytes of HMAC-SHA256 over the
  Gemini model name and the signature, keyed by a per-installation secret.
- `open_*` returns the signature only when the tag verifies for the model the request is about to
  call: a signature from real Anthropic, another gateway, another model or an edited history
  yields None and the caller falls back as Gemini requires (SKIP_SIGNATURE on the first call of
  a turn in the active loop). So nothing rawgate did not mint, for that model, reaches Google.
- Tool ids stay in Anthropic's id alphabet `[A-Za-z0-9_-]`; ids without a signature are
  `toolu_<24 random>`.
- No I/O: the key is passed in (cli/stack load or create it under RAWGATE_HOME).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

from rawgate.translate.signatures import random_alnum

__all__ = ["SignatureTagger"]

_WRAP = "rgs1."
_ID_PREFIX = "toolu_"
_ID_MARK = "-ts-"
_MAC_CHARS = 22  # 16 bytes in unpadded base64url
_ID_HEAD = len(_ID_PREFIX) + 12 + len(_ID_MARK)
_URLSAFE = re.compile(r"[A-Za-z0-9_-]*")


def _b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64u(text: str) -> bytes | None:
    if not _URLSAFE.fullmatch(text):
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


class SignatureTagger:
    """Wraps and opens thought signatures with one installation key (see the module note)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the signature key must be at least 16 bytes")
        self._key = key

    def _mac(self, model: str, signature: str) -> str:
        msg = model.encode() + b"\x00" + signature.encode()
        return _b64u(hmac.new(self._key, msg, hashlib.sha256).digest()[:16])

    # ---- thinking blocks ---------------------------------------------------------------------

    def wrap(self, model: str, signature: str) -> str:
        """The `signature` field of a thinking block carrying this Gemini signature."""
        return _WRAP + self._mac(model, signature) + "." + signature

    def open(self, model: str, wrapped: object) -> str | None:
        """The Gemini signature inside a thinking block's `signature`, or None if rawgate did
        not mint it for `model` (see the module note)."""
        if not isinstance(wrapped, str) or not wrapped.startswith(_WRAP):
            return None
        rest = wrapped[len(_WRAP) :]
        mac, dot, sig = rest[:_MAC_CHARS], rest[_MAC_CHARS : _MAC_CHARS + 1], rest[_MAC_CHARS + 1 :]
        if dot != "." or not sig:
            return None
        if not hmac.compare_digest(mac, self._mac(model, sig)):
            return None
        return sig

    # ---- tool_use ids ------------------------------------------------------------------------

    def tool_id(self, model: str, signature: str | None, rand: str | None = None) -> str:
        """A fresh tool_use id; with a signature, one that carries it (tagged). `rand` lets a
        test fix the random part (12 characters with a signature, 24 without)."""
        if not signature:
            return _ID_PREFIX + (rand if rand is not None else random_alnum(24))
        head = _ID_PREFIX + (rand if rand is not None else random_alnum(12)) + _ID_MARK
        return head + self._mac(model, signature) + _b64u(signature.encode())

    def open_tool_id(self, model: str, tool_id: object) -> str | None:
        """The signature a tool_use id carries, or None (no signature, or not rawgate's for
        `model`)."""
        if not isinstance(tool_id, str) or len(tool_id) <= _ID_HEAD + _MAC_CHARS:
            return None
        if not tool_id.startswith(_ID_PREFIX) or tool_id[_ID_HEAD - 4 : _ID_HEAD] != _ID_MARK:
            return None
        mac = tool_id[_ID_HEAD : _ID_HEAD + _MAC_CHARS]
        raw = _unb64u(tool_id[_ID_HEAD + _MAC_CHARS :])
        if raw is None:
            return None
        try:
            sig = raw.decode()
        except UnicodeDecodeError:
            return None
        if not sig or not hmac.compare_digest(mac, self._mac(model, sig)):
            return None
        return sig
