"""Every tenant-derived file of the relay, from one function."""

from __future__ import annotations

from smtpgw.relay_files import relay_files

ACME = {
    "name": "acme",
    "domains": ["acme.test", "mail.acme.test"],
    "users": [
        {"login": "a@acme.test", "password_hash": "{SHA512-CRYPT}$6$x"},
        {"login": "b@acme.test", "password_hash": "{SHA512-CRYPT}$6$y"},
    ],
    "networks": ["192.0.2.0/28"],
    "relay": {},
}
GLOBEX = {"name": "globex", "domains": ["globex.test"], "users": [], "relay": {}}
SMART = [{"name": "m365", "host": "smtp.test", "username": "u", "password": "p"}]


def by_name(files):
    return {f["name"]: f for f in files}


def test_every_file_once_with_its_owner_mode_and_service():
    files = by_name(relay_files([GLOBEX, ACME], SMART))
    assert sorted(files) == [
        "/etc/dovecot/smtpgw-users",
        "/etc/postfix/smtpgw/networks.cidr",
        "/etc/postfix/smtpgw/sasl_passwd",
        "/etc/postfix/smtpgw/sender_logins",
        "/etc/postfix/smtpgw/sender_transport",
        "/etc/postfix/smtpgw/tls_policy",
        "/etc/rspamd/local.d/dkim_signing.conf",
        "/etc/rspamd/smtpgw/domains.map",
        "/etc/rspamd/smtpgw/limits.map",
        "/etc/rspamd/smtpgw/logins.map",
        "/etc/rspamd/smtpgw/networks.map",
        "/etc/smtpgw/limits.json",
    ]
    secret = {n for n, f in files.items() if f["secret"]}
    assert secret == {"/etc/dovecot/smtpgw-users", "/etc/postfix/smtpgw/sasl_passwd"}
    assert files["/etc/postfix/smtpgw/sasl_passwd"]["mode"] == "0600"
    assert files["/etc/dovecot/smtpgw-users"]["group"] == "dovecot"
    assert {n for n, f in files.items() if f["postmap"]} == {
        "/etc/postfix/smtpgw/sender_logins",
        "/etc/postfix/smtpgw/sender_transport",
        "/etc/postfix/smtpgw/tls_policy",
        "/etc/postfix/smtpgw/sasl_passwd",
    }
    assert {n for n, f in files.items() if f["notify"] == "rspamd"} == {
        n for n in files if n.startswith("/etc/rspamd/")
    }
    assert [n for n, f in files.items() if f["notify"] == "postfix"] == [
        "/etc/postfix/smtpgw/networks.cidr"
    ]
    assert [n for n, f in files.items() if f["check"]] == ["/etc/rspamd/local.d/dkim_signing.conf"]


def test_rspamd_maps():
    files = by_name(relay_files([GLOBEX, ACME], []))
    assert files["/etc/rspamd/smtpgw/logins.map"]["lines"] == [
        "a@acme.test acme",
        "b@acme.test acme",
    ]
    assert files["/etc/rspamd/smtpgw/networks.map"]["lines"] == ["192.0.2.0/28 acme"]
    assert files["/etc/rspamd/smtpgw/domains.map"]["lines"] == [
        "acme acme.test,mail.acme.test",
        "globex globex.test",
    ]
    assert files["/etc/dovecot/smtpgw-users"]["lines"] == [
        "a@acme.test:{SHA512-CRYPT}$6$x",
        "b@acme.test:{SHA512-CRYPT}$6$y",
    ]


def test_rspamd_limits_map_has_every_counter_with_a_message_limit():
    acme = {
        **ACME,
        "limits": {
            "messages_per_day": 100,
            "messages_per_hour": None,
            "recipients_per_message": 50,
            "logins": {"B@acme.test": {"messages_per_hour": 5}, "a@acme.test": {}},
        },
    }
    acme["users"] = [*ACME["users"], {"login": "B@acme.test", "password_hash": "x"}]
    only_recipients = {**GLOBEX, "limits": {"recipients_per_message": 3}}
    files = by_name(relay_files([only_recipients, acme], []))
    # The keys name the policy service's counters (logins lower-cased); day,hour with 0 for none;
    # a tenant (or login) without a message limit is never counted, so it has no line.
    assert files["/etc/rspamd/smtpgw/limits.map"]["lines"] == [
        "tenant:acme 100,0",
        "login:b@acme.test 0,5",
    ]


def test_signing_table_has_both_keys_of_every_domain():
    files = relay_files(
        [ACME, GLOBEX], [], selectors={"rsa": "r", "ed25519": "e"}, paths={"dkim_keys": "/k"}
    )
    text = "\n".join(by_name(files)["/etc/rspamd/local.d/dkim_signing.conf"]["lines"])
    for domain in ("acme.test", "mail.acme.test", "globex.test"):
        assert f'"{domain}" {{' in text
        assert f'path = "/k/{domain}.r.key"; selector = "r";' in text
        assert f'path = "/k/{domain}.e.key"; selector = "e";' in text
    assert 'sign_networks = "/etc/rspamd/smtpgw/networks.map";' in text
    assert "sign_inbound = false;" in text and "sign_local = false;" in text


def test_no_tenants_no_entries():
    files = relay_files([], [])
    for f in files:
        if f["name"].endswith(".map") or f["name"].endswith("smtpgw-users"):
            assert f["lines"] == []
