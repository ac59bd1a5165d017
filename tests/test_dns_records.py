"""The records function and the tenant files' dns fields (pure: no DNS server here)."""

from __future__ import annotations

import pytest

from smtpgw import dkim_keys
from smtpgw.dns_records import (
    DnsProblem,
    desired_records,
    export_lines,
    parse_register,
    register_strings,
    spf_lookups,
    tag_of,
    txt,
    zone_for,
)
from smtpgw.tenant_schema import validate_tenants

SELECTORS = ["smtpgw-rsa", "smtpgw-ed25519"]


@pytest.fixture(scope="module")
def keys() -> dict[tuple[str, str], str]:
    rsa = dkim_keys.load_private(dkim_keys.generate("rsa"), "rsa", "rsa")
    ed = dkim_keys.load_private(dkim_keys.generate("ed25519"), "ed25519", "ed")
    return {
        (domain, selector): dkim_keys.txt_value(key)
        for domain in ("acme.test", "mail.acme.test", "globex.test")
        for selector, key in zip(SELECTORS, (rsa, ed), strict=True)
    }


def tenant(name: str, domains: list[str], **fields) -> dict:
    result = validate_tenants({f"{name}.yml": {"domains": domains, **fields}})
    assert result.errors == []
    return result.tenants[0]


def texts(desired, name: str) -> list[str]:
    return [r.text for r in desired.records() if r.name.to_text() == name]


ACME = tenant("acme", ["acme.test", "mail.acme.test"])
GLOBEX = tenant("globex", ["globex.test"], relay={"via": "m365"})
SPF_M365 = {"m365": "include:spf.protection.outlook.com"}


def test_every_domain_gets_spf_dkim_dmarc_and_the_register(keys):
    desired = desired_records(
        [ACME, GLOBEX],
        ["192.0.2.25", "2001:db8::25", "198.51.100.0/28"],
        keys,
        SELECTORS,
        smarthost_spf=SPF_M365,
        zones=["acme.test"],
        ttl=600,
    )
    assert sorted(desired.zones) == ["acme.test", "globex.test"]
    assert desired.domains == {
        "acme.test": "acme.test",
        "mail.acme.test": "acme.test",
        "globex.test": "globex.test",
    }
    assert texts(desired, "acme.test.") == [
        "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 ip4:198.51.100.0/28 ~all"
    ]
    # A tenant through a smart host: its senders' mechanism too.
    assert texts(desired, "globex.test.") == [
        "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 ip4:198.51.100.0/28 "
        "include:spf.protection.outlook.com ~all"
    ]
    assert texts(desired, "_dmarc.mail.acme.test.") == ["v=DMARC1; p=none"]
    for selector in SELECTORS:
        name = f"{selector}._domainkey.acme.test."
        assert texts(desired, name) == [keys[("acme.test", selector)]]
    (register,) = [r for r in desired.records() if r.name.to_text() == "_smtpgw.acme.test."]
    assert register.rdata.strings == (
        b"smtpgw acme.test @ _dmarc smtpgw-ed25519._domainkey smtpgw-rsa._domainkey",
        b"smtpgw mail.acme.test @ _dmarc smtpgw-ed25519._domainkey smtpgw-rsa._domainkey",
    )
    assert {r.ttl for r in desired.records()} == {600}
    assert not desired.policies


def test_dkim_rsa_record_is_split_into_255_byte_strings(keys):
    desired = desired_records([ACME], ["192.0.2.25"], keys, SELECTORS)
    (record,) = [
        r for r in desired.records() if r.name.to_text() == "smtpgw-rsa._domainkey.acme.test."
    ]
    assert len(record.text) > 255
    assert [len(s) for s in record.rdata.strings] == [255, len(record.text) - 255]
    assert b"".join(record.rdata.strings).decode() == keys[("acme.test", "smtpgw-rsa")]


def test_dmarc_mta_sts_and_tls_rpt_from_the_tenant_file(keys):
    fields = {
        "dns": {
            "spf": ["include:_spf.google.com", "ip4:203.0.113.0/24"],
            "spf_all": "-all",
            "dmarc": {
                "policy": "quarantine",
                "reports": ["mailto:dmarc@acme.test", "x@globex.test"],
            },
            "mta_sts": {"mode": "enforce", "mx": ["mx1.acme.test", "*.mail.acme.test"]},
            "tls_reports": "tls@acme.test",
        }
    }
    desired = desired_records(
        [tenant("acme", ["acme.test"], **fields)], ["192.0.2.25"], keys, SELECTORS
    )
    assert texts(desired, "acme.test.") == [
        "v=spf1 ip4:192.0.2.25 include:_spf.google.com ip4:203.0.113.0/24 -all"
    ]
    assert texts(desired, "_dmarc.acme.test.") == [
        "v=DMARC1; p=quarantine; rua=mailto:dmarc@acme.test,mailto:x@globex.test"
    ]
    assert texts(desired, "_smtp._tls.acme.test.") == ["v=TLSRPTv1; rua=mailto:tls@acme.test"]
    policy = desired.policies["acme.test"]
    assert policy == (
        "version: STSv1\r\nmode: enforce\r\nmx: mx1.acme.test\r\nmx: *.mail.acme.test\r\n"
        "max_age: 604800\r\n"
    )
    (sts,) = texts(desired, "_mta-sts.acme.test.")
    assert sts.startswith("v=STSv1; id=")
    # The id follows the policy: another policy, another id.
    fields["dns"]["mta_sts"]["mode"] = "testing"
    other = desired_records(
        [tenant("acme", ["acme.test"], **fields)], ["192.0.2.25"], keys, SELECTORS
    )
    assert texts(other, "_mta-sts.acme.test.") != [sts]
    assert "_mta-sts _smtp._tls" in texts(other, "_smtpgw.acme.test.")[0]


def test_spf_over_ten_lookups_is_refused_with_the_reason(keys):
    many = tenant("acme", ["acme.test"], dns={"spf": [f"include:s{i}.test" for i in range(11)]})
    with pytest.raises(DnsProblem) as err:
        desired_records([many], ["192.0.2.25"], keys, SELECTORS)
    assert str(err.value) == (
        "tenant acme: dns.spf: the SPF record would need 11 DNS lookups, more than SPF's limit "
        "of 10 (every include:, a, mx, exists: costs one); list fewer, or ip4:/ip6: networks "
        "instead"
    )
    ten = tenant("acme", ["acme.test"], dns={"spf": [f"include:s{i}.test" for i in range(10)]})
    assert len(texts(desired_records([ten], ["192.0.2.25"], keys, SELECTORS), "acme.test.")) == 1


def test_spf_lookup_count():
    terms = [
        "ip4:192.0.2.1",
        "a",
        "mx:x.test",
        "include:y.test",
        "exists:%{i}.z.test",
        "-ptr",
        "a/24",
    ]
    assert spf_lookups(terms) == 6


def test_missing_inputs_are_named(keys):
    with pytest.raises(DnsProblem) as err:
        desired_records([GLOBEX], ["192.0.2.300"], {}, SELECTORS)
    message = str(err.value)
    assert "smtpgw_public_addresses: '192.0.2.300' is not an IP address" in message
    assert "routes through smart host 'm365', whose SPF mechanism is unknown" in message
    assert "smtpgw_dns_smarthost_spf" in message
    assert "globex.test: no DKIM key for selector smtpgw-rsa; run playbooks/dns.yml" in message
    with pytest.raises(DnsProblem, match="smtpgw_public_addresses: no relay has one"):
        desired_records([ACME], [], keys, SELECTORS)


def test_zone_for_takes_the_longest_zone():
    zones = ["test", "acme.test", "lab.test"]
    assert zone_for("mail.acme.test", zones) == "acme.test"
    assert zone_for("acme.test", zones) == "acme.test"
    assert zone_for("globex.test", zones) == "test"
    assert zone_for("globex.example", zones) == "globex.example"
    assert zone_for("notacme.test", ["acme.test"]) == "notacme.test"


def test_ownership_tags():
    assert tag_of("v=spf1 ip4:192.0.2.1 -all") == "spf"
    assert tag_of("v=spf1") == "spf"
    assert tag_of("v=DKIM1; k=rsa; p=x") == "dkim"
    assert tag_of("v=DMARC1; p=none") == "dmarc"
    assert tag_of("smtpgw acme.test @") == "register"
    for foreign in ("google-site-verification=x", "v=spf10", "v=DMARC1x", "smtpgwx"):
        assert tag_of(foreign) is None


def test_register_round_trip():
    found = parse_register(["smtpgw a.test @ _dmarc", "other text", "smtpgw b.test @"])
    assert found == {"a.test": {"@", "_dmarc"}, "b.test": {"@"}}
    names = [f"selector-{i:02d}-of-a-long-name._domainkey" for i in range(12)]
    strings = register_strings("a.test", names)
    assert len(strings) == 2 and max(len(s) for s in strings) <= 255
    assert parse_register(strings) == {"a.test": set(names)}


def test_the_register_holds_twenty_domains_a_record(keys):
    many = [tenant(f"t{i:02d}", [f"t{i:02d}.acme.test"]) for i in range(45)]
    shared = {
        (f"t{i:02d}.acme.test", s): keys[("acme.test", s)] for i in range(45) for s in SELECTORS
    }
    desired = desired_records(many, ["192.0.2.25"], shared, SELECTORS, zones=["acme.test"])
    register = [r for r in desired.records() if r.kind == "register"]
    assert [len(r.rdata.strings) for r in register] == [20, 20, 5]
    strings = [s.decode() for r in register for s in r.rdata.strings]
    assert len(parse_register(strings)) == 45


def test_export_is_zone_file_lines(keys):
    desired = desired_records([ACME], ["192.0.2.25"], keys, SELECTORS, ttl=300)
    lines = export_lines(desired)
    assert lines[0] == "; zone acme.test"
    assert 'acme.test.\t300\tIN\tTXT\t"v=spf1 ip4:192.0.2.25 ~all"' in lines
    rsa = next(line for line in lines if line.startswith("smtpgw-rsa._domainkey.acme.test."))
    assert rsa.count('" "') == 1  # two strings
    assert txt("x").to_text() == '"x"'


# --- The tenant files' dns fields -----------------------------------------------------------------


def errors(dns_field: object) -> list[str]:
    return validate_tenants({"acme.yml": {"domains": ["acme.test"], "dns": dns_field}}).errors


def test_dns_defaults_and_normalisation():
    (acme,) = validate_tenants({"acme.yml": {"domains": ["acme.test"], "dns": {}}}).tenants
    assert acme["dns"] == {
        "spf": [],
        "spf_all": "~all",
        "dmarc": {"policy": "none", "reports": []},
        "mta_sts": None,
        "tls_reports": [],
    }
    # Without a dns field the tenant is as before (the DNS code applies the same defaults).
    (plain,) = validate_tenants({"acme.yml": {"domains": ["acme.test"]}}).tenants
    assert "dns" not in plain


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (
            {"dmarc": {"reports": ["not-an-address"]}},
            "acme.yml: dns.dmarc.reports[0]: 'not-an-address' is not an e-mail address; write the "
            "address reports go to, e.g. dmarc-reports@acme.test",
        ),
        (
            {"dmarc": {"policy": "block"}},
            "acme.yml: dns.dmarc.policy: must be one of none, quarantine, reject, not 'block'; "
            "start with policy: none and tighten it once the reports look right",
        ),
        (
            {"spf": ["include:x.test", "-all"]},
            "acme.yml: dns.spf[1]: '-all' ends or replaces the record smtpgw writes; list only the "
            "other senders' mechanisms; set dns.spf_all for the ending",
        ),
        (
            {"spf": ["google.com"]},
            "acme.yml: dns.spf[0]: 'google.com' is not an SPF mechanism; write one of "
            "include:DOMAIN, a[:DOMAIN], mx[:DOMAIN], ip4:NET, ip6:NET, exists:DOMAIN",
        ),
        (
            {"spf_all": "+all"},
            "acme.yml: dns.spf_all: must be '~all' (soft fail) or '-all' (fail), not '+all'; "
            'write spf_all: "-all" once every sender of the domains is listed',
        ),
        (
            {"mta_sts": {"mode": "enforce"}},
            "acme.yml: dns.mta_sts.mx: is required: the policy lists the MX hosts that receive "
            "the domains' mail; add mx: [mx1.acme.test] (a name or *.suffix per MX)",
        ),
        (
            {"mta_sts": {"mode": "strict", "mx": ["mx.acme.test"]}},
            "acme.yml: dns.mta_sts.mode: must be one of testing, enforce, none, not 'strict'; "
            "start with mode: testing",
        ),
        (
            {"mta_sts": {"mx": ["mx.acme.test"], "max_age": 60}},
            "acme.yml: dns.mta_sts.max_age: must be a whole number of seconds from 86400 to "
            "31557600, not 60; write max_age: 604800 (a week)",
        ),
        (
            {"tls_reports": ["tls@"]},
            "acme.yml: dns.tls_reports[0]: 'tls@' is not an e-mail address; write the address "
            "reports go to, e.g. dmarc-reports@acme.test",
        ),
        ({"dmark": {}}, "acme.yml: dns: unknown field 'dmark'; did you mean 'dmarc'?"),
        (
            "none",
            "acme.yml: dns: must be a mapping, not a string; write it as "
            "dns: {dmarc: {policy: none}}",
        ),
    ],
)
def test_bad_dns_fields_name_file_field_and_fix(field, message):
    assert errors(field) == [message]


def test_dns_fields_must_be_literal():
    (message,) = errors({"dmarc": {"policy": "{{ policy }}"}})
    assert message.startswith("acme.yml: dns.dmarc.policy: must be one of")
