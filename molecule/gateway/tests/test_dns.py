"""DNS records as code, end to end: the records playbooks/dns.yml published to the lab DNS
server (converge) make relayed mail pass DKIM, SPF and DMARC as a receiver checks them,
resolving through dns1; `smtpgw dns` plans, applies, checks and repairs them, leaves records it
does not own alone, and names the server or zone when the key, the server or the zone is wrong.

The `smtpgw dns` runs use an inventory of the scenario's hosts with their addresses (lab_ip,
as `smtpgw lab up` writes them) beside the lab group_vars, the scenario's tenants and the
scenario's DKIM key store.
"""

from __future__ import annotations

import email
import email.utils
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dkim
import dns.query
import dns.resolver
import dns.tsigkeyring
import dns.update
import pytest
import spf
import yaml
from gwlab import ROOT, SCENARIO

from smtpgw.smtpclient import send

SENDERS = {
    "acme.test": ("scanner@acme.test", "lab-acme-scanner-pw"),
    "globex.test": ("billing@globex.test", "lab-globex-billing-pw"),  # through upstream1
}
TSIG = ("lab_dns_tsig", "hmac-sha256", "c210cGd3LWxhYi1vbmx5LWtleS1OT1QtYS1zZWNyZXQ=")


@pytest.fixture(scope="module")
def dns1(lab) -> str:
    return lab.hosts.ip("dns1")


@pytest.fixture(scope="module")
def lab_resolver(dns1):
    """A resolver that asks the lab DNS server only, as the lab's hosts resolve."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns1]
    resolver.lifetime = 5
    return resolver


def write_inventory(path: Path, lab, localhost_vars: dict | None = None) -> Path:
    hosts = {
        name: {"lab_ip": lab.hosts.ip(name), "ansible_host": lab.hosts.container(name)}
        for name in ("relay1", "dns1", "mx1", "upstream1")
    }
    store = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / "dkim"
    hosts["relay1"]["relay_dkim_keys_dir"] = str(store)
    groups = {
        "relays": {"hosts": {"relay1": hosts["relay1"]}},
        "lab_dns": {"hosts": {"dns1": hosts["dns1"]}},
        "lab_mx": {"hosts": {"mx1": hosts["mx1"]}},
        "lab_upstream": {"hosts": {"upstream1": hosts["upstream1"]}},
    }
    inventory = {"all": {"children": {"lab": {"children": groups}}}}
    if localhost_vars:
        inventory["all"]["hosts"] = {"localhost": localhost_vars}
    path.mkdir(parents=True, exist_ok=True)
    (path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (path / "group_vars").symlink_to(ROOT / "inventories" / "lab" / "group_vars")
    return path


@pytest.fixture
def inventory(tmp_path, lab) -> Path:
    return write_inventory(tmp_path / "inventory", lab)


def smtpgw_dns(command: str, inventory: Path, *extra: str, tenants: Path | None = None):
    env = dict(os.environ, SMTPGW_TENANTS_DIR=str(tenants or SCENARIO / "tenants"))
    return subprocess.run(
        [sys.executable, "-m", "smtpgw.cli", "dns", command, str(inventory), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def hand_update(dns1: str, zone: str, *changes: tuple[str, str, str, str]) -> None:
    """Someone else's change, signed with the lab key: (op, name, type, value) each."""
    keyring = dns.tsigkeyring.from_text({TSIG[0]: (TSIG[1], TSIG[2])})
    update = dns.update.UpdateMessage(zone, keyring=keyring, keyalgorithm=TSIG[1])
    for op, name, rdtype, value in changes:
        if op == "replace":
            update.replace(name, 300, rdtype, value)
        elif op == "add":
            update.add(name, 300, rdtype, value)
        else:
            update.delete(name, rdtype)
    assert dns.query.tcp(update, dns1, timeout=5).rcode() == 0


# --- Mail passes DKIM, SPF and DMARC against the published records ------------------------------


def headers_of(message: str) -> email.message.Message:
    return email.message_from_string(message.replace("\r\n", "\n"))


def last_hop_ip(message: str) -> str:
    """The address mx1 got the message from (its own Received header, the first)."""
    first = headers_of(message).get_all("Received")[0]
    return re.search(r"\[([0-9.]+)\]\)", " ".join(first.split())).group(1)


def dmarc_policy(resolver, domain: str) -> str:
    texts = [b"".join(r.strings).decode() for r in resolver.resolve(f"_dmarc.{domain}", "TXT")]
    (record,) = [t for t in texts if t.startswith("v=DMARC1")]
    return record


@pytest.mark.parametrize("domain", sorted(SENDERS))
def test_mail_passes_dkim_spf_and_dmarc_through_lab_dns(lab, lab_resolver, domain):
    login, password = SENDERS[domain]
    token = send(lab.submission(login, password), login, "dns@dest.test")
    message = lab.find_mail(token)
    raw = message.replace("\r\n", "\n").replace("\n", "\r\n").encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = lab_resolver.resolve(name.decode(), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    signatures = [
        dkim.util.parse_tag_value(v)
        for n, v in dkim.rfc822_parse(raw)[0]
        if n.lower() == b"dkim-signature"
    ]
    assert sorted(s[b"a"] for s in signatures) == [b"ed25519-sha256", b"rsa-sha256"]
    checker = dkim.DKIM(raw)
    for index, sig in enumerate(signatures):
        assert checker.verify(idx=index, dnsfunc=dnsfunc), f"{sig[b'a']} of {domain} fails"
        assert sig[b"d"].decode() == domain  # aligned with the From domain

    ip = last_hop_ip(message)
    previous = dns.resolver.default_resolver
    dns.resolver.default_resolver = lab_resolver  # pyspf resolves through dnspython's default
    try:
        result, explanation = spf.check2(i=ip, s=login, h="relay1.lab.test")
    finally:
        dns.resolver.default_resolver = previous
    assert result == "pass", f"SPF for {login} from {ip}: {result} ({explanation})"

    header_from = email.utils.parseaddr(headers_of(message)["From"])[1].split("@")[1]
    return_path = email.utils.parseaddr(headers_of(message)["Return-Path"])[1].split("@")[1]
    assert header_from == return_path == domain  # SPF aligned too
    assert dmarc_policy(lab_resolver, domain).startswith("v=DMARC1; p=")


def test_a_message_of_an_unlisted_address_fails_spf(lab_resolver):
    """The SPF check above can fail: an address the record does not name is not a pass."""
    previous = dns.resolver.default_resolver
    dns.resolver.default_resolver = lab_resolver
    try:
        result, _ = spf.check2(i="192.0.2.99", s="scanner@acme.test", h="x.example")
    finally:
        dns.resolver.default_resolver = previous
    assert result == "softfail"


# --- plan / apply / check ------------------------------------------------------------------------


def test_converge_published_everything_and_a_second_apply_sends_nothing(inventory):
    plan = smtpgw_dns("plan", inventory)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert plan.stdout.startswith("no changes")
    apply = smtpgw_dns("apply", inventory)
    assert apply.returncode == 0, apply.stderr
    assert "no update sent" in apply.stdout
    # One query per owned name: per tenant domain SPF, DMARC and two DKIM, and each lab zone's
    # register.
    domains = [
        d
        for f in sorted((SCENARIO / "tenants").glob("*.yml"))
        for d in yaml.safe_load(f.read_text())["domains"]
    ]
    zones = yaml.safe_load((ROOT / "inventories/lab/group_vars/all/lab.yml").read_text())
    assert f"; {4 * len(domains) + len(zones['lab_dns_zones'])} queries" in apply.stdout
    check = smtpgw_dns("check", inventory, "--json")
    assert check.returncode == 0, check.stdout
    findings = json.loads(check.stdout)
    assert {f["status"] for f in findings} == {"ok"}
    assert {f["kind"] for f in findings} == {"spf", "dkim", "dmarc"}


def test_a_hand_changed_record_is_wrong_then_planned_then_repaired(inventory, dns1):
    hand_update(dns1, "acme.test", ("replace", "_dmarc.acme.test.", "TXT", '"v=DMARC1; p=reject"'))
    check = smtpgw_dns("check", inventory, "--json")
    assert check.returncode == 2
    wrong = [f for f in json.loads(check.stdout) if f["status"] != "ok"]
    assert {(f["name"], f["status"]) for f in wrong} == {("_dmarc.acme.test.", "wrong")}
    assert wrong[0]["seen"] == ["v=DMARC1; p=reject"]
    assert wrong[0]["expected"] == "v=DMARC1; p=none"

    plan = smtpgw_dns("plan", inventory)
    assert plan.returncode == 2
    assert '~ _dmarc.acme.test. TXT\n      - "v=DMARC1; p=reject"\n      + "v=DMARC1; p=none"' in (
        plan.stdout
    )
    apply = smtpgw_dns("apply", inventory)
    assert apply.returncode == 0, apply.stderr
    assert "applied: 1 update(s)" in apply.stdout
    assert smtpgw_dns("check", inventory).returncode == 0


def test_records_smtpgw_does_not_own_are_untouched(inventory, dns1, lab_resolver, tenants_copy):
    """A foreign TXT at the apex and a CNAME where smtpgw would publish TLS-RPT: plan and apply
    leave both, and say so for the CNAME."""
    hand_update(
        dns1,
        "acme.test",
        ("add", "acme.test.", "TXT", '"site-verification=abc123"'),
        ("add", "_smtp._tls.acme.test.", "CNAME", "tlsrpt.provider.test."),
    )
    acme = yaml.safe_load((tenants_copy / "acme.yml").read_text())
    acme["dns"] = {"tls_reports": ["tls-reports@acme.test"]}
    (tenants_copy / "acme.yml").write_text(yaml.safe_dump(acme))
    try:
        for command in ("plan", "apply", "plan"):
            run = smtpgw_dns(command, inventory, tenants=tenants_copy)
            assert run.returncode in (0, 2), run.stderr
            assert "! _smtp._tls.acme.test.: a CNAME to tlsrpt.provider.test. that smtpgw did" in (
                run.stdout
            )
        apex = [b"".join(r.strings).decode() for r in lab_resolver.resolve("acme.test", "TXT")]
        assert "site-verification=abc123" in apex
        assert [t for t in apex if t.startswith("v=spf1 ")], apex
        cname = lab_resolver.resolve("_smtp._tls.acme.test", "CNAME")
        assert cname[0].target.to_text() == "tlsrpt.provider.test."
    finally:
        hand_update(
            dns1,
            "acme.test",
            ("delete", "_smtp._tls.acme.test.", "CNAME", ""),
        )
    # Back to the scenario's tenants: the register forgets _smtp._tls, the foreign TXT stays.
    assert smtpgw_dns("apply", inventory).returncode == 0
    assert smtpgw_dns("plan", inventory).returncode == 0
    apex = [b"".join(r.strings).decode() for r in lab_resolver.resolve("acme.test", "TXT")]
    assert "site-verification=abc123" in apex


# --- Faults ---------------------------------------------------------------------------------------


def test_wrong_tsig_key_names_the_server_and_the_key(tmp_path, lab, dns1):
    wrong = {"name": "lab_dns_tsig", "algorithm": "hmac-sha256", "secret": "d3Jvbmcta2V5"}
    inventory = write_inventory(tmp_path / "inv", lab, {"smtpgw_dns_tsig": wrong})
    right = write_inventory(tmp_path / "right", lab)
    assert smtpgw_dns("apply", right).returncode == 0  # only the change below is pending
    hand_update(dns1, "globex.test", ("replace", "_dmarc.globex.test.", "TXT", '"v=DMARC1; p=x"'))
    run = smtpgw_dns("apply", inventory)
    assert run.returncode == 1
    assert f"DNS server {dns1}: the update of zone globex.test was refused" in run.stderr
    assert "signature is wrong" in run.stderr and "smtpgw_dns_tsig" in run.stderr
    # Nothing half-applied: the next run with the right key repairs it.
    assert smtpgw_dns("apply", right).returncode == 0
    assert smtpgw_dns("plan", right).returncode == 0


def test_unreachable_server_is_named(tmp_path, lab, dns1):
    unused = dns1.rsplit(".", 1)[0] + ".250"
    inventory = write_inventory(tmp_path / "inv", lab, {"smtpgw_dns_server": unused})
    run = smtpgw_dns("plan", inventory)
    assert run.returncode == 1
    assert f"DNS server {unused}: cannot connect over TCP" in run.stderr


def test_a_zone_the_server_does_not_serve_is_named(tmp_path, lab, dns1):
    inventory = write_inventory(tmp_path / "inv", lab, {"smtpgw_dns_zones": ["test"]})
    run = smtpgw_dns("plan", inventory)
    assert run.returncode == 1
    assert f"DNS server {dns1}: is not authoritative for zone test " in run.stderr
