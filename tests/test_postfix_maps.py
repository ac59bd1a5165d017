"""The relay's lookup tables, computed from tenants and smart hosts."""

from __future__ import annotations

import pytest

from smtpgw.postfix_maps import RouteError, default_transport, postfix_maps

SMART = [
    {"name": "m365", "host": "smtp.office365.test", "port": 587, "username": "u", "password": "p"},
    {"name": "ses465", "host": "ses.test", "port": 465, "tls_verify": False},
]
ACME = {
    "name": "acme",
    "domains": ["acme.test", "mail.acme.test"],
    "users": [{"login": "a@acme.test"}, {"login": "b@acme.test"}],
    "networks": ["192.0.2.0/28"],
    "relay": {},
}
GLOBEX = {"name": "globex", "domains": ["globex.test"], "users": [], "relay": {"via": "m365"}}


def test_sender_logins_list_every_login_per_domain():
    maps = postfix_maps([ACME], [])
    assert maps["sender_logins"] == [
        "@acme.test a@acme.test,b@acme.test",
        "@mail.acme.test a@acme.test,b@acme.test",
    ]
    assert maps["networks"] == ["192.0.2.0/28 OK"]


def test_tenant_without_logins_owns_no_sender_entry():
    assert postfix_maps([GLOBEX], SMART)["sender_logins"] == []


def test_tenant_via_smarthost_gets_transport_and_credentials():
    maps = postfix_maps([ACME, GLOBEX], SMART)
    assert maps["sender_transport"] == ["@globex.test smtp:[smtp.office365.test]:587"]
    assert "@globex.test u:p" in maps["sasl_passwd"]
    assert "[smtp.office365.test]:587 u:p" in maps["sasl_passwd"]
    assert not any(line.startswith("@acme.test") for line in maps["sasl_passwd"])


def test_direct_tenant_under_smarthost_default_route():
    direct = {**ACME, "relay": {"via": "direct"}}
    maps = postfix_maps([direct, GLOBEX], SMART, route="m365")
    assert "@acme.test smtp:" in maps["sender_transport"]
    # A tenant that names no route follows the relay's: no entry of its own.
    assert postfix_maps([ACME], SMART, route="m365")["sender_transport"] == []
    assert not any(line.startswith("@globex.test") for line in maps["sender_transport"])
    assert default_transport("m365", SMART) == "smtp:[smtp.office365.test]:587"
    assert default_transport("direct", SMART) == "smtp:"


def test_port_465_uses_wrappermode_transport_and_tls_policy():
    tenant = {**GLOBEX, "relay": {"via": "ses465"}}
    maps = postfix_maps([tenant], SMART)
    assert maps["sender_transport"] == ["@globex.test smtps:[ses.test]:465"]
    assert maps["tls_policy"] == [
        "[ses.test]:465 encrypt",
        "[smtp.office365.test]:587 secure match=hostname",
    ]


def test_unknown_smarthost_is_named():
    with pytest.raises(RouteError, match=r"tenant acme: relay\.via: smart host 'nope'"):
        postfix_maps([{**ACME, "relay": {"via": "nope"}}], SMART)
    with pytest.raises(RouteError, match="relay_route"):
        default_transport("nope", SMART)
