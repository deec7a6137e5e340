"""The account pool on disk: `$RAWGATE_HOME/accounts.json`, its records and its crash-safe writer.

Invariants:
- Format: `{"version": 1, "accounts": [Account, ...]}`. Anything else (bad JSON, empty or
  truncated file, wrong shape, unknown version or field, duplicate ids, a key-less account)
  raises AccountStoreError naming the file and the problem, never a secret. Such a file is never
  overwritten: `update()` re-reads it under the lock and refuses to write on top of it.
- Writes (`update`) are read-modify-write under an exclusive `fcntl.flock` on the sibling
  `accounts.json.lock`, so two processes (the CLI and N server workers) never lose each other's
  changes. The kernel drops a flock when its holder dies, kill -9 included: no stale locks.
- The bytes reach disk as: temp file in the same directory, created O_EXCL with mode 0600 (never
  briefly world-readable: the mode is set at creation, the umask can only remove bits), write
  all, fsync, rename over the old file, fsync the directory. A kill -9 or power cut at any point
  leaves the old file or the new one, never a torn or empty one. Stray temp files of a killed
  writer are removed by the next `update()` (it holds the lock, so they cannot be in use).
- `changed()` is one `stat()`: device, inode, size and mtime of the file against what the last
  `load()` read (taken with fstat on the descriptor it read, so a rename racing the read is seen
  as a change). Every write renames, so the inode changes even when mtime granularity is coarse.
- Access tokens are NOT stored here: they live about an hour, are cheap to refresh and would add
  a second secret and a write per refresh to this file. `oauth.TokenManager` keeps them in memory.
- Secrets (api_key, refresh_token) never appear in `repr()`, `display_name()`, `masked()` or any
  error message; listings show `mask_secret()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

__all__ = [
    "FORMAT_VERSION",
    "Account",
    "AccountStore",
    "AccountStoreError",
    "decode_store",
    "find_account",
    "mask_secret",
    "new_account_id",
    "validate_accounts",
    "write_atomic",
]

log = logging.getLogger("rawgate.accounts.store")

FORMAT_VERSION = 1
Kind = Literal["api_key", "oauth"]
# Ids are typed on the command line: short, url- and shell-safe.
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# last_error is shown in `accounts list`; one line, bounded.
LAST_ERROR_MAX_CHARS = 200
# Secrets shorter than this are shown as "****" only: 4+4 visible characters of a short secret
# would give away too much of it. Google API keys are 39 characters, refresh tokens ~100.
MASK_MIN_CHARS = 16


class AccountStoreError(Exception):
    """accounts.json cannot be read or written; the message is one line for the user."""


class Account(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One upstream identity: a Gemini API key or a Code Assist OAuth refresh token."""

    id: str
    kind: Kind
    label: str = ""
    email: str = ""
    api_key: str = ""  # secret (kind "api_key")
    refresh_token: str = ""  # secret (kind "oauth")
    project: str = ""  # Code Assist project id, discovered once and stored
    enabled: bool = True
    disabled_reason: str = ""
    created: int = 0  # unix seconds
    # Counters, written back in batches by the gateway (deltas added under the lock).
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    errors: int = 0
    last_error: str = ""

    def display_name(self) -> str:
        """What logs, headers (X-Account-Email) and listings call this account: never a secret."""
        return self.email or self.label or self.id

    def secret(self) -> str:
        return self.api_key if self.kind == "api_key" else self.refresh_token

    def add_stats(
        self,
        requests: int,
        tokens_in: int,
        tokens_out: int,
        errors: int,
        last_error: str | None = None,
    ) -> None:
        self.requests += requests
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.errors += errors
        if last_error:
            self.last_error = one_line(last_error, LAST_ERROR_MAX_CHARS)

    def masked(self) -> dict[str, Any]:
        """A listing view: every field, the secret masked."""
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.display_name(),
            "label": self.label,
            "email": self.email,
            "secret": mask_secret(self.secret()),
            "project": self.project,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "created": self.created,
            "requests": self.requests,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def __repr__(self) -> str:  # the default Struct repr would print the secrets
        state = "enabled" if self.enabled else f"disabled: {self.disabled_reason}"
        return (
            f"Account(id={self.id!r}, kind={self.kind!r}, name={self.display_name()!r}, "
            f"secret={mask_secret(self.secret())!r}, {state})"
        )

    __str__ = __repr__


class _File(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    accounts: list[Account]


class _Head(msgspec.Struct):
    version: Any = None


_decode_head = msgspec.json.Decoder(_Head).decode
_decode_file = msgspec.json.Decoder(_File).decode
_encoder = msgspec.json.Encoder()


def mask_secret(secret: str) -> str:
    """`AIza...wxyz` for long secrets, `****` for short ones, "" for none."""
    if not secret:
        return ""
    if len(secret) < MASK_MIN_CHARS:
        return "****"
    return f"{secret[:4]}...{secret[-4:]}"


def new_account_id(taken: set[str]) -> str:
    while True:
        candidate = secrets.token_hex(4)  # 8 hex characters: short to type, 4e9 values
        if candidate not in taken:
            return candidate


def find_account(accounts: list[Account], ref: str) -> Account:
    """The account named by `ref`: its id, else a unique label or email (case-insensitive)."""
    for a in accounts:
        if a.id == ref:
            return a
    low = ref.casefold()
    hits = [a for a in accounts if low and low in (a.label.casefold(), a.email.casefold())]
    if len(hits) == 1:
        return hits[0]
    if hits:
        ids = ", ".join(a.id for a in hits)
        raise AccountStoreError(f"{ref!r} names several accounts ({ids}); use the id")
    raise AccountStoreError(f"no account {ref!r} (see `rawgate accounts list`)")


def one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def validate_accounts(accounts: list[Account], source: str) -> None:
    """What every stored account list must satisfy (ids, secrets, counters)."""
    _validate(accounts, source)


def _validate(accounts: list[Account], source: str) -> None:
    seen: set[str] = set()
    for i, a in enumerate(accounts):
        where = f"{source}: accounts[{i}]"
        if not ID_RE.match(a.id):
            raise AccountStoreError(f"{where}: id {a.id!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        if a.id in seen:
            raise AccountStoreError(f"{where}: duplicate id {a.id!r}")
        seen.add(a.id)
        if a.kind == "api_key" and not a.api_key:
            raise AccountStoreError(f"{where} ({a.id}): api_key account without api_key")
        if a.kind == "oauth" and not a.refresh_token:
            raise AccountStoreError(f"{where} ({a.id}): oauth account without refresh_token")
        if min(a.requests, a.tokens_in, a.tokens_out, a.errors) < 0:
            raise AccountStoreError(f"{where} ({a.id}): negative counter")


def decode_store(data: bytes, source: str) -> list[Account]:
    """Parse and validate accounts.json bytes; AccountStoreError on anything unexpected."""
    hint = "fix or remove the file (rawgate left it untouched)"
    if not data.strip():
        raise AccountStoreError(f"{source}: file is empty; {hint}")
    try:
        head = _decode_head(data)
    except msgspec.ValidationError:  # (a DecodeError subclass: test it first)
        raise AccountStoreError(f"{source}: expected a JSON object; {hint}") from None
    except msgspec.DecodeError as e:
        raise AccountStoreError(f"{source}: not valid JSON ({e}); {hint}") from None
    if head.version != FORMAT_VERSION:
        if isinstance(head.version, int) and head.version > FORMAT_VERSION:
            raise AccountStoreError(
                f"{source}: format version {head.version} is newer than this rawgate "
                f"understands ({FORMAT_VERSION}); upgrade rawgate"
            )
        raise AccountStoreError(
            f"{source}: missing or unknown \"version\" (expected {FORMAT_VERSION}); {hint}"
        )
    try:
        doc = _decode_file(data)
    except msgspec.ValidationError as e:
        # msgspec names the path and the expected type, never the offending value.
        raise AccountStoreError(f"{source}: wrong shape: {e}; {hint}") from None
    _validate(doc.accounts, source)
    return doc.accounts


def encode_store(accounts: list[Account]) -> bytes:
    # Indented: people read and diff this file. ~300 bytes per account either way.
    raw = _encoder.encode(_File(version=FORMAT_VERSION, accounts=accounts))
    return msgspec.json.format(raw, indent=2) + b"\n"


# ---- crash-safe file writing ---------------------------------------------------------------------


def _tmp_glob(path: Path) -> str:
    return f".{path.name}.*.tmp"


def write_atomic(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers and crashes see the old bytes or the new ones.

    `durable=False` skips both fsyncs: for advisory files (cooldowns) where losing the last
    write on a power cut is harmless and the ~1-5 ms of two fsyncs per write is not.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)  # mode at creation: never briefly readable by others
    try:
        try:
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask removed
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        try:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:  # the new file is in place; only its durability is in doubt
            log.warning("fsync of directory %s failed: %s", directory, e.strerror)


Signature = tuple[int, int, int, int]


def _sig(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class AccountStore:
    """accounts.json: load, cheap change detection, and locked read-modify-write updates."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._loaded: Signature | None = None

    # ---- reading ----

    def _read(self) -> tuple[list[Account], Signature | None]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return [], None
        except OSError as e:
            raise AccountStoreError(f"{self.path}: cannot open: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                self._tighten(fd, st.st_mode)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        except OSError as e:
            raise AccountStoreError(f"{self.path}: cannot read: {e.strerror}") from None
        finally:
            os.close(fd)
        return decode_store(b"".join(chunks), str(self.path)), _sig(st)

    def _tighten(self, fd: int, mode: int) -> None:
        # A secrets file readable by others (e.g. written by hand): close the hole and say so.
        try:
            os.fchmod(fd, 0o600)
            log.warning("%s was mode %o; now 0600 (it holds secrets)", self.path, mode & 0o777)
        except OSError as e:
            log.warning("%s is mode %o and cannot be changed: %s", self.path, mode & 0o777, e)

    def load(self) -> list[Account]:
        """All accounts ([] when the file does not exist). Remembers the file for `changed()`."""
        accounts, sig = self._read()
        self._loaded = sig
        return accounts

    def changed(self) -> bool:
        """True when the file differs from what the last `load()` read (one stat call)."""
        try:
            sig: Signature | None = _sig(os.stat(self.path))
        except FileNotFoundError:
            sig = None
        except OSError:
            return False  # transient; the next poll will tell
        return sig != self._loaded

    # ---- writing ----

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # The critical section is one read + one write + two fsyncs (milliseconds). flock blocks
        # until the holder is done; a dead holder's lock is released by the kernel.
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise AccountStoreError(f"{self.lock_path}: cannot open: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _sweep_tmp(self) -> None:
        for stray in self.path.parent.glob(_tmp_glob(self.path)):
            with contextlib.suppress(OSError):
                stray.unlink()

    def update(self, fn: Callable[[list[Account]], list[Account] | None]) -> list[Account]:
        """Lock, re-read, apply `fn` (it may mutate the list and return it, or None), write.

        Raises AccountStoreError (and writes nothing) when the current file is unreadable, when
        `fn`'s result is invalid, or when the write fails; the old file is then intact. Does
        not refresh `changed()`: a process's own write shows up as a change, so a reload after
        it sees exactly what is on disk.
        """
        with self._locked():
            self._sweep_tmp()
            current, _ = self._read()
            result = fn(current)
            accounts = current if result is None else result
            _validate(accounts, str(self.path))
            data = encode_store(accounts)
            try:
                write_atomic(self.path, data)
            except OSError as e:
                raise AccountStoreError(f"{self.path}: cannot write: {e.strerror}") from None
        return accounts

    # ---- helpers for the CLI and the gateway ----

    def add(self, account: Account) -> Account:
        """Append `account` (a fresh id if its id is taken); refuses a duplicate secret."""

        def apply(accounts: list[Account]) -> None:
            dup = find_secret(accounts, account.secret())
            if dup is not None:
                raise AccountStoreError(f"this {account.kind} is already account {dup.id}")
            if not account.id or account.id in {a.id for a in accounts}:
                account.id = new_account_id({a.id for a in accounts})
            accounts.append(account)

        self.update(apply)
        return account

    def add_api_key(self, api_key: str, *, label: str = "", email: str = "") -> Account:
        key = api_key.strip()
        if not key:
            raise AccountStoreError("the API key is empty")
        return self.add(
            Account(id="", kind="api_key", api_key=key, label=label, email=email,
                    created=int(time.time()))
        )  # fmt: skip

    def add_oauth(
        self, refresh_token: str, *, email: str = "", project: str = "", label: str = ""
    ) -> Account:
        token = refresh_token.strip()
        if not token:
            raise AccountStoreError("the refresh token is empty")
        return self.add(
            Account(id="", kind="oauth", refresh_token=token, email=email, project=project,
                    label=label, created=int(time.time()))
        )  # fmt: skip

    def remove(self, ref: str) -> Account:
        found: list[Account] = []

        def apply(accounts: list[Account]) -> list[Account]:
            acc = find_account(accounts, ref)
            found.append(acc)
            return [a for a in accounts if a.id != acc.id]

        self.update(apply)
        return found[0]

    def set_enabled(self, ref: str, enabled: bool, reason: str = "") -> Account:
        found: list[Account] = []

        def apply(accounts: list[Account]) -> None:
            acc = find_account(accounts, ref)
            acc.enabled = enabled
            acc.disabled_reason = "" if enabled else one_line(reason, LAST_ERROR_MAX_CHARS)
            found.append(acc)

        self.update(apply)
        return found[0]

    def import_accounts(self, incoming: list[Account]) -> tuple[list[Account], int]:
        """Add accounts whose secret is not present yet. Returns (added, skipped duplicates)."""
        added: list[Account] = []
        skipped = [0]

        def apply(accounts: list[Account]) -> None:
            added.clear()
            skipped[0] = 0
            ids = {a.id for a in accounts}
            for acc in incoming:
                if find_secret(accounts, acc.secret()) is not None:
                    skipped[0] += 1
                    continue
                new = msgspec.structs.replace(acc)
                if not ID_RE.match(new.id) or new.id in ids:
                    new.id = new_account_id(ids)
                ids.add(new.id)
                accounts.append(new)
                added.append(new)

        self.update(apply)
        return added, skipped[0]


def find_secret(accounts: list[Account], secret: str) -> Account | None:
    for a in accounts:
        if secret and a.secret() == secret:
            return a
    return None
