"""SPF's lookup limit counts the lookups inside each include: when a resolver can be asked
(smtpgw.dns_records.include_lookups; the resolver stands here as a table of TXT records)."""

from __future__ import annotations

import pytest

from smtpgw import dkim_keys
from smtpgw.dns_records import DnsProblem, desired_records, include_lookups
from smtpgw.tenant_schema import validate_tenants

SELECTORS = ["smtpgw-rsa", "smtpgw-ed25519"]
ZONE = {
    "spf.provider.test": ["v=spf1 include:a.provider.test include:b.provider.test -all"],
    "a.provider.test": ["v=spf1 ip4:192.0.2.0/24 a mx -all", "other text"],
    "b.provider.test": ["v=spf1 redirect=c.provider.test"],
    "c.provider.test": ["v=spf1 exists:%{i}.x.test include:spf.provider.test"],  # a loop back
    "flat.test": ["v=spf1 ip4:198.51.100.0/24 -all"],
    "two.test": ["v=spf1 a -all", "v=spf1 mx -all"],  # two records: a permerror, nothing counted
}


def fetch(name: str) -> list[str]:
    return ZONE.get(name, [])


def test_lookups_inside_an_include_are_counted_recursively_and_a_loop_once():
    # spf.provider.test: 2 includes; a: a, mx; b: redirect; c: exists, include (back: not again)
    assert include_lookups("spf.provider.test", fetch) == 2 + 2 + 1 + 2
    assert include_lookups("flat.test", fetch) == 0
    assert include_lookups("two.test", fetch) == 0
    assert include_lookups("missing.test", fetch) == 0


@pytest.fixture(scope="module")
def keys() -> dict[tuple[str, str], str]:
    rsa = dkim_keys.load_private(dkim_keys.generate("rsa"), "rsa", "rsa")
    ed = dkim_keys.load_private(dkim_keys.generate("ed25519"), "ed25519", "ed")
    return {("acme.test", "smtpgw-rsa"): dkim_keys.txt_value(rsa)} | {
        ("acme.test", "smtpgw-ed25519"): dkim_keys.txt_value(ed)
    }


def acme(spf: list[str]) -> dict:
    result = validate_tenants({"acme.yml": {"domains": ["acme.test"], "dns": {"spf": spf}}})
    assert result.errors == []
    return result.tenants[0]


def test_a_record_over_the_limit_only_through_its_includes_is_refused_naming_them(keys):
    tenant = acme(["include:spf.provider.test", "a", "mx", "a:x.test"])  # 4 own, 7 inside
    # Without a resolver only the record's own terms count: it passes.
    desired_records([tenant], ["192.0.2.25"], keys, SELECTORS)
    with pytest.raises(DnsProblem) as raised:
        desired_records([tenant], ["192.0.2.25"], keys, SELECTORS, spf_fetch=fetch)
    message = str(raised.value)
    assert "tenant acme: dns.spf: the SPF record would need 11 DNS lookups" in message
    assert "include:spf.provider.test costs 7 more inside" in message


def test_includes_within_the_limit_pass(keys):
    tenant = acme(["include:spf.provider.test", "include:flat.test"])
    desired = desired_records([tenant], ["192.0.2.25"], keys, SELECTORS, spf_fetch=fetch)
    assert desired.domains == {"acme.test": "acme.test"}
