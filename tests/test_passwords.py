from __future__ import annotations

import re
import warnings

import pytest

from smtpgw.passwords import CRYPT_ALPHABET, derive_salt, dovecot_hash, sha512_crypt

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import crypt  # removed in Python 3.13
    except ImportError:
        crypt = None

needs_crypt = pytest.mark.skipif(crypt is None, reason="the crypt module is not available")

PASSWORDS = [
    "",
    "x",
    "correct horse battery staple",
    "a" * 63,
    "a" * 64,
    "a" * 65,
    "b" * 200,
    "long password with spaces, punctuation!? and more than sixty-four bytes in it....",
    "pässwörd-ünïcödé-€-✓-密码",
    "é" * 40,  # 40 characters, 80 bytes
]
SALTS = ["a", "saltstring", "16charactersalt.", "saltstringlongerthan16", "./AZaz09"]

# Test vectors from Ulrich Drepper's SHA-crypt specification; they need no crypt module.
SPEC_VECTORS = [
    (
        "Hello world!",
        "saltstring",
        None,
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEd"
        "FCoEOfaS35inz1",
    ),
    (
        "Hello world!",
        "saltstringsaltstring",
        10000,
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0D"
        "p8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "This is just a test",
        "toolongsaltstring",
        5000,
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUh"
        "x1yxdYcz/e1JSbq3y6JMxxl8audkUEm0",
    ),
]


@pytest.mark.parametrize(("password", "salt", "rounds", "expected"), SPEC_VECTORS)
def test_specification_vectors(password: str, salt: str, rounds: int | None, expected: str):
    assert sha512_crypt(password, salt, rounds) == expected


@needs_crypt
@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("salt", SALTS)
def test_matches_crypt_default_rounds(password: str, salt: str):
    assert sha512_crypt(password, salt) == crypt.crypt(password, f"$6${salt}")


@needs_crypt
@pytest.mark.parametrize("password", ["", "secret", "c" * 100, "ünïcödé ✓"])
@pytest.mark.parametrize("rounds", [1000, 5000, 7777])
def test_matches_crypt_explicit_rounds(password: str, rounds: int):
    salt = "roundsalt"
    assert sha512_crypt(password, salt, rounds) == crypt.crypt(
        password, f"$6$rounds={rounds}${salt}"
    )


@needs_crypt
def test_dovecot_hash_verifies_with_crypt():
    hashed = dovecot_hash("scanner@acme.test", "correct horse battery", "smtpgw")
    crypt_string = hashed.removeprefix("{SHA512-CRYPT}")
    assert crypt.crypt("correct horse battery", crypt_string) == crypt_string


def test_bytes_password_equals_utf8_str():
    assert sha512_crypt("pässwörd".encode(), "salt") == sha512_crypt("pässwörd", "salt")


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="'\\$'"):
        sha512_crypt("x", "bad$salt")
    with pytest.raises(ValueError, match="rounds"):
        sha512_crypt("x", "salt", 999)
    with pytest.raises(ValueError, match="rounds"):
        sha512_crypt("x", "salt", 1_000_000_000)


def test_derive_salt_shape_and_determinism():
    salt = derive_salt("scanner@acme.test", "smtpgw")
    assert len(salt) == 16
    assert set(salt) <= set(CRYPT_ALPHABET)
    assert derive_salt("scanner@acme.test", "smtpgw") == salt
    assert derive_salt("printer@acme.test", "smtpgw") != salt
    assert derive_salt("scanner@acme.test", "other-key") != salt


def test_dovecot_hash_format():
    hashed = dovecot_hash("scanner@acme.test", "correct horse battery", "smtpgw")
    salt = derive_salt("scanner@acme.test", "smtpgw")
    assert re.fullmatch(r"\{SHA512-CRYPT\}\$6\$[./0-9A-Za-z]{16}\$[./0-9A-Za-z]{86}", hashed)
    assert hashed.startswith(f"{{SHA512-CRYPT}}$6${salt}$")
    assert "rounds=" not in hashed


def test_dovecot_hash_is_idempotent_and_salt_ignores_password():
    first = dovecot_hash("scanner@acme.test", "correct horse battery", "smtpgw")
    assert dovecot_hash("scanner@acme.test", "correct horse battery", "smtpgw") == first
    other = dovecot_hash("scanner@acme.test", "a different password", "smtpgw")
    assert other != first
    # Same login, same salt: the salt is derived from the login, never from the password.
    assert other.split("$")[2] == first.split("$")[2]


def test_dovecot_hash_is_the_same_with_or_without_crypt(monkeypatch):
    from smtpgw import passwords

    fast = passwords.dovecot_hash("a@acme.test", "a password of some length", "key")
    monkeypatch.setattr(passwords, "_crypt", None)
    assert passwords.dovecot_hash("a@acme.test", "a password of some length", "key") == fast
