from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtpgw.password_cache import hash_passwords
from smtpgw.passwords import dovecot_hash
from smtpgw.tenant_files import check_dir, load_tenant_dir
from smtpgw.tenant_schema import (
    Result,
    TenantError,
    Unresolved,
    VaultedValue,
    normalise_domain,
    validate_tenants,
)

REPO = Path(__file__).resolve().parents[1]
FILE = "inventories/lab/tenants/acme.yml"
PASSWORD = "correct horse battery"
# A hash in the shape doveadm pw -s SHA512-CRYPT writes (of "printer secret").
GIVEN_HASH = (
    "{SHA512-CRYPT}$6$PFpct6u4RthnqNl4$42d/YMOu3t/8LDpF"
    "HQyvBi/TX0LQJCDcSgPruP.d0u7e2kZhJr0bJ0MDwkkhJ7531Zkxgk5rgZq6Wqspbuzz.1"
)


def tenant(**fields: Any) -> dict[str, Any]:
    """A valid tenant mapping, with ``fields`` replacing (or, as None, removing) fields."""
    data: dict[str, Any] = {
        "domains": ["acme.test"],
        "users": [{"login": "scanner@acme.test", "password": PASSWORD}],
    }
    for key, value in fields.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def errors_for(data: object, file: str = FILE, **kwargs: Any) -> list[str]:
    result = validate_tenants({file: data}, **kwargs)
    if result.errors:
        assert result.tenants == [] and result.removed == []
    return result.errors


def assert_error(errors: list[str], file: str, field: str, *fragments: str) -> str:
    """One error starts with ``file: field`` and contains every fragment; return it."""
    prefix = f"{file}: {field}" if field else f"{file}: "
    for error in errors:
        if error.startswith(prefix) and all(fragment in error for fragment in fragments):
            assert "; " in error, f"no 'what to do' part in {error!r}"
            return error
    raise AssertionError(f"no error for {prefix!r} with {fragments!r} in:\n" + "\n".join(errors))


def only_tenant(
    data: object, file: str = FILE, salt_key: str = "smtpgw", **kwargs: Any
) -> dict[str, Any]:
    """Validate, then hash (the two steps the action plugin runs); return the one tenant."""
    result = validate_tenants({file: data}, **kwargs)
    assert result.errors == []
    assert len(result.tenants) == 1
    return hash_passwords(result.tenants, salt_key)[0]


# --------------------------------------------------------------------------------------
# Valid input and normalisation


def test_full_tenant_is_normalised():
    data = {
        "name": "acme",
        "state": "present",
        "domains": ["acme.test", "Mail.ACME.test.", "acme.test"],
        "users": [
            {"login": "Scanner@ACME.test", "password": PASSWORD},
            {"login": "printer@mail.acme.test", "password_hash": GIVEN_HASH},
        ],
        "networks": ["192.0.2.0/28", "2001:DB8:0:0::/48", "198.51.100.7", "192.0.2.0/28"],
        "limits": {"messages_per_day": 100, "recipients_per_message": 20},
        "relay": {"via": "smart1"},
    }
    assert only_tenant(data, smarthosts=["smart1"]) == {
        "name": "acme",
        "domains": ["acme.test", "mail.acme.test"],
        "users": [
            {
                "login": "scanner@acme.test",
                "password_hash": dovecot_hash("scanner@acme.test", PASSWORD, "smtpgw"),
            },
            {"login": "printer@mail.acme.test", "password_hash": GIVEN_HASH},
        ],
        "networks": ["192.0.2.0/28", "2001:db8::/48", "198.51.100.7/32"],
        "limits": {
            "messages_per_day": 100,
            "messages_per_hour": None,
            "recipients_per_message": 20,
            "logins": {},
        },
        "relay": {"via": "smart1"},
    }


NO_LIMITS = {
    "messages_per_day": None,
    "messages_per_hour": None,
    "recipients_per_message": 50,
    "logins": {},
}


def test_defaults():
    assert only_tenant({"domains": ["acme.test"]}) == {
        "name": "acme",
        "domains": ["acme.test"],
        "users": [],
        "networks": [],
        "limits": NO_LIMITS,
        "relay": {},
    }


def test_null_optional_fields_mean_defaults():
    data = {"domains": ["acme.test"], "users": None, "networks": None, "limits": None}
    assert only_tenant(data)["limits"] == NO_LIMITS


def test_empty_input_gives_no_tenants():
    assert validate_tenants({}) == Result()


def test_tenants_sorted_by_name_and_absent_ones_removed():
    raw = {
        "t/zeta.yml": {"domains": ["zeta.test"]},
        "t/alpha.yml": {"domains": ["alpha.test"]},
        "t/old2.yml": {"state": "absent"},
        "t/old1.yml": {"state": "absent", "domains": ["alpha.test"], "junk": True},
    }
    result = validate_tenants(raw)
    assert result.errors == []
    assert [t["name"] for t in result.tenants] == ["alpha", "zeta"]
    assert result.removed == ["old1", "old2"]


def test_hash_is_deterministic_and_depends_on_salt_key():
    first = only_tenant(tenant())["users"][0]["password_hash"]
    assert only_tenant(tenant())["users"][0]["password_hash"] == first
    other = only_tenant(tenant(), salt_key="another key")["users"][0]["password_hash"]
    assert other != first


def test_plaintext_password_never_in_result():
    data = tenant(users=[{"login": "scanner@acme.test", "password": PASSWORD}])
    assert PASSWORD not in repr(validate_tenants({FILE: data}))
    short = tenant(users=[{"login": "scanner@acme.test", "password": "hunter2"}])
    result = validate_tenants({FILE: short})
    assert result.errors
    assert "hunter2" not in repr(result)


def test_idna_domain_and_login():
    data = tenant(
        domains=["Bücher.test"], users=[{"login": "info@bücher.test", "password": PASSWORD}]
    )
    result = only_tenant(data)
    assert result["domains"] == ["xn--bcher-kva.test"]
    assert result["users"][0]["login"] == "info@xn--bcher-kva.test"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("acme.test", "acme.test"),
        ("ACME.Test.", "acme.test"),
        (" mail.acme.test ", "mail.acme.test"),
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ("a-b.c-d.test", "a-b.c-d.test"),
    ],
)
def test_normalise_domain(value: str, expected: str):
    assert normalise_domain(value) == expected


# --------------------------------------------------------------------------------------
# Whole-file problems


def test_empty_file():
    assert_error(errors_for(None), FILE, "", "empty", "write a tenant mapping")


def test_file_holding_a_list():
    assert_error(errors_for(["acme.test"]), FILE, "", "list, not a mapping", "one tenant mapping")


def test_unresolved_file_is_reported():
    problem = "YAML syntax error at line 3, column 1: bad; fix the YAML"
    errors = errors_for(Unresolved(problem))
    assert errors == [f"{FILE}: {problem}"]


def test_all_errors_from_all_files_at_once():
    raw = {
        "t/a.yml": tenant(domains="a.test"),
        "t/b.yml": tenant(domian=["b.test"], domains=["b.test"]),
        "t/c.yml": tenant(domains=["c.test"], networks=["0.0.0.0/0"]),
    }
    result = validate_tenants(raw)
    assert result.tenants == [] and result.removed == []
    assert_error(result.errors, "t/a.yml", "domains", "must be a list")
    assert_error(result.errors, "t/b.yml", "", "unknown field 'domian'", "did you mean 'domains'?")
    assert_error(result.errors, "t/c.yml", "networks[0]", "open relay")


def test_tenant_error_lists_all_errors():
    result = validate_tenants({"t/a.yml": tenant(domains=5), "t/b.yml": tenant(domains=[])})
    with pytest.raises(TenantError) as info:
        result.raise_for_errors()
    assert info.value.errors == result.errors
    assert str(info.value) == "\n".join(result.errors)
    validate_tenants({}).raise_for_errors()


# --------------------------------------------------------------------------------------
# Unknown fields


def test_unknown_top_level_field_suggests_closest():
    errors = errors_for(tenant(domian=["x.test"]))
    assert_error(errors, FILE, "", "unknown field 'domian'", "did you mean 'domains'?")


def test_unknown_field_without_close_match_lists_known_fields():
    errors = errors_for(tenant(colour="blue"))
    assert_error(errors, FILE, "", "unknown field 'colour'", "known fields are name, state")


def test_unknown_user_field():
    errors = errors_for(tenant(users=[{"login": "scanner@acme.test", "pasword": PASSWORD}]))
    assert_error(errors, FILE, "users[0]", "unknown field 'pasword'", "did you mean 'password'?")


def test_unknown_limits_field():
    errors = errors_for(tenant(limits={"messages_per_dya": 5}))
    assert_error(errors, FILE, "limits", "'messages_per_dya'", "did you mean 'messages_per_day'?")


def test_unknown_relay_field():
    errors = errors_for(tenant(relay={"vai": "direct"}))
    assert_error(errors, FILE, "relay", "unknown field 'vai'", "did you mean 'via'?")


# --------------------------------------------------------------------------------------
# name and state


def test_name_must_match_file_stem():
    errors = errors_for(tenant(name="other"))
    assert_error(errors, FILE, "name", "'other' does not match", "rename the file to other.yml")


def test_name_must_be_valid():
    errors = errors_for(tenant(name="Acme_Corp"), file="t/Acme_Corp.yml")
    assert_error(errors, "t/Acme_Corp.yml", "name", "not a valid tenant name", "lowercase")


def test_name_must_be_a_string():
    assert_error(errors_for(tenant(name=42)), FILE, "name", "must be a string", "name: acme")


def test_file_stem_must_be_a_valid_name():
    errors = errors_for(tenant(), file="t/Acme Corp.yml")
    assert_error(errors, "t/Acme Corp.yml", "name", "not a valid tenant name", "rename the file")


def test_duplicate_tenant_name_from_two_files():
    raw = {"t/acme.yml": tenant(), "t/acme.yaml": tenant(domains=["other.test"], users=None)}
    errors = validate_tenants(raw).errors
    assert_error(errors, "t/acme.yml", "name", "also defined in t/acme.yaml", "one file per tenant")


@pytest.mark.parametrize("state", ["gone", True])
def test_invalid_state(state: object):
    assert_error(errors_for(tenant(state=state)), FILE, "state", "'present' or 'absent'")


def test_absent_tenant_checks_only_the_name():
    gone = Unresolved("variable 'vault_acme_scanner' is undefined; define it")
    data = {"state": "absent", "domains": "junk", "typo": 1, "users": [{"password": gone}]}
    result = validate_tenants({FILE: data})
    assert result == Result(removed=["acme"])
    errors = errors_for({"state": "absent", "name": "wrong"})
    assert_error(errors, FILE, "name", "does not match", "rename")


# --------------------------------------------------------------------------------------
# domains


def test_domains_required():
    errors = errors_for(tenant(domains=None))
    assert errors == [
        f"{FILE}: domains: is required for a present tenant; add domains: [acme.test]"
    ]


def test_domains_empty():
    assert_error(errors_for(tenant(domains=[])), FILE, "domains", "empty", "at least one")


def test_domains_string_instead_of_list():
    errors = errors_for(tenant(domains="acme.test"))
    assert_error(errors, FILE, "domains", "must be a list, not a string", "domains: [acme.test]")


def test_domain_not_a_string():
    errors = errors_for(tenant(domains=["acme.test", 42]))
    assert_error(errors, FILE, "domains[1]", "must be a string, not a number", "domain name")


@pytest.mark.parametrize(
    ("domain", "what", "fix"),
    [
        ("localhost", "only one label", "at least two labels"),
        ("acme..test", "empty label", "acme.test"),
        ("acme_corp.test", "invalid label 'acme_corp'", "letters, digits and '-'"),
        ("-acme.test", "invalid label '-acme'", "not at the start or end"),
        ("a b.test", "invalid label", "letters, digits"),
        ("a" * 64 + ".test", "longer than 63", "shorten"),
        (".".join(["a" * 60] * 5), "longer than 253", "shorter domain"),
        ("192.0.2.1", "numeric label", "acme.test"),
        ("", "empty", "acme.test"),
    ],
)
def test_invalid_domains(domain: str, what: str, fix: str):
    users = [{"login": "scanner@acme.test", "password": PASSWORD}]
    errors = errors_for(tenant(domains=["acme.test", domain], users=users))
    assert_error(errors, FILE, "domains[1]", what, fix)


def test_domain_claimed_by_two_tenants():
    raw = {
        "t/acme.yml": tenant(users=None),
        "t/beta.yml": tenant(domains=["beta.test", "ACME.test."], users=None),
    }
    errors = validate_tenants(raw).errors
    assert errors == [
        "t/beta.yml: domains[1]: domain 'acme.test' is already claimed by tenant 'acme' "
        "(t/acme.yml); remove it from one of the two tenants"
    ]


def test_absent_tenant_does_not_claim_domains():
    raw = {"t/acme.yml": tenant(), "t/old.yml": {"state": "absent", "domains": ["acme.test"]}}
    assert validate_tenants(raw).errors == []


# --------------------------------------------------------------------------------------
# users


def test_users_must_be_a_list():
    errors = errors_for(tenant(users={"login": "scanner@acme.test"}))
    assert_error(errors, FILE, "users", "must be a list, not a mapping", "users: [{login:")


def test_user_must_be_a_mapping():
    errors = errors_for(tenant(users=["scanner@acme.test"]))
    assert_error(errors, FILE, "users[0]", "must be a mapping, not a string", "login:")


def test_login_required():
    errors = errors_for(tenant(users=[{"password": PASSWORD}]))
    assert_error(errors, FILE, "users[0].login", "is required", "add login:")


def test_login_must_be_a_string():
    errors = errors_for(tenant(users=[{"login": ["x"], "password": PASSWORD}]))
    assert_error(errors, FILE, "users[0].login", "must be a string, not a list", "user@domain")


@pytest.mark.parametrize(
    "login", ["scanner", "scan ner@acme.test", "@acme.test", "a\u00e9@acme.test"]
)
def test_login_format(login: str):
    errors = errors_for(tenant(users=[{"login": login, "password": PASSWORD}]))
    assert_error(errors, FILE, "users[0].login", "not a valid login", "user@domain")


def test_login_domain_must_belong_to_tenant():
    errors = errors_for(tenant(users=[{"login": "scanner@other.test", "password": PASSWORD}]))
    assert_error(
        errors,
        FILE,
        "users[0].login",
        "not in one of this tenant's domains (acme.test)",
        "add other.test to domains",
    )


def test_login_with_invalid_domain():
    errors = errors_for(tenant(users=[{"login": "scanner@acme", "password": PASSWORD}]))
    assert_error(errors, FILE, "users[0].login", "only one label", "acme.test")


def test_duplicate_login_within_tenant_ignores_case():
    users = [
        {"login": "scanner@acme.test", "password": PASSWORD},
        {"login": "SCANNER@acme.test", "password": PASSWORD},
    ]
    errors = errors_for(tenant(users=users))
    assert_error(
        errors, FILE, "users[1].login", "already used by users[0].login", "remove the duplicate"
    )


def test_login_used_by_two_tenants():
    raw = {
        "t/acme.yml": tenant(),
        "t/beta.yml": tenant(
            domains=["beta.test", "acme.test"],
            users=[{"login": "scanner@acme.test", "password": PASSWORD}],
        ),
    }
    errors = validate_tenants(raw).errors
    assert_error(errors, "t/beta.yml", "domains[1]", "already claimed by tenant 'acme'")
    assert_error(
        errors,
        "t/beta.yml",
        "users[0].login",
        "'scanner@acme.test' is already used by tenant 'acme' (t/acme.yml)",
        "a login of its own",
    )


def test_password_or_hash_required():
    errors = errors_for(tenant(users=[{"login": "scanner@acme.test"}]))
    assert_error(
        errors, FILE, "users[0]", "one of password or password_hash is required", "ansible-vault"
    )


def test_password_and_hash_exclusive():
    user = {"login": "scanner@acme.test", "password": PASSWORD, "password_hash": "{PLAIN}x"}
    errors = errors_for(tenant(users=[user]))
    assert_error(errors, FILE, "users[0]", "both password and password_hash", "only one")


def test_password_too_short():
    errors = errors_for(tenant(users=[{"login": "scanner@acme.test", "password": "short"}]))
    assert_error(errors, FILE, "users[0].password", "too short (5 characters)", "at least 12")


def test_password_must_be_a_string():
    user = {"login": "scanner@acme.test", "password": 1234567890123}
    errors = errors_for(tenant(users=[user]))
    assert_error(errors, FILE, "users[0].password", "must be a string, not a number", "quote")


@pytest.mark.parametrize("value", ["$6$abc$def", "{SHA512-CRYPT}", 42])
def test_password_hash_needs_scheme(value: object):
    errors = errors_for(tenant(users=[{"login": "scanner@acme.test", "password_hash": value}]))
    assert_error(errors, FILE, "users[0].password_hash", "{SHA512-CRYPT}$6$", "doveadm pw")


def test_password_hash_without_separators():
    user = {"login": "scanner@acme.test", "password_hash": "{PLAIN}a:b"}
    errors = errors_for(tenant(users=[user]))
    assert_error(errors, FILE, "users[0].password_hash", "':' or whitespace", "doveadm pw")


def test_unrendered_password_without_secret_resolution():
    user = {"login": "scanner@acme.test", "password": "{{ vault_acme_scanner }}"}
    data = tenant(users=[user, {"login": "vault@acme.test", "password": VaultedValue("$AN..")}])
    result = only_tenant(data, templated=False)
    assert result["users"] == [
        {"login": "scanner@acme.test", "password_hash": None},
        {"login": "vault@acme.test", "password_hash": None},
    ]
    literal = tenant(users=[{"login": "a@acme.test", "password": "x"}])
    errors = errors_for(literal, templated=False)
    assert_error(errors, FILE, "users[0].password", "too short")


def test_vaulted_password_needs_resolution():
    user = {"login": "scanner@acme.test", "password": VaultedValue("$ANSIBLE_VAULT;1.1")}
    errors = errors_for(tenant(users=[user]))
    assert_error(errors, FILE, "users[0].password", "vault-encrypted", "vault password")


def test_unresolved_values_are_reported_without_follow_up_noise():
    undefined = (
        "variable 'vault_acme_scanner' is undefined; "
        "define it (for example in group_vars/all/vault.yml with ansible-vault)"
    )
    data = tenant(
        domains=[Unresolved("variable 'acme_domain' is undefined; define it")],
        users=[{"login": "scanner@acme.test", "password": Unresolved(undefined)}],
    )
    assert errors_for(data) == [
        f"{FILE}: domains[0]: variable 'acme_domain' is undefined; define it",
        f"{FILE}: users[0].password: {undefined}",
    ]


# --------------------------------------------------------------------------------------
# networks


def test_networks_host_bits_suggest_network():
    errors = errors_for(tenant(networks=["192.0.2.0/28", "192.0.2.5/28"]))
    assert_error(
        errors, FILE, "networks[1]", "192.0.2.5/28 has host bits set", "did you mean 192.0.2.0/28?"
    )


def test_networks_ipv6_host_bits():
    errors = errors_for(tenant(networks=["2001:db8::1/48"]))
    assert_error(errors, FILE, "networks[0]", "host bits set", "did you mean 2001:db8::/48?")


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "10.0.0.0/7", "2001::/31"])
def test_networks_open_relay(network: str):
    errors = errors_for(tenant(networks=[network]))
    assert_error(errors, FILE, "networks[0]", "open relay", "only the client networks")


def test_networks_widest_allowed():
    result = only_tenant(tenant(networks=["10.0.0.0/8", "2001:db8::/32"]))
    assert result["networks"] == ["10.0.0.0/8", "2001:db8::/32"]


@pytest.mark.parametrize("network", ["192.0.2.0/33", "example.test", "192.0.2"])
def test_networks_invalid(network: str):
    errors = errors_for(tenant(networks=[network]))
    assert_error(errors, FILE, "networks[0]", "not an IP network", "192.0.2.0/28")


def test_networks_must_be_a_list_of_strings():
    errors = errors_for(tenant(networks="192.0.2.0/28"))
    assert_error(errors, FILE, "networks", "must be a list", "networks: [192.0.2.0/28]")
    errors = errors_for(tenant(networks=[3232235520]))
    assert_error(errors, FILE, "networks[0]", "must be a string", "192.0.2.0/28")


# --------------------------------------------------------------------------------------
# limits


@pytest.mark.parametrize(
    ("value", "what"),
    [(True, "not a boolean"), ("100", "not a string"), (1.5, "not a decimal number")],
)
def test_limits_must_be_whole_numbers(value: object, what: str):
    errors = errors_for(tenant(limits={"messages_per_day": value}))
    assert_error(errors, FILE, "limits.messages_per_day", what, "messages_per_day: 100")


@pytest.mark.parametrize("value", [0, -5])
def test_limits_must_be_positive(value: int):
    errors = errors_for(tenant(limits={"recipients_per_message": value}))
    assert_error(errors, FILE, "limits.recipients_per_message", "must be positive", "1 or more")


def test_limits_must_be_a_mapping():
    errors = errors_for(tenant(limits=[100]))
    assert_error(errors, FILE, "limits", "must be a mapping, not a list", "messages_per_day")


def test_limits_partial():
    limits = only_tenant(tenant(limits={"messages_per_day": 7}))["limits"]
    assert limits == {**NO_LIMITS, "messages_per_day": 7}


# --------------------------------------------------------------------------------------
# relay


def test_relay_unknown_smarthost_suggests_closest():
    errors = errors_for(tenant(relay={"via": "smart-1"}), smarthosts=["smart1", "smart2"])
    assert_error(errors, FILE, "relay.via", "unknown smart host 'smart-1'", "did you mean")


def test_relay_unknown_smarthost_lists_known():
    errors = errors_for(tenant(relay={"via": "zzz"}), smarthosts=["smart1"])
    assert_error(errors, FILE, "relay.via", "'zzz'", "use 'direct' or one of: smart1")


def test_relay_without_known_smarthosts():
    errors = errors_for(tenant(relay={"via": "smart1"}), smarthosts=[])
    assert_error(errors, FILE, "relay.via", "unknown smart host", "no smart hosts are defined")


def test_relay_not_checked_when_smarthosts_unknown():
    assert only_tenant(tenant(relay={"via": "smart1"}))["relay"] == {"via": "smart1"}


@pytest.mark.parametrize("value", [5, "", ["smart1"]])
def test_relay_via_must_be_a_name(value: object):
    errors = errors_for(tenant(relay={"via": value}))
    assert_error(errors, FILE, "relay.via", "must be a smart host name", "via: direct")


def test_relay_must_be_a_mapping():
    errors = errors_for(tenant(relay="direct"))
    assert_error(errors, FILE, "relay", "must be a mapping, not a string", "relay: {via: direct}")


# --------------------------------------------------------------------------------------
# Loading files without Ansible


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_check_dir_empty_directory(tmp_path: Path):
    assert check_dir(tmp_path) == Result()


def test_check_dir_missing_directory(tmp_path: Path):
    result = check_dir(tmp_path / "nope")
    assert_error(result.errors, str(tmp_path / "nope"), "", "not a directory", "create it")
    with pytest.raises(TenantError):
        load_tenant_dir(tmp_path / "nope")


def test_check_dir_valid_files(tmp_path: Path):
    write(
        tmp_path,
        "acme.yml",
        """\
        domains: [acme.test]
        users:
          - login: scanner@acme.test
            password: "{{ vault_acme_scanner }}"
          - login: vault@acme.test
            password: !vault |
              $ANSIBLE_VAULT;1.1;AES256
              6162
        networks: [192.0.2.0/28]
        """,
    )
    write(tmp_path, "old.yaml", "state: absent\n")
    write(tmp_path, ".hidden.yml", "not: [valid\n")
    write(tmp_path, "notes.txt", "ignored")
    result = check_dir(tmp_path)
    assert result.errors == []
    assert result.removed == ["old"]
    assert result.tenants[0]["users"] == [
        {"login": "scanner@acme.test", "password_hash": None},
        {"login": "vault@acme.test", "password_hash": None},
    ]


def test_check_dir_yaml_syntax_error_has_line(tmp_path: Path):
    write(tmp_path, "acme.yml", "domains: [acme.test\nusers: []\n")
    write(tmp_path, "beta.yml", "domains: beta.test\n")
    result = check_dir(tmp_path)
    acme = str(tmp_path / "acme.yml")
    assert_error(result.errors, acme, "", "YAML syntax error at line", "fix the YAML")
    assert_error(result.errors, str(tmp_path / "beta.yml"), "domains", "must be a list")


def test_check_dir_duplicate_key(tmp_path: Path):
    write(tmp_path, "acme.yml", "domains: [acme.test]\ndomains: [other.test]\n")
    errors = check_dir(tmp_path).errors
    assert_error(errors, str(tmp_path / "acme.yml"), "", "duplicate key 'domains'", "line 2")


def test_check_dir_not_utf8(tmp_path: Path):
    (tmp_path / "acme.yml").write_bytes(b"domains: [\xff]\n")
    errors = check_dir(tmp_path).errors
    assert_error(errors, str(tmp_path / "acme.yml"), "", "not UTF-8", "save it as UTF-8")


def test_check_dir_notes_vaulted_files(tmp_path: Path):
    write(tmp_path, "acme.yml", "$ANSIBLE_VAULT;1.1;AES256\n6162\n")
    result = check_dir(tmp_path)
    assert result.errors == [] and result.tenants == []
    assert "acme.yml: encrypted with ansible-vault" in result.notes[0]


def test_check_dir_smarthosts(tmp_path: Path):
    write(tmp_path, "acme.yml", "domains: [acme.test]\nrelay: {via: smart9}\n")
    assert check_dir(tmp_path).errors == []
    assert_error(
        check_dir(tmp_path, smarthosts=["smart1"]).errors, str(tmp_path / "acme.yml"), "relay.via"
    )


# --------------------------------------------------------------------------------------
# The action plugin, run for real through ansible-playbook


def _ansible_tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(name)


PLAYBOOK = """\
- name: Tenants
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Load tenants
      smtpgw.gateway.smtpgw_tenants:
        path: tenants
        smarthosts: [smart1]
      register: __tenants
      failed_when: false
    - name: Save the result
      ansible.builtin.copy:
        content: "{{ __tenants | to_json }}"
        dest: "{{ playbook_dir }}/result.json"
        mode: "0600"
"""


def _run_playbook(workdir: Path, *extra: str) -> dict[str, Any]:
    playbook = _ansible_tool("ansible-playbook")
    if playbook is None:
        pytest.skip("ansible-playbook is not installed")
    # This checkout as the collection smtpgw.gateway, as ansible.cfg has it in .lab/collections.
    collections = workdir / "collections"
    link = collections / "ansible_collections" / "smtpgw" / "gateway"
    if not link.is_symlink():
        link.parent.mkdir(parents=True)
        link.symlink_to(REPO)
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(collections),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
        SMTPGW_PASSWORD_CACHE=str(workdir / "password-cache"),  # never the user's own cache
    )
    command = [playbook, "-i", "localhost,", "-c", "local", "playbook.yml"]
    command += ["-e", f"ansible_python_interpreter={sys.executable}", *extra]
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((workdir / "result.json").read_text())


def test_action_plugin_through_ansible_playbook(tmp_path: Path):
    vault = _ansible_tool("ansible-vault")
    if vault is None:
        pytest.skip("ansible-vault is not installed")
    (tmp_path / "playbook.yml").write_text(PLAYBOOK)
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    write(
        tenants,
        "acme.yml",
        """\
        domains: [acme.test]
        users:
          - login: scanner@acme.test
            password: "{{ vault_acme_scanner }}"
        networks: [192.0.2.0/28]
        relay: {via: smart1}
        """,
    )
    write(tenants, "old.yml", "state: absent\n")

    # Without the vault variable: the named error, and nothing partial.
    result = _run_playbook(tmp_path)
    assert "tenants" not in result
    assert result["msg"] == (
        "tenants/acme.yml: users[0].password: variable 'vault_acme_scanner' is undefined; "
        "define it (for example in group_vars/all/vault.yml with ansible-vault)"
    )

    # With the secret in an ansible-vault file: the hash, never the plaintext.
    secret = "vaulted secret ✓ password"
    # A whole tenant file encrypted with ansible-vault is decrypted too.
    (tmp_path / "vault-pass").write_text("test vault password\n")
    (tmp_path / "group_vars" / "all").mkdir(parents=True)
    vault_file = tmp_path / "group_vars" / "all" / "vault.yml"
    vault_file.write_text(json.dumps({"vault_acme_scanner": secret}))
    write(tenants, "beta.yml", "domains: [beta.test]\n")
    for file in (vault_file, tenants / "beta.yml"):
        subprocess.run(
            [vault, "encrypt", "--vault-password-file", "vault-pass", str(file)],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )
    result = _run_playbook(tmp_path, "--vault-password-file", "vault-pass")
    assert result.get("failed") is not True, result.get("msg")
    assert result["changed"] is False
    assert result["removed"] == ["old"]
    assert [t["name"] for t in result["tenants"]] == ["acme", "beta"]
    assert result["tenants"][0] == {
        "name": "acme",
        "domains": ["acme.test"],
        "users": [
            {
                "login": "scanner@acme.test",
                "password_hash": dovecot_hash("scanner@acme.test", secret, "smtpgw"),
            }
        ],
        "networks": ["192.0.2.0/28"],
        "limits": NO_LIMITS,
        "relay": {"via": "smart1"},
    }
    assert secret not in json.dumps(result)


def test_check_dir_leaves_jinja_networks_to_the_deploy_time_check(tmp_path):
    (tmp_path / "acme.yml").write_text(
        "domains: [acme.test]\nnetworks: [\"{{ ansible_facts['default_ipv4']['gateway'] }}/32\"]\n"
    )
    assert check_dir(tmp_path).errors == []
    # With templates resolved (under Ansible), the same value is checked as a network.
    result = validate_tenants({"acme.yml": {"domains": ["acme.test"], "networks": ["{{ x }}"]}})
    assert "networks[0]" in result.errors[0]


PLAYBOOK_CACHE_DIR = PLAYBOOK.replace(
    "        smarthosts: [smart1]\n",
    '        smarthosts: [smart1]\n        password_cache_dir: "{{ playbook_dir }}/cache"\n',
)


def test_action_plugin_limits_literal_fields_hashes_and_cache(tmp_path: Path):
    (tmp_path / "playbook.yml").write_text(PLAYBOOK_CACHE_DIR)
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    given = dovecot_hash("printer@acme.test", "printer secret", "other")
    write(
        tenants,
        "acme.yml",
        """\
        domains: [acme.test]
        users:
          - login: scanner@acme.test
            password: "{{ acme_password }}"
          - login: printer@acme.test
            password_hash: "{{ acme_printer_hash }}"
        """,
    )
    extra = ["-e", "acme_password=a-long-enough-secret"]
    result = _run_playbook(tmp_path, *extra, "-e", f"acme_printer_hash={given}")
    assert result.get("failed") is not True, result.get("msg")
    assert result["tenants"][0]["users"] == [
        {
            "login": "scanner@acme.test",
            "password_hash": dovecot_hash("scanner@acme.test", "a-long-enough-secret", "smtpgw"),
        },
        {"login": "printer@acme.test", "password_hash": given},
    ]
    cache = tmp_path / "cache" / "password-hashes.json"
    assert oct(cache.stat().st_mode & 0o777) == "0o600"
    assert "a-long-enough-secret" not in json.dumps(result)

    # A weak hash from the vault, Jinja in a literal field, a link out of the directory and an
    # oversized file: each refused with its file (and field).
    write(tmp_path, "outside.yml", "domains: [outside.test]\n")
    os.symlink(tmp_path / "outside.yml", tenants / "linked.yml")
    write(tenants, "big.yml", "domains: [big.test]\n# " + "x" * (1024 * 1024) + "\n")
    write(tenants, "beta.yml", 'domains: [beta.test]\nrelay: {via: "{{ route }}"}\n')
    laughs = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 10)]
    write(tenants, "laughs.yml", "\n".join(laughs) + "\n")
    write(tenants, "loop.yml", "domains: [loop.test]\nnetworks: &n [*n]\n")
    result = _run_playbook(tmp_path, *extra, "-e", "acme_printer_hash={PLAIN}x", "-e", "route=x")
    assert "tenants" not in result
    errors = result["msg"].splitlines()
    assert len(errors) == 6, errors
    assert errors[0].startswith("tenants/acme.yml: users[1].password_hash: the scheme {PLAIN}")
    assert errors[1].startswith("tenants/beta.yml: relay.via: is a Jinja expression")
    assert errors[2].startswith("tenants/big.yml: the file is 1,048,")
    assert errors[3].startswith("tenants/laughs.yml: the file expands to more than 200,000")
    assert errors[4].startswith("tenants/linked.yml: is a symbolic link to")
    assert errors[5].startswith("tenants/loop.yml: the file refers to itself")


def test_action_plugin_documentation_is_valid_yaml():
    tree = ast.parse((REPO / "plugins" / "action" / "smtpgw_tenants.py").read_text())
    docs = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("DOCUMENTATION", "EXAMPLES", "RETURN")
    }
    assert sorted(docs) == ["DOCUMENTATION", "EXAMPLES", "RETURN"]
    parsed = {name: yaml.safe_load(text) for name, text in docs.items()}
    options = parsed["DOCUMENTATION"]["options"]
    assert sorted(options) == [
        "password_cache",
        "password_cache_dir",
        "path",
        "salt_key",
        "smarthosts",
    ]


def test_limits_per_hour_and_per_login():
    data = tenant(
        users=[{"login": "App@acme.test", "password_hash": GIVEN_HASH}],
        limits={
            "messages_per_day": 100,
            "messages_per_hour": 10,
            "logins": {"app@ACME.test": {"messages_per_day": 5}},
        },
    )
    assert only_tenant(data)["limits"] == {
        "messages_per_day": 100,
        "messages_per_hour": 10,
        "recipients_per_message": 50,
        "logins": {"app@acme.test": {"messages_per_day": 5}},
    }


def test_limit_override_for_a_login_the_tenant_lacks():
    data = tenant(
        users=[{"login": "app@acme.test", "password_hash": GIVEN_HASH}],
        limits={"logins": {"ghost@acme.test": {"messages_per_day": 5}}},
    )
    assert_error(
        errors_for(data),
        FILE,
        "limits.logins.ghost@acme.test",
        "not a login of this tenant (its logins: app@acme.test)",
        "listed under users",
    )


@pytest.mark.parametrize(
    ("override", "what"),
    [
        ({"messages_per_hour": 0}, "must be positive"),
        ({"messages_per_day": -3}, "must be positive"),
        ({"messages_per_hour": 1_000_001}, "more than the most allowed"),
        ({"messages_per_dya": 5}, "'messages_per_dya'"),
        ({}, "gives no limit"),
        (7, "must be a mapping"),
    ],
)
def test_bad_login_limits(override: object, what: str):
    data = tenant(
        users=[{"login": "app@acme.test", "password_hash": GIVEN_HASH}],
        limits={"logins": {"app@acme.test": override}},
    )
    errors = errors_for(data)
    assert any("limits.logins.app@acme.test" in e and what in e for e in errors), errors
