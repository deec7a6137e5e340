"""The admin key file `RAWGATE_HOME/admin_key`: made once, mode 0600, reused on the next start.

Invariants:
- Used only while `[admin] api_keys` is empty. The key is 32 random bytes, urlsafe base64
  without padding (43 characters), one line.
- Creation is atomic and happens once, whoever races: the key is written to a temp file
  (0600 from creation) which is then hard-linked to `admin_key`; link() fails when the file
  exists, and the loser reads the winner's key. `serve --workers N` makes it in the supervisor
  before any worker starts, so every worker reads the same key.
- A file that exists is reused as is (its mode tightened to 0600); an empty one is replaced.
- The key is never logged and never part of an error message: only the path is.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["ADMIN_KEY_FILE", "AdminKeyError", "admin_keys", "load_or_create"]

ADMIN_KEY_FILE = "admin_key"
KEY_BYTES = 32


class AdminKeyError(Exception):
    """The admin key file cannot be read or written (one line naming the path)."""


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    return path.read_text("ascii").strip()


def load_or_create(home: Path) -> tuple[str, bool]:
    """(the key, whether it was made now)."""
    path = home / ADMIN_KEY_FILE
    try:
        if path.exists():
            key = _read(path)
            if key:
                return key, False
            path.unlink()  # an empty file (a crash of an older writer): make a new key
        home.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(KEY_BYTES)
        tmp = home / f".{ADMIN_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, (key + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process made it first: use theirs
                return _read(path), False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return key, True
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise AdminKeyError(f"{path}: cannot read or create the admin key: {why}") from None


def admin_keys(configured: list[str], home: Path) -> tuple[list[str], str | None]:
    """The admin keys in force: `[admin] api_keys` if any (then (those, None)), else the key of
    the admin_key file, made if needed (then ([key], key): the caller may show it)."""
    if configured:
        return list(configured), None
    key, _ = load_or_create(home)
    return [key], key
