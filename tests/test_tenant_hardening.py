"""Issue #6: no bad value gets through the tenant checks, no valid one is refused."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtpgw.password_cache import hash_passwords
from smtpgw.passwords import sha512_crypt
from smtpgw.tenant_files import (
    MAX_FILE_BYTES,
    TenantLoader,
    check_dir,
    inventory_smarthosts,
    load_tenant_file,
)
from smtpgw.tenant_schema import validate_tenants

FILE = "t/acme.yml"
PASSWORD = "correct horse battery"
LOGIN = "scanner@acme.test"

SHA512 = "{SHA512-CRYPT}" + sha512_crypt("printer secret", "PFpct6u4RthnqNl4")
SHA512_ROUNDS = "{SHA512-CRYPT}" + sha512_crypt("printer secret", "PFpct6u4RthnqNl4", 10000)
SHA512_SHORT_SALT = "{SHA512-CRYPT}" + sha512_crypt("printer secret", "8charsal")
SHA256 = "{SHA256-CRYPT}$5$saltsaltsalt$kmQYQpRO9IPTACvj3IbQ2UYeRkCvgLMxlXht80sI/B8"
BCRYPT = "{BLF-CRYPT}$2y$05$abcdefghijklmnopqrstuuhKF09ZYWwH2zP/0fwE1X8e/Q1YNx/hO"
BCRYPT_B = "{BLF-CRYPT}$2b$12$GhvMmNVjRW29ulnudl.LbuAnUtN/LRfe1JsBm1Xu6LE3059z5Tr8m"


def tenant(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "domains": ["acme.test"],
        "users": [{"login": LOGIN, "password": PASSWORD}],
    }
    for key, value in fields.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def user(**fields: Any) -> dict[str, Any]:
    return tenant(users=[{"login": LOGIN, **fields}])


def errors_for(data: object, file: str = FILE, **kwargs: Any) -> list[str]:
    result = validate_tenants({file: data}, **kwargs)
    if result.errors:
        assert result.tenants == [] and result.removed == []
    return result.errors


def assert_error(errors: list[str], file: str, field: str, *fragments: str) -> str:
    prefix = f"{file}: {field}" if field else f"{file}: "
    for error in errors:
        if error.startswith(prefix) and all(fragment in error for fragment in fragments):
            assert "; " in error, f"no 'what to do' part in {error!r}"
            return error
    raise AssertionError(f"no error for {prefix!r} with {fragments!r} in:\n" + "\n".join(errors))


def only_tenant(data: object, file: str = FILE, **kwargs: Any) -> dict[str, Any]:
    result = validate_tenants({file: data}, **kwargs)
    assert result.errors == []
    assert len(result.tenants) == 1
    return hash_passwords(result.tenants, "smtpgw")[0]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# Control characters, anywhere, including a trailing newline

CONTROL = ["\n", "\r", "\0", "\t", "\x1b", "\x7f", "\x85", "\x9b"]


@pytest.mark.parametrize("char", CONTROL)
@pytest.mark.parametrize("where", ["end", "middle"])
def test_control_character_in_domain(char: str, where: str):
    domain = "acme.test" + char if where == "end" else "ac" + char + "me.test"
    errors = errors_for(tenant(domains=[domain], users=None))
    assert_error(errors, FILE, "domains[0]", f"control character U+{ord(char):04X}", "remove it")


@pytest.mark.parametrize("char", CONTROL)
def test_control_character_in_login(char: str):
    errors = errors_for(tenant(users=[{"login": LOGIN + char, "password": PASSWORD}]))
    assert_error(errors, FILE, "users[0].login", "control character", "remove it")


@pytest.mark.parametrize("char", CONTROL)
@pytest.mark.parametrize("templated", [True, False])
def test_control_character_in_password_is_refused_without_showing_it(char, templated):
    secret = PASSWORD + char if char != "\t" else "correct\thorse battery"
    errors = errors_for(user(password=secret), templated=templated)
    error = assert_error(errors, FILE, "users[0].password", "control character", "remove it")
    assert "horse" not in error


@pytest.mark.parametrize("char", ["\n", "\r", "\0", "\x7f"])
def test_control_character_in_name(char: str):
    errors = errors_for(tenant(name="acme" + char))
    assert_error(errors, FILE, "name", "control character", "remove it")


@pytest.mark.parametrize("char", ["\n", "\t", "\x00"])
def test_control_character_in_network_via_and_hash(char: str):
    errors = errors_for(tenant(networks=["192.0.2.0/28" + char]))
    assert_error(errors, FILE, "networks[0]", "control character")
    errors = errors_for(tenant(relay={"via": "smart1" + char}), smarthosts=["smart1"])
    assert_error(errors, FILE, "relay.via", "control character")
    errors = errors_for(user(password_hash=SHA512 + char))
    assert_error(errors, FILE, "users[0].password_hash", "control character")


def test_control_characters_in_a_file_are_refused(tmp_path: Path):
    write(
        tmp_path,
        "acme.yml",
        'domains: ["acme.test\\n"]\nusers: [{login: "a@acme.test\\r", password: "x\\u0000y"}]\n',
    )
    errors = check_dir(tmp_path).errors
    acme = str(tmp_path / "acme.yml")
    assert_error(errors, acme, "domains[0]", "U+000A")
    assert_error(errors, acme, "users[0].login", "U+000D")


def test_surrounding_spaces_are_still_fine():
    result = only_tenant(
        tenant(domains=[" acme.test "], users=[{"login": " a@acme.test ", "password": PASSWORD}])
    )
    assert result["domains"] == ["acme.test"]
    assert result["users"][0]["login"] == "a@acme.test"


# --------------------------------------------------------------------------------------
# Password hashes: strong schemes only, in their real shape


@pytest.mark.parametrize(
    "value", [SHA512, SHA512_ROUNDS, SHA512_SHORT_SALT, SHA256, BCRYPT, BCRYPT_B]
)
def test_strong_hashes_are_accepted(value: str):
    assert only_tenant(user(password_hash=value))["users"][0]["password_hash"] == value


@pytest.mark.parametrize(
    "value",
    [
        "{PLAIN}correct-horse-battery",
        "{PLAIN}secret",
        "{MD5}$1$abcdefgh$0123456789abcdefghijkl",
        "{PLAIN-MD5}5f4dcc3b5aa765d61d8327deb882cf99",
        "{CRYPT}abJnggxhB/yWI",
        "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
        "{SSHA256}abcdefghijklmnop",
        "{SHA512}abcdefghijklmnop",
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$c29tZXNhbHQ$aGFzaA",
    ],
)
def test_weak_or_unsupported_schemes_are_refused(value: str):
    errors = errors_for(user(password_hash=value))
    assert_error(
        errors, FILE, "users[0].password_hash", "is not accepted", "doveadm pw -s SHA512-CRYPT"
    )


_DIGEST = SHA512.rsplit("$", 1)[1]


@pytest.mark.parametrize(
    "value",
    [
        "{SHA512-CRYPT}$6$abc$def",
        "{SHA512-CRYPT}$6$PFpct6u4RthnqNl4$" + _DIGEST[:-1],  # 85 characters
        "{SHA512-CRYPT}$6$PFpct6u4RthnqNl4$" + _DIGEST + "x",  # 87 characters
        "{SHA512-CRYPT}$6$PFpct6u4RthnqNl4$" + _DIGEST[:-1] + "z",  # impossible last char
        "{SHA512-CRYPT}$6$PFpct6u4Rth!qNl4$" + _DIGEST,  # salt alphabet
        "{SHA512-CRYPT}$6$short$" + _DIGEST,  # salt of 5
        "{SHA512-CRYPT}$6$PFpct6u4RthnqNl4PFpct$" + _DIGEST,  # salt of 21
        "{SHA512-CRYPT}$6$rounds=999$PFpct6u4RthnqNl4$" + _DIGEST,
        "{SHA512-CRYPT}$6$rounds=5000000$PFpct6u4RthnqNl4$" + _DIGEST,
        "{SHA512-CRYPT}$5$PFpct6u4RthnqNl4$" + _DIGEST,  # wrong id for the scheme
        "{SHA512-CRYPT}" + SHA256.split("}", 1)[1],
        "{SHA256-CRYPT}" + SHA512.split("}", 1)[1],
        "{BLF-CRYPT}$2y$04$abcdefghijklmnopqrstuuhKF09ZYWwH2zP/0fwE1X8e/Q1YNx/hO",  # cost
        "{BLF-CRYPT}$2y$31$abcdefghijklmnopqrstuuhKF09ZYWwH2zP/0fwE1X8e/Q1YNx/hO",
        "{BLF-CRYPT}$2y$05$abcdefghijklmnopqrstuuhKF09ZYWwH2zP/0fwE1X8e/Q1YNx/h",  # short
        "{BLF-CRYPT}$2a$05$abcdefghijklmnopqrstuuhKF09ZYWwH2zP/0fwE1X8e/Q1YNx/hO",  # $2a$
    ],
)
def test_malformed_hashes_are_refused(value: str):
    errors = errors_for(user(password_hash=value))
    assert_error(
        errors, FILE, "users[0].password_hash", "not a well-formed", "doveadm pw -s SHA512-CRYPT"
    )


def test_jinja_password_hash_is_left_unchecked_without_ansible(tmp_path: Path):
    write(
        tmp_path,
        "acme.yml",
        """\
        domains: [acme.test]
        users:
          - login: scanner@acme.test
            password_hash: "{{ vault_acme_scanner_hash }}"
        """,
    )
    result = check_dir(tmp_path)
    assert result.errors == []
    assert result.tenants[0]["users"] == [{"login": LOGIN, "password_hash": None}]


def test_templated_password_hash_is_checked_after_templating():
    # Under Ansible the plugin hands over the rendered value: it is checked like any other.
    errors = errors_for(user(password_hash="{PLAIN}rendered-from-the-vault"))
    assert_error(errors, FILE, "users[0].password_hash", "is not accepted")
    assert only_tenant(user(password_hash=SHA512))["users"][0]["password_hash"] == SHA512


# --------------------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("10.1.0.0/16", "10.1.2.0/24"),
        ("10.1.2.0/24", "10.1.0.0/16"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("2001:db8::/48", "2001:db8:0:1::/64"),
    ],
)
def test_networks_of_two_tenants_must_not_overlap(first: str, second: str):
    raw = {
        "t/acme.yml": tenant(users=None, networks=["198.51.100.0/24", first]),
        "t/beta.yml": tenant(domains=["beta.test"], users=None, networks=[second]),
    }
    errors = validate_tenants(raw).errors
    assert len(errors) == 1
    assert_error(
        errors, "t/beta.yml", "networks[0]", "overlaps", "tenant 'acme' (t/acme.yml: networks[1])"
    )


def test_overlap_within_one_tenant_and_neighbours_are_fine():
    raw = {
        "t/acme.yml": tenant(users=None, networks=["10.1.0.0/16", "10.1.2.0/24"]),
        "t/beta.yml": tenant(domains=["beta.test"], users=None, networks=["10.2.0.0/16"]),
        "t/gamma.yml": tenant(domains=["g.test"], users=None, networks=["10.1.0.0/32"]),
    }
    errors = validate_tenants(raw).errors
    assert len(errors) == 1
    assert_error(errors, "t/gamma.yml", "networks[0]", "overlaps 10.1.0.0/16")


@pytest.mark.parametrize(
    ("network", "kind", "fix"),
    [
        ("::ffff:10.0.0.0/104", "IPv4-mapped", "10.0.0.0/8"),
        ("::ffff:192.0.2.1", "IPv4-mapped", "192.0.2.1/32"),
        ("::ffff:0:0/96", "IPv4-mapped", "0.0.0.0/0"),
        ("::c000:200/120", "IPv4-compatible", "192.0.2.0/24"),
        ("64:ff9b::c000:200/120", "NAT64", "192.0.2.0/24"),
        ("64:ff9b:1::/48", "local-use NAT64", "IPv4 network of those clients"),
        ("2002:c000:200::/40", "6to4", "IPv4 network of those clients"),
        ("2002:c000:201::/48", "6to4", "IPv4 network"),
        ("2001:0:c000:200::/64", "Teredo", "IPv4 network"),
        ("2001::/32", "Teredo", "IPv4 network"),
    ],
)
def test_ipv6_ranges_that_carry_ipv4_are_refused(network: str, kind: str, fix: str):
    errors = errors_for(tenant(networks=[network]))
    assert_error(errors, FILE, "networks[0]", kind, "carries IPv4", fix)


def test_ordinary_ipv6_networks_are_fine():
    networks = ["2001:db8::/33", "2a01:4f8::/48", "fd00::/64", "2001:1::/48"]
    assert only_tenant(tenant(networks=networks))["networks"] == networks


@pytest.mark.parametrize("network", ["fe80::1%eth0", "fe80::%2/64", "fe80::1%25eth0"])
def test_ipv6_zone_index_is_refused(network: str):
    errors = errors_for(tenant(networks=[network]))
    assert_error(errors, FILE, "networks[0]", "zone index", "without it, e.g. fe80::")


@pytest.mark.parametrize(
    "networks",
    [
        ["10.0.0.0/8", "11.0.0.0/24"],
        ["10.0.0.0/9", "11.0.0.0/9", "12.0.0.0/9"],
        [f"{n}.0.0.0/10" for n in range(10, 15)],
        ["2001:db8::/32", "2001:db9::/48"],
    ],
)
def test_one_tenants_networks_together_stay_within_one_slash_8(networks: list[str]):
    errors = errors_for(tenant(networks=networks))
    assert_error(errors, FILE, "networks", "more than one", "only the client networks")


def test_networks_budget_counts_overlaps_once():
    data = tenant(networks=["10.0.0.0/9", "10.128.0.0/9", "10.1.0.0/16"])
    assert len(only_tenant(data)["networks"]) == 3


def test_all_tenants_networks_together_stay_within_one_slash_8():
    raw = {
        "t/a.yml": tenant(domains=["a.test"], users=None, networks=["10.0.0.0/9"]),
        "t/b.yml": tenant(domains=["b.test"], users=None, networks=["11.0.0.0/9"]),
        "t/c.yml": tenant(domains=["c.test"], users=None, networks=["12.0.0.0/24"]),
    }
    errors = validate_tenants(raw).errors
    assert len(errors) == 1
    assert_error(errors, "t/c.yml", "networks", "all tenants' networks together", "/8")
    del raw["t/c.yml"]
    assert validate_tenants(raw).errors == []


# --------------------------------------------------------------------------------------
# Jinja: parsed without Ansible, and only where it may be


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("password", "{{ vault_x"),
        ("password", "{% if %}"),
        ("password", "{{ vault_x }"),
        ("password", "{# never closed"),
        ("password_hash", "{{ vault_hash | }}"),
    ],
)
def test_broken_jinja_is_refused_without_ansible(tmp_path: Path, field: str, value: str):
    write(
        tmp_path,
        "acme.yml",
        f"domains: [acme.test]\nusers:\n  - login: {LOGIN}\n    {field}: {yaml.safe_dump(value)}",
    )
    errors = check_dir(tmp_path).errors
    assert_error(
        errors, str(tmp_path / "acme.yml"), f"users[0].{field}", "not a valid Jinja expression"
    )


def test_broken_jinja_network_is_refused_without_ansible():
    errors = errors_for(tenant(networks=["{{ ansible_facts['x'] /32"]), templated=False)
    assert_error(errors, FILE, "networks[0]", "not a valid Jinja expression", "fix it")


def test_valid_jinja_is_accepted_without_ansible():
    data = user(password="{{ vault_x | default('y') }}")
    data["networks"] = ["{% if x %}10.0.0.1{% endif %}"]
    assert errors_for(data, templated=False) == []


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"name": "{{ tenant_name }}"}, "name"),
        ({"state": "{{ acme_state }}"}, "state"),
        ({"domains": ["{{ acme_domain }}"]}, "domains[0]"),
        ({"limits": {"messages_per_day": "{{ acme_limit }}"}}, "limits.messages_per_day"),
        ({"relay": {"via": "{{ acme_route }}"}}, "relay.via"),
        ({"users": [{"login": "{{ who }}@acme.test", "password": PASSWORD}]}, "users[0].login"),
    ],
)
@pytest.mark.parametrize("templated", [True, False])
def test_jinja_in_a_literal_field_says_so(fields: dict, path: str, templated: bool):
    errors = errors_for(tenant(**fields), templated=templated)
    assert_error(errors, FILE, path, "is a Jinja expression", "must be written literally")


# --------------------------------------------------------------------------------------
# Limits


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("messages_per_day", 10_000_001),
        ("messages_per_day", 10**30),
        ("recipients_per_message", 1001),
        ("recipients_per_message", 2**63),
    ],
)
def test_limits_have_an_upper_bound(key: str, value: int):
    errors = errors_for(tenant(limits={key: value}))
    assert_error(errors, FILE, f"limits.{key}", "more than the most allowed", "at most")


def test_limits_at_their_bound_are_fine():
    limits = {
        "messages_per_day": 10_000_000,
        "messages_per_hour": 1_000_000,
        "recipients_per_message": 1000,
    }
    assert only_tenant(tenant(limits=limits))["limits"] == {**limits, "logins": {}}


# --------------------------------------------------------------------------------------
# YAML files


def test_libyaml_is_used_where_pyyaml_has_it():
    if not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML without libyaml")
    assert issubclass(TenantLoader, yaml.CSafeLoader)


def test_big_file_is_refused_before_parsing(tmp_path: Path):
    file = write(tmp_path, "acme.yml", "domains: [acme.test]\n")
    with file.open("a") as out:
        out.write("# " + "x" * MAX_FILE_BYTES + "\n")
    started = time.monotonic()
    errors = check_dir(tmp_path).errors
    assert time.monotonic() - started < 2
    assert_error(errors, str(file), "", "more than the 1,048,576 (1 MiB)", "one tenant per file")


@pytest.mark.parametrize("depth", [60, 900, 5000, 100_000])
def test_deep_nesting_is_refused_with_the_file_named(tmp_path: Path, depth: int):
    file = write(
        tmp_path, "acme.yml", "domains: [acme.test]\nnetworks: " + "[" * depth + "]" * depth
    )
    assert_error(check_dir(tmp_path).errors, str(file), "", "nests deeper than 50 levels")


def test_billion_laughs_is_refused_quickly(tmp_path: Path):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    file = write(tmp_path, "acme.yml", "\n".join(lines) + "\n")
    started = time.monotonic()
    errors = check_dir(tmp_path).errors
    assert time.monotonic() - started < 2
    assert_error(errors, str(file), "", "expands to more than 200,000 values", "anchors")


def test_self_referencing_alias_is_refused(tmp_path: Path):
    file = write(tmp_path, "acme.yml", "domains: [acme.test]\nnetworks: &n [*n]\n")
    assert_error(check_dir(tmp_path).errors, str(file), "", "refers to itself")


def test_small_aliases_are_fine(tmp_path: Path):
    write(tmp_path, "acme.yml", "domains: &d [acme.test]\nnetworks: [10.0.0.1]\n")
    write(tmp_path, "beta.yml", "domains: [beta.test]\nnetworks: &n [10.0.0.2, 10.0.0.3]\n")
    assert check_dir(tmp_path).errors == []


def test_merge_keys_are_accepted(tmp_path: Path):
    write(
        tmp_path,
        "acme.yml",
        """\
        domains: [acme.test]
        users:
          - &scanner {login: scanner@acme.test, password: "{{ vault_acme_scanner }}"}
          - <<: *scanner
            login: printer@acme.test
        limits: &limits {messages_per_day: 100}
        """,
    )
    result = check_dir(tmp_path)
    assert result.errors == []
    assert [u["login"] for u in result.tenants[0]["users"]] == [LOGIN, "printer@acme.test"]


def test_duplicate_keys_are_refused_beside_merge_keys(tmp_path: Path):
    file = write(
        tmp_path,
        "acme.yml",
        """\
        domains: [acme.test]
        users:
          - &scanner {login: scanner@acme.test, password: "{{ vault_acme_scanner }}"}
          - <<: *scanner
            login: printer@acme.test
            login: copier@acme.test
        """,
    )
    assert_error(check_dir(tmp_path).errors, str(file), "", "duplicate key 'login'")


def test_symlink_out_of_the_tenants_directory_is_refused(tmp_path: Path):
    tenants = tmp_path / "tenants"
    write(tmp_path, "elsewhere.yml", "domains: [acme.test]\n")
    write(tenants, "beta.yml", "domains: [beta.test]\n")
    os.symlink(tmp_path / "elsewhere.yml", tenants / "acme.yml")
    os.symlink("../elsewhere.yml", tenants / "gamma.yml")
    errors = check_dir(tenants).errors
    assert len(errors) == 2
    assert_error(errors, str(tenants / "acme.yml"), "", "symbolic link", "copy the file")
    assert_error(errors, str(tenants / "gamma.yml"), "", "outside", "copy the file")


def test_symlink_inside_the_tenants_directory_is_fine(tmp_path: Path):
    write(tmp_path, "shared/acme.yml", "domains: [acme.test]\n")
    os.symlink("shared/acme.yml", tmp_path / "acme.yml")
    result = check_dir(tmp_path)
    assert result.errors == [] and [t["name"] for t in result.tenants] == ["acme"]


def test_load_tenant_file_applies_the_limits_alone(tmp_path: Path):
    file = write(tmp_path, "acme.yml", "x: " + "[" * 80 + "]" * 80)
    assert "nests deeper" in load_tenant_file(file).problem  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------
# An inventory's own smart hosts


def test_inventory_smarthosts_read_from_group_and_host_vars(tmp_path: Path):
    write(tmp_path, "group_vars/relays/main.yml", "relay_smarthosts:\n  - {name: m365}\n")
    write(tmp_path, "group_vars/edge.yml", "relay_smarthosts: [{name: sendgrid, host: x}]\n")
    write(tmp_path, "host_vars/relay1/vars.yaml", "relay_smarthosts: []\nother: 1\n")
    write(tmp_path, "group_vars/all/vault.yml", "$ANSIBLE_VAULT;1.1;AES256\n6162\n")
    found = inventory_smarthosts(tmp_path)
    assert found.names == ["m365", "sendgrid"]
    assert any("vault.yml: encrypted" in note for note in found.notes)


def test_inventory_smarthosts_written_as_jinja_cannot_be_known(tmp_path: Path):
    write(tmp_path, "group_vars/relays.yml", 'relay_smarthosts: "{{ all_smarthosts }}"\n')
    found = inventory_smarthosts(tmp_path)
    assert found.names is None
    assert "relay.via is checked when the playbook runs" in found.notes[0]


def test_inventory_without_smarthosts_has_none(tmp_path: Path):
    write(tmp_path, "group_vars/all.yml", "relay_route: direct\n")
    assert inventory_smarthosts(tmp_path).names == []
