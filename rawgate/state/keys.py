"""Client keys (`rawgate keys`): records, hashing, and the local store `$RAWGATE_HOME/keys.json`.

Invariants:
- A key is `rk-` + 43 characters of base64url (32 random bytes). It is shown once, when made
  (`add`, `rotate`); what is stored is `hash_key(salt, key)` = HMAC-SHA256 keyed by a per-install
  salt (hex). The salt is not a secret: it makes the same key hash differently in two installs
  and rules out precomputed tables. 256 random bits need no slow hash: a stolen keys.json gives
  no key. Listings show `hint` (`rk-AbCd...wxyz`), never more.
- Names are typed on the command line: 1-64 of A-Z a-z 0-9 _ . - and unique.
- keys.json: `{"version": 1, "salt": HEX, "keys": [KeyRecord, ...]}`, mode 0600, written like
  accounts.json (flock on the sibling `.lock`, temp file + rename: old or new, never torn); a
  file that does not parse raises KeyStoreError and is never overwritten.
- The record edits (`add_record`, `rotate_record`, ...) are pure functions over a name->record
  dict, shared by both backends so they behave the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from rawgate.accounts.store import write_atomic
from rawgate.state.limiter import Limits

__all__ = [
    "KEY_PREFIX",
    "KeyFile",
    "KeyRecord",
    "KeyStoreError",
    "add_record",
    "decode_record",
    "encode_record",
    "hash_key",
    "new_key",
    "new_salt",
    "parse_since",
    "rotate_record",
]

KEY_PREFIX = "rk-"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
FORMAT_VERSION = 1
# A key's model patterns: a few globs, not a table (each is matched per request).
MAX_MODEL_PATTERNS = 32
MAX_PATTERN_CHARS = 128


class KeyStoreError(Exception):
    """A key operation failed; the message is one line for the user, never a key."""


class KeyRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    hash: str  # hex HMAC-SHA256(salt, key)
    hint: str  # rk-AbCd...wxyz
    enabled: bool = True
    created: int = 0  # unix seconds
    rotated: int = 0  # unix seconds of the last rotate, 0 = never
    rpm: int = 0  # 0 = no limit
    tpm: int = 0
    daily_tokens: int = 0
    models: list[str] = msgspec.field(default_factory=list)  # fnmatch patterns; [] = every model

    def limits(self) -> Limits:
        return Limits(self.rpm, self.tpm, self.daily_tokens, tuple(self.models))

    def masked(self) -> dict[str, Any]:
        """A listing view (the hash is left out too: it is of no use to a reader)."""
        return {
            "name": self.name,
            "key": self.hint,
            "enabled": self.enabled,
            "created": self.created,
            "rotated": self.rotated,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "daily_tokens": self.daily_tokens,
            "models": list(self.models),
        }


class _File(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    salt: str
    keys: list[KeyRecord]


_enc = msgspec.json.Encoder()
_dec_file = msgspec.json.Decoder(_File)
_dec_record = msgspec.json.Decoder(KeyRecord)


def encode_record(rec: KeyRecord) -> bytes:
    return _enc.encode(rec)


def decode_record(data: bytes) -> KeyRecord:
    return _dec_record.decode(data)


def new_salt() -> str:
    return secrets.token_hex(16)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(salt: str, key: str) -> str:
    return hmac.new(bytes.fromhex(salt), key.encode(), hashlib.sha256).hexdigest()


def _hint(key: str) -> str:
    return f"{key[:7]}...{key[-4:]}"


def _check_limits(rpm: int, tpm: int, daily_tokens: int, models: list[str]) -> None:
    for label, v in (("--rpm", rpm), ("--tpm", tpm), ("--daily-tokens", daily_tokens)):
        if v < 0:
            raise KeyStoreError(f"{label} must be >= 0 (0 = no limit), got {v}")
    if len(models) > MAX_MODEL_PATTERNS:
        raise KeyStoreError(f"at most {MAX_MODEL_PATTERNS} --models patterns")
    for m in models:
        if not m or len(m) > MAX_PATTERN_CHARS or any(c.isspace() for c in m):
            raise KeyStoreError(
                f"model pattern {m[:MAX_PATTERN_CHARS]!r}: 1-128 characters, no spaces"
            )


def add_record(
    records: dict[str, KeyRecord],
    salt: str,
    name: str,
    *,
    rpm: int = 0,
    tpm: int = 0,
    daily_tokens: int = 0,
    models: list[str] | None = None,
    now: int | None = None,
) -> tuple[KeyRecord, str]:
    """A new record for `name` and its plain key (added to `records`)."""
    if not NAME_RE.match(name):
        raise KeyStoreError(f"key name {name[:64]!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if name in records:
        raise KeyStoreError(f"a key named {name!r} exists (rotate it, or remove it first)")
    pats = list(models or [])
    _check_limits(rpm, tpm, daily_tokens, pats)
    key = new_key()
    rec = KeyRecord(
        name=name, hash=hash_key(salt, key), hint=_hint(key),
        created=int(time.time()) if now is None else now,
        rpm=rpm, tpm=tpm, daily_tokens=daily_tokens, models=pats,
    )  # fmt: skip
    records[name] = rec
    return rec, key


def find(records: dict[str, KeyRecord], name: str) -> KeyRecord:
    rec = records.get(name)
    if rec is None:
        raise KeyStoreError(f"no key named {name!r} (see `rawgate keys list`)")
    return rec


def rotate_record(
    records: dict[str, KeyRecord], salt: str, name: str, now: int | None = None
) -> tuple[KeyRecord, str]:
    """A new key for `name`, same limits and usage; the old key stops working at once."""
    old = find(records, name)
    key = new_key()
    rec = msgspec.structs.replace(
        old, hash=hash_key(salt, key), hint=_hint(key),
        rotated=int(time.time()) if now is None else now,
    )  # fmt: skip
    records[name] = rec
    return rec, key


def parse_since(text: str) -> int:
    """`90s`, `30m`, `24h`, `7d` -> seconds (the `--since` of `keys usage`)."""
    m = re.fullmatch(r"\s*(\d{1,7})\s*([smhd])\s*", text)
    if not m:
        raise KeyStoreError(f"--since {text[:32]!r}: expected a number and s, m, h or d (24h)")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class KeyFile:
    """keys.json: load, a one-stat change check, and locked read-modify-write updates."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._seen: tuple[int, int, int] | None = None

    def _read(self) -> tuple[str, dict[str, KeyRecord]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return "", {}
        except OSError as e:
            raise KeyStoreError(f"{self.path}: cannot read: {e.strerror}") from None
        try:
            doc = _dec_file.decode(data)
        except msgspec.DecodeError as e:
            raise KeyStoreError(
                f"{self.path}: not a keys file ({e}); fix or remove it (left untouched)"
            ) from None
        if doc.version != FORMAT_VERSION:
            raise KeyStoreError(f"{self.path}: unknown version {doc.version}")
        return doc.salt, {r.name: r for r in doc.keys}

    def load(self) -> tuple[str, dict[str, KeyRecord]]:
        """(salt, records by name); ("", {}) when there is no file yet."""
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            self._seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        return self._read()

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return self._seen is not None
        return (st.st_ino, st.st_size, st.st_mtime_ns) != self._seen

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update(self, fn: Callable[[str, dict[str, KeyRecord]], Any]) -> Any:
        """Lock, re-read, let `fn(salt, records)` edit the dict in place, write; fn's result."""
        with self._locked():
            salt, records = self._read()
            salt = salt or new_salt()
            result = fn(salt, records)
            doc = _File(FORMAT_VERSION, salt, sorted(records.values(), key=lambda r: r.name))
            try:
                write_atomic(self.path, msgspec.json.format(_enc.encode(doc), indent=2) + b"\n")
            except OSError as e:
                raise KeyStoreError(f"{self.path}: cannot write: {e.strerror}") from None
        return result
