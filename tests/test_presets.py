"""Provider presets: the data, their resolution, the Postfix entries they render, the errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgw import presets
from smtpgw.postfix_maps import postfix_maps, transport
from smtpgw.tenant_files import check_inventory
from smtpgw.tenant_schema import validate_tenants

PRESETS = presets.load_presets(presets.default_presets_dirs())
FILE = "group_vars/relays/main.yml"
LOGIN = {"username": "relay@example.com", "password": "a-secret-password"}


def resolve(*entries, where=FILE):
    return presets.resolve_smarthosts(list(entries), PRESETS.by_name, where=where)


def one(entry):
    outcome = resolve(entry)
    assert not outcome.errors, outcome.errors
    return outcome.smarthosts[0]


def rendered(host):
    """The Postfix entries of a tenant routed through ``host``: transport, TLS policy, login."""
    tenant = {"name": "t", "domains": ["t.test"], "relay": {"via": host["name"]}}
    maps = postfix_maps([tenant], [host])
    return maps["sender_transport"], maps["tls_policy"], maps["sasl_passwd"]


def test_the_project_presets_load_without_problems():
    assert PRESETS.errors == []
    assert {
        "m365",
        "m365-connector",
        "google",
        "google-relay",
        "ses",
        "sendgrid",
        "mailgun",
        "postmark",
    } <= set(PRESETS.by_name)


# (smart host entry, transport, TLS policy, sasl_passwd lines, spf_include)
CASES = {
    "m365": (
        {"preset": "m365", **LOGIN},
        "smtp:[smtp.office365.com]:587",
        "[smtp.office365.com]:587 secure match=hostname",
        ["@t.test relay@example.com:a-secret-password"],
        "spf.protection.outlook.com",
    ),
    "m365-connector-address": (
        {"preset": "m365-connector", "host": "contoso-com.mail.protection.outlook.com"},
        "smtp:[contoso-com.mail.protection.outlook.com]:25",
        "[contoso-com.mail.protection.outlook.com]:25 secure match=hostname",
        [],
        "spf.protection.outlook.com",
    ),
    "m365-connector-certificate": (
        {
            "preset": "m365-connector",
            "host": "contoso-com.mail.protection.outlook.com",
            "auth": "certificate",
        },
        "smtpcert:[contoso-com.mail.protection.outlook.com]:25",
        "[contoso-com.mail.protection.outlook.com]:25 secure match=hostname",
        [],
        "spf.protection.outlook.com",
    ),
    "google": (
        {"preset": "google", **LOGIN},
        "smtp:[smtp.gmail.com]:587",
        "[smtp.gmail.com]:587 secure match=hostname",
        ["@t.test relay@example.com:a-secret-password"],
        "_spf.google.com",
    ),
    "google-relay": (
        {"preset": "google-relay"},
        "smtp:[smtp-relay.gmail.com]:587",
        "[smtp-relay.gmail.com]:587 secure match=hostname",
        [],
        "_spf.google.com",
    ),
    "ses": (
        {"preset": "ses", "region": "eu-west-1", **LOGIN},
        "smtp:[email-smtp.eu-west-1.amazonaws.com]:587",
        "[email-smtp.eu-west-1.amazonaws.com]:587 secure match=hostname",
        ["@t.test relay@example.com:a-secret-password"],
        None,
    ),
    "sendgrid": (
        {"preset": "sendgrid", "password": "SG.key"},
        "smtp:[smtp.sendgrid.net]:587",
        "[smtp.sendgrid.net]:587 secure match=hostname",
        ["@t.test apikey:SG.key"],
        "sendgrid.net",
    ),
    "mailgun": (
        {"preset": "mailgun", **LOGIN},
        "smtp:[smtp.mailgun.org]:587",
        "[smtp.mailgun.org]:587 secure match=hostname",
        ["@t.test relay@example.com:a-secret-password"],
        "mailgun.org",
    ),
    "postmark": (
        {"preset": "postmark", "username": "tok", "password": "tok"},
        "smtp:[smtp.postmarkapp.com]:587",
        "[smtp.postmarkapp.com]:587 secure match=hostname",
        ["@t.test tok:tok"],
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_preset_renders_its_transport_tls_policy_and_credentials(case):
    entry, route, policy, logins, spf = CASES[case]
    host = one({"name": "sh", **entry})
    transports, policies, sasl = rendered(host)
    assert transports == [f"@t.test {route}"]
    assert policies == [policy]
    nexthop = route.split(":", 1)[1]
    assert sasl == ([*logins, f"{nexthop} {logins[0].split(' ', 1)[1]}"] if logins else [])
    assert host["spf_include"] == spf


def test_overrides_win_field_by_field():
    host = one(
        {
            "name": "ses",
            "preset": "ses",
            "region": "us-east-1",
            "port": 2465,
            "tls": "implicit",
            "spf_include": "amazonses.com",
            "limits": {"recipients_per_message": 20},
            **LOGIN,
        }
    )
    assert host["host"] == "email-smtp.us-east-1.amazonaws.com"  # the preset's, with the region
    assert (host["port"], host["tls"], host["spf_include"]) == (2465, "implicit", "amazonses.com")
    assert host["limits"] == {"recipients_per_message": 20}
    assert host["tls_verify"] is True and host["auth"] == "login"  # the preset's
    assert transport(host) == "smtps:[email-smtp.us-east-1.amazonaws.com]:2465"
    # A host of its own keeps the rest of the preset.
    other = one({"name": "m", "preset": "m365", "host": "smtp-legacy.example.com", **LOGIN})
    assert (other["host"], other["port"], other["tls"]) == (
        "smtp-legacy.example.com",
        587,
        "starttls",
    )


def test_a_port_of_its_own_brings_its_tls_mode():
    assert (
        one({"name": "s", "preset": "sendgrid", "port": 465, "password": "k"})["tls"] == "implicit"
    )
    assert (
        one({"name": "s", "preset": "sendgrid", "port": 2525, "password": "k"})["tls"] == "starttls"
    )


def test_without_a_preset_the_old_fields_mean_what_they_meant():
    host = one({"name": "own", "host": "smtp.example.com", "port": 465, **LOGIN})
    assert (host["tls"], host["auth"], host["preset"]) == ("implicit", "login", None)
    assert transport(host) == "smtps:[smtp.example.com]:465"
    bare = one({"name": "own", "host": "smtp.example.com"})
    assert (bare["port"], bare["tls"], bare["auth"]) == (587, "starttls", "none")
    assert transport({**bare, "tls": "implicit", "auth": "certificate"}).startswith("smtpscert:")


def test_unknown_preset_is_refused_naming_file_field_and_presets():
    (error,) = resolve({"name": "o365", "preset": "m356", **LOGIN}).errors
    assert error.startswith(f"{FILE}: relay_smarthosts[0] (o365): preset: unknown preset 'm356'")
    assert "did you mean 'm365'?" in error
    for name in PRESETS.by_name:
        assert name in error


def test_unknown_field_is_refused_naming_file_field_and_presets():
    (error,) = resolve({"name": "g", "preset": "google", "usernme": "x", **LOGIN}).errors
    assert error.startswith(f"{FILE}: relay_smarthosts[0] (g): usernme: not a smart-host field")
    assert "did you mean 'username'?" in error and "m365-connector" in error


def test_oauth2_is_recorded_but_refused():
    assert "oauth2" in PRESETS.by_name["m365"]["auth_options"]
    (error,) = resolve({"name": "m", "preset": "m365", "auth": "oauth2", **LOGIN}).errors
    assert "auth: oauth2 is chosen" in error
    assert "the relay cannot speak XOAUTH2 yet; use auth: login" in error


@pytest.mark.parametrize(
    ("entry", "field", "words"),
    [
        ({"preset": "m365"}, "username and password", "missing, and auth is login"),
        ({"preset": "m365", "username": "u"}, "password", "missing"),
        ({"preset": "m365-connector"}, "host", "contoso-com.mail.protection.outlook.com"),
        ({"preset": "ses", **LOGIN}, "region", "needs a region"),
        ({"preset": "ses", "region": "Europe", **LOGIN}, "region", "not an AWS region"),
        ({"preset": "m365", "auth": "certificate", **LOGIN}, "auth", "does not offer"),
        (
            {"preset": "m365-connector", "host": "c.mail.protection.outlook.com", **LOGIN},
            "username and password",
            "given, but auth is none",
        ),
        ({"preset": "google", "tls": "ssl", **LOGIN}, "tls", "unknown TLS mode"),
        ({"preset": "google", "port": 70000, **LOGIN}, "port", "not a port"),
        (
            {"preset": "google", "limits": {"per_hour": 5}, **LOGIN},
            "limits.per_hour",
            "not a limit",
        ),
    ],
)
def test_bad_smarthost_fields_are_refused(entry, field, words):
    errors = resolve({"name": "x", **entry}).errors
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{FILE}: relay_smarthosts[0] (x): {field}: ")
    assert words in errors[0]


def test_two_smarthosts_of_one_name_are_refused():
    (error,) = resolve({"name": "a", "host": "a.test"}, {"name": "a", "host": "b.test"}).errors
    assert "relay_smarthosts[1] (a): name: 'a' is also relay_smarthosts[0]" in error


def test_an_inventory_preset_wins_and_a_bad_preset_file_is_named(tmp_path: Path):
    own = tmp_path / "providers"
    own.mkdir()
    (own / "m365.yml").write_text("description: our own\nhost: smtp.internal.test\nport: 2587\n")
    (own / "broken.yml").write_text("description: x\nhots: typo.test\n")
    loaded = presets.load_presets([*presets.default_presets_dirs(), own])
    assert loaded.by_name["m365"]["host"] == "smtp.internal.test"
    assert loaded.errors == [
        f"{own / 'broken.yml'}: hots: not a preset field; use one of: "
        + ", ".join(presets.PRESET_FIELDS)
    ]


def test_preset_limits_become_the_tenants_defaults_where_it_sets_none():
    hosts = {h["name"]: h for h in resolve({"name": "m365", "preset": "m365", **LOGIN}).smarthosts}
    raw = {
        "a.yml": {"name": "a", "domains": ["a.test"], "relay": {"via": "m365"}},
        "b.yml": {
            "name": "b",
            "domains": ["b.test"],
            "limits": {"messages_per_day": 10},
            "relay": {"via": "m365"},
        },
        "c.yml": {"name": "c", "domains": ["c.test"]},
    }
    result = validate_tenants(raw, smarthosts=hosts, templated=False)
    limits = {t["name"]: t["limits"] for t in result.tenants}
    rest = {"messages_per_hour": None, "logins": {}}  # what no preset documents
    assert limits["a"] == {"messages_per_day": 10000, "recipients_per_message": 500, **rest}
    assert limits["b"] == {"messages_per_day": 10, "recipients_per_message": 500, **rest}
    assert limits["c"] == {"messages_per_day": None, "recipients_per_message": 50, **rest}


def test_tenants_check_of_an_inventory_reports_smarthost_errors(tmp_path: Path):
    (tmp_path / "tenants").mkdir()
    (tmp_path / "tenants" / "a.yml").write_text("domains: [a.test]\nrelay: {via: m365}\n")
    vars_dir = tmp_path / "group_vars" / "relays"
    vars_dir.mkdir(parents=True)
    (vars_dir / "main.yml").write_text(
        "relay_smarthosts:\n  - {name: m365, preset: m366, username: u, password: p}\n"
    )
    result = check_inventory(tmp_path)
    assert result.tenants == []
    assert result.errors[0].startswith(
        f"{vars_dir / 'main.yml'}: relay_smarthosts[0] (m365): preset: unknown preset 'm366'"
    )
    (vars_dir / "main.yml").write_text(
        "relay_smarthosts:\n"
        "  - {name: m365, preset: m365, username: u, password: '{{ vault_m365 }}'}\n"
    )
    result = check_inventory(tmp_path)
    assert result.errors == []
    assert result.tenants[0]["limits"]["recipients_per_message"] == 500


def test_spf_mechanisms_from_presets_and_overrides():
    from smtpgw.presets import spf_mechanisms

    hosts = [
        {"name": "m365", "spf_include": "spf.protection.outlook.com"},
        {"name": "lab", "spf_include": None},
        {"name": "own"},
    ]
    assert spf_mechanisms(hosts) == {"m365": "include:spf.protection.outlook.com"}
    assert spf_mechanisms(hosts, {"lab": "a:upstream1.lab.test", "m365": "include:x.test"}) == {
        "m365": "include:x.test",
        "lab": "a:upstream1.lab.test",
    }
