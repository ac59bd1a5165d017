"""SHA512-CRYPT (``$6$``) password hashes for Dovecot, in pure Python.

Python 3.13 removed the ``crypt`` module, so this implements Ulrich Drepper's
"Unix crypt using SHA-256 and SHA-512" specification with :mod:`hashlib` only.

The salt is derived from the login with HMAC-SHA256 keyed by ``salt_key`` so that
the same login and password always give the same hash: Ansible reruns then leave
the Dovecot password file untouched. The salt never depends on the password.
"""

from __future__ import annotations

import hashlib
import hmac
import warnings

try:  # glibc's crypt(3) where Python still has it (removed in 3.13): ~10x faster
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt as _crypt
except ImportError:
    _crypt = None

__all__ = [
    "CRYPT_ALPHABET",
    "DEFAULT_ROUNDS",
    "SCHEME",
    "derive_salt",
    "dovecot_hash",
    "sha512_crypt",
]

CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_ROUNDS = 5000
MIN_ROUNDS = 1000
MAX_ROUNDS = 999_999_999
SALT_LENGTH = 16
SCHEME = "{SHA512-CRYPT}"

# Byte order in which the 64-byte digest is written out, three bytes (four characters) at a time.
_PERMUTATION = (
    (0, 21, 42),
    (22, 43, 1),
    (44, 2, 23),
    (3, 24, 45),
    (25, 46, 4),
    (47, 5, 26),
    (6, 27, 48),
    (28, 49, 7),
    (50, 8, 29),
    (9, 30, 51),
    (31, 52, 10),
    (53, 11, 32),
    (12, 33, 54),
    (34, 55, 13),
    (56, 14, 35),
    (15, 36, 57),
    (37, 58, 16),
    (59, 17, 38),
    (18, 39, 60),
    (40, 61, 19),
    (62, 20, 41),
)


def derive_salt(login: str, salt_key: str) -> str:
    """Return 16 crypt-alphabet characters derived from HMAC-SHA256(salt_key, login).

    256 is a multiple of 64, so taking each byte modulo 64 is unbiased.
    """
    digest = hmac.new(salt_key.encode("utf-8"), login.encode("utf-8"), hashlib.sha256).digest()
    return "".join(CRYPT_ALPHABET[byte % 64] for byte in digest[:SALT_LENGTH])


def dovecot_hash(login: str, password: str, salt_key: str) -> str:
    """Return ``{SHA512-CRYPT}$6$<salt>$<hash>`` with a salt derived from the login."""
    salt = derive_salt(login, salt_key)
    if _crypt is not None and "\0" not in password:
        fast = _crypt.crypt(password, f"$6${salt}")
        if fast and fast.startswith(f"$6${salt}$"):
            return SCHEME + fast
    return SCHEME + sha512_crypt(password, salt)


def sha512_crypt(password: str | bytes, salt: str, rounds: int | None = None) -> str:
    """Return the ``$6$`` crypt string, identical to glibc ``crypt(password, "$6$" + salt)``.

    ``rounds=None`` uses the default of 5000 and leaves ``rounds=`` out of the result,
    as crypt does; an explicit ``rounds`` (1000 to 999999999) is written out.
    Only the first 16 characters of ``salt`` are used.
    """
    if "$" in salt:
        raise ValueError("salt must not contain '$'")
    if rounds is not None and not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be between {MIN_ROUNDS} and {MAX_ROUNDS}, not {rounds}")
    key = password.encode("utf-8") if isinstance(password, str) else bytes(password)
    salt_bytes = salt.encode("utf-8")[:SALT_LENGTH]
    count = DEFAULT_ROUNDS if rounds is None else rounds

    digest = _sha512_crypt_digest(key, salt_bytes, count)

    prefix = "$6$" if rounds is None else f"$6$rounds={count}$"
    return f"{prefix}{salt_bytes.decode('utf-8', 'replace')}${_encode(digest)}"


def _sha512_crypt_digest(key: bytes, salt: bytes, rounds: int) -> bytes:
    """Steps 1-21 of the specification: the final 64-byte digest."""
    key_len = len(key)

    alternate = hashlib.sha512(key + salt + key).digest()

    ctx = hashlib.sha512(key + salt)
    ctx.update(_repeat(alternate, key_len))
    bits = key_len
    while bits:
        ctx.update(alternate if bits & 1 else key)
        bits >>= 1
    result = ctx.digest()

    p_bytes = _repeat(hashlib.sha512(key * key_len).digest(), key_len)
    s_bytes = _repeat(hashlib.sha512(salt * (16 + result[0])).digest(), len(salt))

    for i in range(rounds):
        ctx = hashlib.sha512(p_bytes if i & 1 else result)
        if i % 3:
            ctx.update(s_bytes)
        if i % 7:
            ctx.update(p_bytes)
        ctx.update(result if i & 1 else p_bytes)
        result = ctx.digest()
    return result


def _repeat(block: bytes, length: int) -> bytes:
    """``block`` repeated and cut to ``length`` bytes."""
    return (block * (length // len(block) + 1))[:length]


def _encode(digest: bytes) -> str:
    """The crypt flavour of base64: little-endian 6-bit groups, custom alphabet."""
    out: list[str] = []
    for first, second, third in _PERMUTATION:
        out.append(_b64_from_24bit(digest[first], digest[second], digest[third], 4))
    out.append(_b64_from_24bit(0, 0, digest[63], 2))
    return "".join(out)


def _b64_from_24bit(b2: int, b1: int, b0: int, count: int) -> str:
    word = (b2 << 16) | (b1 << 8) | b0
    chars = []
    for _ in range(count):
        chars.append(CRYPT_ALPHABET[word & 0x3F])
        word >>= 6
    return "".join(chars)
