"""Issue #13: hash only what changed, with a controller-side cache."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from smtpgw.password_cache import (
    CACHE_ENV,
    PasswordCache,
    default_cache_dir,
    hash_passwords,
)
from smtpgw.passwords import dovecot_hash
from smtpgw.tenant_schema import Password, validate_tenants

SALT_KEY = "smtpgw"


class CountingHasher:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, login: str, password: str, salt_key: str) -> str:
        self.calls.append(login)
        return dovecot_hash(login, password, salt_key)


def validated(passwords: dict[str, str]) -> list[dict[str, Any]]:
    """One tenant per login (``name@name.test``), validated and not yet hashed."""
    raw = {
        f"t/{name}.yml": {
            "domains": [f"{name}.test"],
            "users": [{"login": f"{name}@{name}.test", "password": password}],
        }
        for name, password in passwords.items()
    }
    result = validate_tenants(raw)
    assert result.errors == []
    return result.tenants


PASSWORDS = {f"t{i}": f"password number {i}" for i in range(5)}


def run(directory: Path, passwords: dict[str, str] = PASSWORDS) -> tuple[list, CountingHasher]:
    """One run as the action plugin does it: a fresh cache object on the same directory."""
    hasher = CountingHasher()
    cache = PasswordCache(directory)
    tenants = hash_passwords(validated(passwords), SALT_KEY, cache=cache, hasher=hasher)
    return tenants, hasher


def hashes(tenants: list[dict[str, Any]]) -> dict[str, str]:
    return {u["login"]: u["password_hash"] for t in tenants for u in t["users"]}


def test_validation_keeps_the_password_hidden_and_hashing_drops_it():
    tenants = validated({"acme": "correct horse battery"})
    user = tenants[0]["users"][0]
    assert user["password"] == Password("correct horse battery")
    assert user["password_hash"] is None
    assert "correct horse" not in repr(tenants) and "correct horse" not in str(user["password"])
    with pytest.raises(TypeError):
        json.dumps(tenants)
    done = hash_passwords(tenants, SALT_KEY)
    assert done[0]["users"] == [
        {
            "login": "acme@acme.test",
            "password_hash": dovecot_hash("acme@acme.test", "correct horse battery", SALT_KEY),
        }
    ]
    assert "password" in tenants[0]["users"][0]  # the input is left alone


def test_second_run_hashes_nothing_and_writes_nothing(tmp_path: Path):
    first, hasher = run(tmp_path)
    assert len(hasher.calls) == 5
    cache_file = tmp_path / "password-hashes.json"
    before = cache_file.stat()

    second, hasher = run(tmp_path)
    assert hasher.calls == []
    assert hashes(second) == hashes(first)
    after = cache_file.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)


def test_hashes_equal_the_uncached_ones(tmp_path: Path):
    run(tmp_path)
    cached, _ = run(tmp_path)
    assert hashes(cached) == hashes(hash_passwords(validated(PASSWORDS), SALT_KEY))


def test_changed_password_rehashes_only_that_user(tmp_path: Path):
    run(tmp_path)
    changed = {**PASSWORDS, "t3": "a brand new password"}
    tenants, hasher = run(tmp_path, changed)
    assert hasher.calls == ["t3@t3.test"]
    expected = dovecot_hash("t3@t3.test", "a brand new password", SALT_KEY)
    assert hashes(tenants)["t3@t3.test"] == expected


def test_changed_salt_key_rehashes_everyone(tmp_path: Path):
    run(tmp_path)
    hasher = CountingHasher()
    hash_passwords(validated(PASSWORDS), "other key", cache=PasswordCache(tmp_path), hasher=hasher)
    assert len(hasher.calls) == 5


def test_only_entries_in_use_are_kept(tmp_path: Path):
    run(tmp_path)
    fewer = {name: PASSWORDS[name] for name in ("t0", "t1")}
    _, hasher = run(tmp_path, fewer)
    assert hasher.calls == []
    entries = json.loads((tmp_path / "password-hashes.json").read_text())["entries"]
    assert len(entries) == 2
    _, hasher = run(tmp_path)  # the removed ones come back: hashed again
    assert sorted(hasher.calls) == ["t2@t2.test", "t3@t3.test", "t4@t4.test"]


def test_cache_files_are_private(tmp_path: Path):
    directory = tmp_path / "cache" / "smtpgw"
    run(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("password-hashes.json", "key"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["key", "password-hashes.json"]


def test_an_open_cache_directory_is_tightened(tmp_path: Path):
    tmp_path.chmod(0o755)
    run(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_cache_holds_no_password_and_no_login(tmp_path: Path):
    run(tmp_path)
    text = (tmp_path / "password-hashes.json").read_text()
    assert "password number" not in text and "t1@t1.test" not in text


@pytest.mark.parametrize(
    "content",
    [
        b"not json at all",
        b"[1, 2]",
        b'{"format": "smtpgw-password-cache-1", "entries": 5}',
        b"\xff",
    ],
)
def test_corrupt_cache_file_is_ignored_and_rebuilt(tmp_path: Path, content: bytes):
    first, _ = run(tmp_path)
    (tmp_path / "password-hashes.json").write_bytes(content)
    second, hasher = run(tmp_path)
    assert len(hasher.calls) == 5
    assert hashes(second) == hashes(first)
    _, hasher = run(tmp_path)
    assert hasher.calls == []


def test_corrupt_key_starts_a_new_cache(tmp_path: Path):
    run(tmp_path)
    (tmp_path / "key").write_text("short\n")
    _, hasher = run(tmp_path)
    assert len(hasher.calls) == 5
    _, hasher = run(tmp_path)
    assert hasher.calls == []


def test_tampered_entry_is_not_trusted(tmp_path: Path):
    first, _ = run(tmp_path)
    cache_file = tmp_path / "password-hashes.json"
    data = json.loads(cache_file.read_text())
    data["entries"] = {key: "{PLAIN}oops" for key in data["entries"]}
    cache_file.write_text(json.dumps(data))
    second, hasher = run(tmp_path)
    assert len(hasher.calls) == 5
    assert hashes(second) == hashes(first)


def test_unusable_cache_directory_does_not_fail_the_run(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    tenants, hasher = run(blocker / "cache")
    assert len(hasher.calls) == 5
    assert len(hashes(tenants)) == 5


def test_no_cache_hashes_every_time():
    hasher = CountingHasher()
    hash_passwords(validated(PASSWORDS), SALT_KEY, cache=None, hasher=hasher)
    hash_passwords(validated(PASSWORDS), SALT_KEY, cache=None, hasher=hasher)
    assert len(hasher.calls) == 10


def test_given_hashes_and_unresolved_secrets_pass_through(tmp_path: Path):
    given = "{SHA512-CRYPT}" + "$6$PFpct6u4RthnqNl4$" + "a" * 85 + "."
    raw = {
        "t/acme.yml": {
            "domains": ["acme.test"],
            "users": [
                {"login": "a@acme.test", "password_hash": given},
                {"login": "b@acme.test", "password": "{{ vault_b }}"},
            ],
        }
    }
    tenants = validate_tenants(raw, templated=False).tenants
    hasher = CountingHasher()
    done = hash_passwords(tenants, SALT_KEY, cache=PasswordCache(tmp_path), hasher=hasher)
    assert hasher.calls == []
    assert done[0]["users"] == [
        {"login": "a@acme.test", "password_hash": given},
        {"login": "b@acme.test", "password_hash": None},
    ]


def test_default_cache_dir(tmp_path: Path):
    assert default_cache_dir({CACHE_ENV: str(tmp_path)}) == tmp_path
    for off in ("off", "0", "no", "false", ""):
        assert default_cache_dir({CACHE_ENV: off}) is None
    assert default_cache_dir({"XDG_CACHE_HOME": "/x/cache"}) == Path("/x/cache/smtpgw")
    home = Path(os.path.expanduser("~"))
    assert default_cache_dir({}) == home / ".cache" / "smtpgw"
