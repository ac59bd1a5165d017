"""The hashing step after validation, with a controller-side cache so reruns hash nothing.

A SHA512-CRYPT hash costs the same to verify as to make (5000 rounds of SHA-512, a few
milliseconds), so checking a password against last run's hash would save nothing. Instead the
controller keeps a cache that maps a fingerprint of ``(login, password, salt_key, scheme)`` to
the hash made last time. The fingerprint is HMAC-SHA256 under a random 256-bit key stored beside
the cache, so the cache file alone does not let anyone test password guesses any faster than
the hashes themselves do; and the hashes are what every relay's Dovecot password file holds
anyway. Both files are mode 0600 in a directory of mode 0700, owned by the controller user, who
already holds the vault password (and so every plaintext): the cache gives that user nothing
new. It can be turned off (``cache=None`` here, ``password_cache: false`` in the action plugin).

Only the entries in use are kept. The cache file is rewritten (atomically) only when the set of
entries changes, so a run where nothing changed writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .passwords import SCHEME, derive_salt, dovecot_hash
from .tenant_schema import Password

__all__ = ["CACHE_ENV", "PasswordCache", "default_cache_dir", "hash_passwords"]

#: Environment variable: a cache directory, or ``off`` to use no cache.
CACHE_ENV = "SMTPGW_PASSWORD_CACHE"
_OFF = ("", "0", "off", "no", "false")
_FORMAT = "smtpgw-password-cache-1"
_KEY_FILE = "key"
_CACHE_FILE = "password-hashes.json"

Hasher = Callable[[str, str, str], str]


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """``$SMTPGW_PASSWORD_CACHE``, else ``$XDG_CACHE_HOME/smtpgw``, else ``~/.cache/smtpgw``.

    ``None`` when the variable says ``off`` (or ``0``, ``no``, ``false``, empty).
    """
    env = os.environ if environ is None else environ
    if CACHE_ENV in env:
        value = env[CACHE_ENV]
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "smtpgw"


class PasswordCache:
    """The cache in ``directory`` (created 0700). Any problem with it turns it off, quietly:
    a cache must never fail a run, only make it slower.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._key: bytes | None = None
        self._loaded: dict[str, str] = {}
        self._used: dict[str, str] = {}
        self._usable = self._open()
        self.writes = 0  # how many times the cache file was written (for tests and benchmarks)

    @property
    def path(self) -> Path:
        return self.directory / _CACHE_FILE

    def _open(self) -> bool:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = self.directory.stat()
            if info.st_uid != os.getuid():
                return False  # someone else's directory: do not trust it or write to it
            if info.st_mode & 0o077:
                self.directory.chmod(0o700)
            self._key = self._read_key()
        except OSError:
            return False
        self._loaded = self._read_entries()
        return True

    def _read_key(self) -> bytes:
        file = self.directory / _KEY_FILE
        with contextlib.suppress(OSError, ValueError):
            key = bytes.fromhex(file.read_text(encoding="ascii").strip())
            if len(key) == 32:
                return key
        key = secrets.token_bytes(32)
        self._write_private(file, key.hex() + "\n")
        return key

    def _read_entries(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # missing or corrupt: start again
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)}

    def fingerprint(self, login: str, password: str, salt_key: str) -> str | None:
        if not self._usable or self._key is None:
            return None
        message = json.dumps([_FORMAT, SCHEME, login, password, salt_key], ensure_ascii=False)
        return hmac.new(self._key, message.encode("utf-8"), hashlib.sha256).hexdigest()

    def get(self, fingerprint: str | None) -> str | None:
        return None if fingerprint is None else self._loaded.get(fingerprint)

    def keep(self, fingerprint: str | None, password_hash: str) -> None:
        if fingerprint is not None:
            self._used[fingerprint] = password_hash

    def save(self) -> None:
        """Write the entries in use, only if they differ from what was read."""
        if not self._usable or self._used == self._loaded:
            return
        body = json.dumps({"format": _FORMAT, "entries": self._used}, indent=0, sort_keys=True)
        try:
            self._write_private(self.path, body + "\n")
        except OSError:
            self._usable = False
            return
        self.writes += 1
        self._loaded = dict(self._used)

    def _write_private(self, file: Path, text: str) -> None:
        """Write ``text`` to ``file`` atomically with mode 0600."""
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            os.fchmod(handle, 0o600)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(temporary, file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


def hash_passwords(
    tenants: list[dict[str, Any]],
    salt_key: str,
    cache: PasswordCache | None = None,
    hasher: Hasher = dovecot_hash,
) -> list[dict[str, Any]]:
    """Validated tenants with every user as ``{login, password_hash}``, passwords hashed.

    A user with a :class:`~smtpgw.tenant_schema.Password` gets ``hasher(login, password,
    salt_key)``, or the cached hash for the same inputs; one without keeps its ``password_hash``
    (given in the file, or ``None`` when left unresolved). The input is not changed.
    """
    done: list[dict[str, Any]] = []
    for tenant in tenants:
        users = []
        for user in tenant["users"]:
            password = user.get("password")
            password_hash = user.get("password_hash")
            if isinstance(password, Password):
                login, plain = user["login"], password.reveal()
                fingerprint = (
                    cache.fingerprint(login, plain, salt_key) if cache is not None else None
                )
                cached = cache.get(fingerprint) if cache is not None else None
                if cached is not None and _looks_right(cached, login, salt_key):
                    password_hash = cached
                else:
                    password_hash = hasher(login, plain, salt_key)
                if cache is not None:
                    cache.keep(fingerprint, password_hash)
            users.append({"login": user["login"], "password_hash": password_hash})
        done.append({**tenant, "users": users})
    if cache is not None:
        cache.save()
    return done


def _looks_right(cached: str, login: str, salt_key: str) -> bool:
    """A cached value has the shape :func:`dovecot_hash` gives for this login and key."""
    prefix = f"{SCHEME}$6${derive_salt(login, salt_key)}$"
    return cached.startswith(prefix) and len(cached) == len(prefix) + 86
