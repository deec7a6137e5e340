"""Tool-call ids that carry Gemini thought signatures through clients that know nothing of them.

Invariants:
- Gemini sends no call ids; rawgate mints `call_<24 random chars>` for each functionCall.
- When a functionCall part carries a `thoughtSignature`, the minted id embeds it losslessly:
  `call_<12 random chars>.ts.<signature in base64url, no padding>`. The signature is already
  base64 text; only the alphabet changes so that the id stays one URL/JSON-safe token.
- `split_call_id` is the exact inverse; an id rawgate did not mint yields no signature.
- Only the call that carried a signature gets one back: never stamp one signature on every call.
- Gemini 3 rejects a model turn whose first functionCall lacks a signature; the documented escape
  hatch (gemini-cli's own) is SKIP_SIGNATURE, used only for such turns in the active loop.
"""

from __future__ import annotations

import secrets
import string

__all__ = ["SKIP_SIGNATURE", "mint_call_id", "split_call_id"]

SKIP_SIGNATURE = "skip_thought_signature_validator"
_MARK = ".ts."
_ALPHABET = string.ascii_letters + string.digits
_TO_URLSAFE = str.maketrans("+/", "-_")
_FROM_URLSAFE = str.maketrans("-_", "+/")


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def mint_call_id(signature: str | None = None) -> str:
    """A fresh OpenAI-style call id, carrying `signature` if given."""
    if not signature:
        return "call_" + _rand(24)
    return "call_" + _rand(12) + _MARK + signature.translate(_TO_URLSAFE).rstrip("=")


def split_call_id(call_id: str) -> tuple[str, str | None]:
    """(call id, thought signature or None). The id itself is returned unchanged."""
    i = call_id.find(_MARK)
    if i < 0 or not call_id.startswith("call_"):
        return call_id, None
    enc = call_id[i + len(_MARK) :]
    if not enc:
        return call_id, None
    sig = enc.translate(_FROM_URLSAFE)
    return call_id, sig + "=" * (-len(sig) % 4)
