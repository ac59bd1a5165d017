"""Plan, apply and check against a real BIND: the lab's dns1 (role lab_dns), in a lab of this
test's own (smtpgw-unit-dns, 10.89.87.0/24), started once for the module and removed after."""

from __future__ import annotations

import shutil
from pathlib import Path

import dns.query
import dns.resolver
import dns.tsigkeyring
import dns.update
import pytest

from smtpgw import dkim_keys
from smtpgw.dns_publish import DnsError, Server, TsigKey, apply, check, plan
from smtpgw.dns_records import desired_records
from smtpgw.lab import DEFAULT_IMAGE, Lab, run_playbook
from smtpgw.tenant_schema import validate_tenants

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[1]
LAB_NAME = "smtpgw-unit-dns"
LAB_SUBNET = "10.89.87.0/24"
KEY = TsigKey("lab_dns_tsig", "hmac-sha256", "c210cGd3LWxhYi1vbmx5LWtleS1OT1QtYS1zZWNyZXQ=")
SELECTORS = ["smtpgw-rsa", "smtpgw-ed25519"]
ZONES = ["lab.test", "dest.test", "acme.test", "globex.test"]
# The lab's DNS server alone (the role of playbooks/lab.yml, without the CA and the other hosts).
DNS_SERVER_PLAY = """\
- name: The lab DNS server
  hosts: lab_dns
  roles:
    - role: lab_dns
"""


@pytest.fixture(scope="module")
def dns1(tmp_path_factory):
    lab = Lab(LAB_NAME, LAB_SUBNET, ROOT)
    if lab.podman.inspect("image", DEFAULT_IMAGE) is None:
        pytest.skip("the lab image is missing (make setup builds it)")
    try:
        lab.up(["dns1"])
        inventory = lab.inventory_path().parent
        link = inventory / "group_vars"
        if not link.is_symlink():
            link.symlink_to(ROOT / "inventories" / "lab" / "group_vars")
        playbook = tmp_path_factory.mktemp("play") / "dns1.yml"
        playbook.write_text(DNS_SERVER_PLAY)
        run = run_playbook(playbook, lab.inventory_path(), env={"SMTPGW_ROOT": str(ROOT)})
        assert run.rc == 0, run.output[-3000:]
        yield lab.planned_ip("dns1")
    finally:
        lab.down()
        shutil.rmtree(ROOT / ".lab" / LAB_NAME, ignore_errors=True)  # its inventory directory


@pytest.fixture(scope="module")
def keys() -> dict[tuple[str, str], str]:
    found = {}
    for domain in ("acme.test", "globex.test"):
        for selector, algorithm in zip(SELECTORS, ("rsa", "ed25519"), strict=True):
            pem = dkim_keys.generate(algorithm)
            key = dkim_keys.load_private(pem, algorithm, selector)
            found[(domain, selector)] = dkim_keys.txt_value(key)
    return found


def tenants(*files: tuple[str, dict]) -> list[dict]:
    result = validate_tenants({f"{name}.yml": data for name, data in files})
    assert result.errors == []
    return result.tenants


ACME = ("acme", {"domains": ["acme.test"]})
GLOBEX = ("globex", {"domains": ["globex.test"], "dns": {"dmarc": {"policy": "reject"}}})


def desired(keys, *files, addresses=("192.0.2.25",)):
    return desired_records(tenants(*files), list(addresses), keys, SELECTORS, zones=ZONES, ttl=300)


def by_hand(dns1: str, zone: str, *changes) -> None:
    update = dns.update.UpdateMessage(zone, keyring=KEY.keyring(), keyalgorithm=KEY.algorithm)
    for op, name, rdtype, value in changes:
        getattr(update, op)(name, *((300, rdtype, value) if op != "delete" else (rdtype,)))
    assert dns.query.tcp(update, dns1, timeout=5).rcode() == 0


def txts(dns1: str, name: str) -> list[str]:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns1]
    try:
        return sorted(b"".join(r.strings).decode() for r in resolver.resolve(name, "TXT"))
    except dns.resolver.NXDOMAIN:
        return []
    except dns.resolver.NoAnswer:
        return []


def test_apply_publishes_one_update_per_zone_and_a_rerun_sends_nothing(dns1, keys):
    want = desired(keys, ACME, GLOBEX)
    server = Server(dns1)
    first = plan(want, server)
    assert {c.action for c in first.changes} == {"add"}
    assert first.zones == ["acme.test", "globex.test"]
    applied = apply(first, server, KEY)
    assert applied.updates == 2 and server.updates == 2
    assert txts(dns1, "_dmarc.globex.test") == ["v=DMARC1; p=reject"]
    assert txts(dns1, "acme.test") == ["v=spf1 ip4:192.0.2.25 ~all"]

    again = plan(want, server)
    assert again.changes == [] and again.conflicts == []
    # One query per owned name: four per domain, one register per zone.
    assert again.queries == 2 * 4 + len(ZONES)
    assert apply(again, server, KEY).updates == 0
    assert server.updates == 2
    assert {f.status for f in check(want, server)} == {"ok"}
    server.close()


def test_a_change_made_after_the_plan_fails_the_whole_zone(dns1, keys):
    server = Server(dns1)
    apply(plan(desired(keys, ACME, GLOBEX), server), server, KEY)
    want = desired(keys, ACME, GLOBEX, addresses=("192.0.2.26",))  # both SPF records change
    stale = plan(want, server)
    assert {c.name for c in stale.changes} == {"acme.test.", "globex.test."}
    by_hand(dns1, "acme.test", ("replace", "acme.test.", "TXT", '"v=spf1 -all"'))
    with pytest.raises(DnsError) as err:
        apply(stale, server, KEY)
    assert str(err.value) == (
        f"DNS server {dns1}: the update of zone acme.test was refused (NXRRSET): records there "
        "changed since the plan; nothing of that zone was applied: run plan and apply again"
    )
    assert txts(dns1, "acme.test") == ["v=spf1 -all"]  # the other's change stands
    fresh = plan(want, server)
    apply(fresh, server, KEY)
    assert txts(dns1, "acme.test") == ["v=spf1 ip4:192.0.2.26 ~all"]
    assert txts(dns1, "globex.test") == ["v=spf1 ip4:192.0.2.26 ~all"]
    server.close()


def test_records_of_a_removed_tenant_go_and_others_records_stay(dns1, keys):
    server = Server(dns1)
    apply(plan(desired(keys, ACME, GLOBEX), server), server, KEY)
    by_hand(dns1, "globex.test", ("add", "globex.test.", "TXT", '"site-verification=1"'))
    by_hand(dns1, "globex.test", ("add", "_dmarc.globex.test.", "TXT", '"not dmarc"'))
    gone = plan(desired(keys, ACME), server)
    assert {(c.name, c.action) for c in gone.changes} == {
        ("globex.test.", "remove"),
        ("_dmarc.globex.test.", "remove"),
        ("smtpgw-rsa._domainkey.globex.test.", "remove"),
        ("smtpgw-ed25519._domainkey.globex.test.", "remove"),
        ("_smtpgw.globex.test.", "remove"),
    }
    apply(gone, server, KEY)
    assert txts(dns1, "globex.test") == ["site-verification=1"]
    assert txts(dns1, "_dmarc.globex.test") == ["not dmarc"]
    assert txts(dns1, "smtpgw-rsa._domainkey.globex.test") == []
    assert plan(desired(keys, ACME), server).changes == []
    server.close()


def test_a_cname_someone_made_is_left_alone(dns1, keys):
    server = Server(dns1)
    by_hand(dns1, "acme.test", ("delete", "_dmarc.acme.test.", "TXT", None))
    by_hand(dns1, "acme.test", ("add", "_dmarc.acme.test.", "CNAME", "dmarc.provider.test."))
    try:
        result = plan(desired(keys, ACME), server)
        assert [(c.name, c.reason) for c in result.conflicts] == [
            ("_dmarc.acme.test.", "a CNAME to dmarc.provider.test. that smtpgw did not make")
        ]
        assert "_dmarc.acme.test." not in {c.name for c in result.changes}
        apply(result, server, KEY)
        (finding,) = [f for f in check(desired(keys, ACME), server) if f.kind == "dmarc"]
        assert finding.status == "missing"
    finally:
        by_hand(dns1, "acme.test", ("delete", "_dmarc.acme.test.", "CNAME", None))
    apply(plan(desired(keys, ACME), server), server, KEY)
    server.close()


def test_check_reports_ok_missing_and_wrong(dns1, keys):
    server = Server(dns1)
    want = desired(keys, ACME, GLOBEX)
    apply(plan(want, server), server, KEY)
    by_hand(dns1, "acme.test", ("replace", "_dmarc.acme.test.", "TXT", '"v=DMARC1; p=reject"'))
    by_hand(dns1, "globex.test", ("delete", "smtpgw-rsa._domainkey.globex.test.", "TXT", None))
    found = {
        (f.name, f.server, f.status, tuple(f.seen))
        for f in check(want, server, resolver=dns1)
        if f.status != "ok"
    }
    assert found == {
        ("_dmarc.acme.test.", dns1, "wrong", ("v=DMARC1; p=reject",)),
        ("_dmarc.acme.test.", f"{dns1} (resolver)", "wrong", ("v=DMARC1; p=reject",)),
        ("smtpgw-rsa._domainkey.globex.test.", dns1, "missing", ()),
        ("smtpgw-rsa._domainkey.globex.test.", f"{dns1} (resolver)", "missing", ()),
    }
    apply(plan(want, server), server, KEY)
    assert {f.status for f in check(want, server)} == {"ok"}
    server.close()


def test_wrong_key_unreachable_server_and_unserved_zone_are_named(dns1, keys):
    server = Server(dns1)
    want = desired(keys, ACME)
    by_hand(dns1, "acme.test", ("replace", "_dmarc.acme.test.", "TXT", '"v=DMARC1; p=x"'))
    pending = plan(want, server)
    for key, reason in (
        (TsigKey("lab_dns_tsig", "hmac-sha256", "d3Jvbmc="), "says the signature is wrong"),
        (TsigKey("nobody", "hmac-sha256", "d3Jvbmc="), "does not know the key"),
    ):
        with pytest.raises(DnsError) as err:
            apply(pending, server, key)
        assert str(err.value).startswith(
            f"DNS server {dns1}: the update of zone acme.test was refused: the server {reason}"
        )
    assert txts(dns1, "_dmarc.acme.test") == ["v=DMARC1; p=x"]  # nothing applied
    apply(plan(want, server), server, KEY)  # the next run repairs it
    assert txts(dns1, "_dmarc.acme.test") == ["v=DMARC1; p=none"]

    unused = dns1.rsplit(".", 1)[0] + ".250"
    with pytest.raises(DnsError, match=f"DNS server {unused}: cannot connect over TCP"):
        plan(want, Server(unused, timeout=2))
    other = desired_records(tenants(ACME), ["192.0.2.25"], keys, SELECTORS, zones=["test"])
    with pytest.raises(DnsError, match=f"DNS server {dns1}: is not authoritative for zone test "):
        plan(other, server)
    server.close()


def test_a_zone_too_large_for_one_message_goes_in_several(dns1, keys):
    """150 domains in one zone (~120 KB of records, more than one DNS message holds): several
    updates, all published; then removed again in parts."""
    many = [(f"t{i:03d}", {"domains": [f"t{i:03d}.acme.test"]}) for i in range(150)]
    shared = {
        (f"t{i:03d}.acme.test", selector): keys[("acme.test", selector)]
        for i in range(150)
        for selector in SELECTORS
    }
    server = Server(dns1)
    want = desired_records(
        tenants(ACME, *many), ["192.0.2.25"], {**keys, **shared}, SELECTORS, zones=ZONES, ttl=300
    )
    applied = apply(plan(want, server), server, KEY)
    assert applied.zones == ["acme.test"] and applied.updates > 1
    assert plan(want, server).changes == []
    assert txts(dns1, "smtpgw-rsa._domainkey.t149.acme.test") == [keys[("acme.test", SELECTORS[0])]]
    gone = plan(desired(keys, ACME), server)
    assert len(gone.changes) == 150 * 4 + 1  # every name of the 150, and the register
    assert apply(gone, server, KEY).updates > 1
    assert txts(dns1, "t000.acme.test") == []
    server.close()
