"""Tool-call ids that carry Gemini thought signatures through clients that know nothing of them.

Invariants:
- Gemini sends no call ids; rawgate mints `call_<24 random chars>` for each functionCall.
- When a functionCall part carries a `thoughtSignature`, the minted id embeds it losslessly:
  `call_<12 random chars>.ts.<signature in base64url, no padding>`. The signature is already
  base64 text; only the alphabet changes so that the id stays one URL/JSON-safe token.
- `split_call_id` is the exact inverse; an id rawgate did not mint yields no signature. A
  signature that is not standard padded base64 (a proxy's base64url form, an opaque token) is
  carried as `call_<12>.tx.<its UTF-8 bytes in base64url>` instead, so it too comes back intact.
- Only the call that carried a signature gets one back: never stamp one signature on every call.
- Gemini 3 rejects a model turn whose first functionCall lacks a signature; the documented escape
  hatch (gemini-cli's own) is SKIP_SIGNATURE, used only for such turns in the active loop.
- Responses API: a `reasoning` item's `encrypted_content` is `rg1.` + base64url(JSON
  `{"s": {call_id: signature}, "t": thought text or absent}`), no padding. The key "" holds a
  signature that sat on a text part (no call). `unpack_reasoning` never raises: content that
  rawgate did not pack (another gateway's, OpenAI's own) yields {}.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import string
from collections.abc import Callable

import orjson

__all__ = [
    "SKIP_SIGNATURE",
    "mint_call_id",
    "pack_reasoning",
    "random_alnum",
    "split_call_id",
    "unpack_reasoning",
]

SKIP_SIGNATURE = "skip_thought_signature_validator"
_MARK = ".ts."
_MARK_TEXT = ".tx."  # any other signature text, base64url of its UTF-8 bytes
_STD_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_ALPHABET = string.ascii_letters + string.digits
_TO_URLSAFE = str.maketrans("+/", "-_")
_FROM_URLSAFE = str.maketrans("-_", "+/")


# Random bytes mapped onto the 62 letters and digits: 1 us per id instead of 28 us for 24
# secrets.choice calls (every streamed tool call mints one). 256 % 62 leaves the first 8 symbols
# 1/256 likelier; ids need to be unique, not uniform: 24 symbols still carry > 140 bits.
_TO_ALNUM = bytes(ord(_ALPHABET[i % len(_ALPHABET)]) for i in range(256))


def _rand(n: int) -> str:
    return secrets.token_bytes(n).translate(_TO_ALNUM).decode("ascii")


random_alnum = _rand  # n random letters and digits, for ids of other fronts


def mint_call_id(
    signature: str | None = None, rand: Callable[[int], str] | None = None
) -> str:
    """A fresh OpenAI-style call id, carrying `signature` if given. `rand(n)`: n letters or
    digits (default: random; a transcoder under test injects its own)."""
    r = _rand if rand is None else rand
    if not signature:
        return "call_" + r(24)
    if _STD_B64.fullmatch(signature):
        return "call_" + r(12) + _MARK + signature.translate(_TO_URLSAFE).rstrip("=")
    raw = base64.urlsafe_b64encode(signature.encode()).rstrip(b"=").decode("ascii")
    return "call_" + r(12) + _MARK_TEXT + raw


def split_call_id(call_id: str) -> tuple[str, str | None]:
    """(call id, thought signature or None). The id itself is returned unchanged."""
    if not call_id.startswith("call_"):
        return call_id, None
    i = call_id.find(_MARK)
    if i < 0:
        j = call_id.find(_MARK_TEXT)
        enc = call_id[j + len(_MARK_TEXT) :] if j >= 0 else ""
        if not enc:
            return call_id, None
        try:
            text = base64.urlsafe_b64decode(enc + "=" * (-len(enc) % 4)).decode()
        except (binascii.Error, ValueError):
            return call_id, None
        return call_id, text or None
    enc = call_id[i + len(_MARK) :]
    if not enc:
        return call_id, None
    sig = enc.translate(_FROM_URLSAFE)
    return call_id, sig + "=" * (-len(sig) % 4)


_REASONING_PREFIX = "rg1."


def pack_reasoning(signatures: dict[str, str], thought_text: str | None) -> str:
    """The `encrypted_content` of a Responses reasoning item carrying these signatures."""
    doc: dict[str, object] = {"s": signatures}
    if thought_text:
        doc["t"] = thought_text
    raw = base64.urlsafe_b64encode(orjson.dumps(doc)).rstrip(b"=")
    return _REASONING_PREFIX + raw.decode("ascii")


def unpack_reasoning(encrypted_content: str) -> dict[str, str]:
    """call_id -> signature ("" = a text part's signature); {} for anything rawgate did not pack."""
    if not isinstance(encrypted_content, str) or not encrypted_content.startswith(
        _REASONING_PREFIX
    ):
        return {}
    enc = encrypted_content[len(_REASONING_PREFIX) :]
    try:
        doc = orjson.loads(base64.urlsafe_b64decode(enc + "=" * (-len(enc) % 4)))
    except (binascii.Error, ValueError):
        return {}
    sigs = doc.get("s") if isinstance(doc, dict) else None
    if not isinstance(sigs, dict):
        return {}
    return {k: v for k, v in sigs.items() if isinstance(k, str) and isinstance(v, str) and v}
