"""`smtpgw doctor` against the cluster scenario: with no fault every layer passes; for each fault
made in the lab it names the layer that fails and what to do, and the lab is put back after each.

Doctor runs as a user runs it, `smtpgw doctor INVENTORY --login app@routed.test --json`, over an
inventory of the scenario's hosts with their addresses (lab_ip) and the podman connection,
beside the lab group_vars, the scenario's tenants (tenant `routed` goes through upstream1) and
the scenario's DKIM key store. Each fault is one small change and one doctor run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import dns.query
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.tsigkeyring
import dns.update
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smtpgw import lab as smtpgw_lab
from smtpgw.smtpclient import Submission, send

SCENARIO = Path(__file__).resolve().parents[1]
ROOT = SCENARIO.parents[1]
LAB = smtpgw_lab.Lab(os.environ.get("SMTPGW_MOLECULE_LAB", "smtpgw-cl"), root=ROOT)
PKI = ROOT / ".lab" / "pki"
TSIG = ("lab_dns_tsig", "hmac-sha256", "c210cGd3LWxhYi1vbmx5LWtleS1OT1QtYS1zZWNyZXQ=")
HOSTS = ("dns1", "redis1", "relay1", "relay2", "mx1", "upstream1")
GROUPS = {
    "relays": ("relay1", "relay2"),
    "lab_dns": ("dns1",),
    "lab_mx": ("mx1",),
    "lab_upstream": ("upstream1",),
    "redis": ("redis1",),
}
LOGIN = "app@routed.test"
PASSWORD = "lab-acme-app-password"
RELAY_PEM = "/etc/postfix/smtpgw/tls/relay.pem"
UPSTREAM_USERS = "/etc/dovecot/lab_upstream.passwd"


@pytest.fixture(scope="module")
def ips() -> dict[str, str]:
    return {h: LAB.ip(h) for h in HOSTS}


@pytest.fixture(scope="module")
def inventory(tmp_path_factory, ips) -> Path:
    path = tmp_path_factory.mktemp("doctor") / "inventory"
    store = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / "dkim"
    hostvars = {
        h: {
            "lab_ip": ips[h],
            "ansible_host": LAB.container(h),
            "ansible_connection": "containers.podman.podman",
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        for h in HOSTS
    }
    for relay in GROUPS["relays"]:
        hostvars[relay]["relay_dkim_keys_dir"] = str(store)
    children = {
        group: {"hosts": {h: hostvars[h] for h in members}} for group, members in GROUPS.items()
    }
    path.mkdir(parents=True)
    (path / "hosts.yml").write_text(
        yaml.safe_dump({"all": {"children": {"lab": {"children": children}}}})
    )
    (path / "group_vars").symlink_to(ROOT / "inventories" / "lab" / "group_vars")
    return path


def doctor(inventory: Path, *extra: str, password: str = PASSWORD, text: bool = False):
    """Run `smtpgw doctor`; its exit status and its JSON report (or its text)."""
    env = dict(
        os.environ,
        SMTPGW_TENANTS_DIR=str(SCENARIO / "tenants"),
        SMTPGW_ROOT=str(ROOT),
        SMTPGW_DOCTOR_PASSWORD=password,
    )
    argv = [sys.executable, "-m", "smtpgw.cli", "doctor", str(inventory), "--login", LOGIN]
    proc = subprocess.run(
        [*argv, *extra, *([] if text else ["--json"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode in (0, 2), proc.stdout + proc.stderr
    return proc.returncode, (proc.stdout if text else json.loads(proc.stdout))


def failed(report: dict) -> list[dict]:
    return [c for c in report["checks"] if c["status"] == "fail"]


def assert_fails_at(rc: int, report: dict, layer: str) -> dict:
    """The report failed at `layer` (and only there); its first failed check."""
    assert rc == 2, report
    assert report["failed_layer"] == layer, json.dumps(report, indent=1)
    fails = failed(report)
    assert {c["layer"] for c in fails} == {layer}
    assert all(c["fix"] for c in fails)
    return fails[0]


def update(ips: dict[str, str], zone: str, op: str, name: str, rdtype: str, value: str = ""):
    """An RFC 2136 change at dns1, signed with the lab key (what someone else would do)."""
    keyring = dns.tsigkeyring.from_text({TSIG[0]: (TSIG[1], TSIG[2])})
    message = dns.update.UpdateMessage(zone, keyring=keyring, keyalgorithm=TSIG[1])
    if op == "replace":
        message.replace(name, 300, rdtype, value)
    else:
        message.delete(name, rdtype)
    assert dns.query.tcp(message, ips["dns1"], timeout=5).rcode() == 0


def lookup(ips: dict[str, str], name: str, rdtype: str) -> list[str]:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [ips["dns1"]]
    try:
        return [r.to_text() for r in resolver.resolve(name, rdtype)]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []


@contextmanager
def record_changed(ips, zone: str, name: str, rdtype: str, value: str | None):
    """Replace (value) or delete (None) a record at dns1; put the old one back afterwards."""
    before = lookup(ips, name, rdtype)
    assert before, f"{name} {rdtype} should exist before the fault"
    try:
        if value is None:
            update(ips, zone, "delete", name, rdtype)
        else:
            update(ips, zone, "replace", name, rdtype, value)
        yield before
    finally:
        update(ips, zone, "delete", name, rdtype)
        keyring = dns.tsigkeyring.from_text({TSIG[0]: (TSIG[1], TSIG[2])})
        message = dns.update.UpdateMessage(zone, keyring=keyring, keyalgorithm=TSIG[1])
        for text in before:
            message.add(name, 300, rdtype, text)
        assert dns.query.tcp(message, ips["dns1"], timeout=5).rcode() == 0
        assert sorted(lookup(ips, name, rdtype)) == sorted(before)


def reverse_zone(ip: str) -> str:
    return ".".join(reversed(ip.split(".")[:3])) + ".in-addr.arpa"


# --- no fault -------------------------------------------------------------------------------


def test_no_fault_every_layer_passes_and_says_what_it_checked(inventory, ips):
    rc, report = doctor(inventory)
    assert rc == 0, json.dumps(report, indent=1)
    assert report["failed_layer"] is None
    by_layer: dict[str, list[dict]] = {}
    for c in report["checks"]:
        by_layer.setdefault(c["layer"], []).append(c)
    assert list(by_layer) == [
        "names",
        "relay-dns",
        "reach",
        "tls",
        "auth",
        "smarthost-auth",
        "queue",
        "tenant-dns",
    ]
    subjects = {c["subject"] for c in report["checks"] if c["status"] == "ok"}
    for relay in GROUPS["relays"]:
        name = f"{relay}.lab.test"
        assert name in subjects
        assert f"{relay} -> upstream1 (upstream1.lab.test)" in subjects  # as deployed
        assert f"{relay} {ips[relay]}" in subjects  # PTR and HELO
        assert {f"{name}:{p}" for p in (25, 465, 587)} <= subjects  # reach and TLS
        assert f"{relay} -> upstream1 (upstream1.lab.test:587)" in subjects  # reach, login
    details = " | ".join(c["detail"] for c in report["checks"])
    assert f"PTR relay1.lab.test -> {ips['relay1']}; HELO relay1.lab.test" in details
    assert "upstream1.lab.test -> " + ips["upstream1"] + " (as deployed)" in details
    assert "certificate for relay1.lab.test, expires in" in details
    assert f"{LOGIN} logged in on 587" in details
    assert "accepts relay@lab.test" in details
    assert "routed.test" in by_layer["tenant-dns"][0]["detail"]
    # And people read it: one line a check, then the summary.
    rc, text = doctor(inventory, text=True)
    assert rc == 0
    assert text.splitlines()[-1].startswith("all layers passed (")
    print(text)


# --- faults, one layer each ---------------------------------------------------------------------


def test_gateway_name_no_longer_resolves(inventory, ips):
    with record_changed(ips, "lab.test", "relay1.lab.test.", "A", None):
        rc, report = doctor(inventory)
    check = assert_fails_at(rc, report, "names")
    assert check["subject"] == "relay1.lab.test"
    assert "does not resolve" in check["detail"]
    assert "publish the A record of relay1.lab.test" in check["fix"]


def test_smarthost_address_changed(inventory, ips):
    with record_changed(ips, "lab.test", "upstream1.lab.test.", "A", ips["mx1"]):
        rc, report = doctor(inventory)
    check = assert_fails_at(rc, report, "names")
    assert check["subject"] == "relay1 -> upstream1 (upstream1.lab.test)"
    assert check["detail"] == (
        f"upstream1.lab.test now resolves to {ips['mx1']}; when relay1 was deployed it "
        f"resolved to {ips['upstream1']}"
    )
    assert "address changed" in check["fix"]


def test_relay_ptr_missing(inventory, ips):
    ptr = dns.reversename.from_address(ips["relay1"]).to_text()
    with record_changed(ips, reverse_zone(ips["relay1"]), ptr, "PTR", None):
        rc, report = doctor(inventory)
    check = assert_fails_at(rc, report, "relay-dns")
    assert check["subject"] == f"relay1 {ips['relay1']}"
    assert check["detail"].startswith(f"no PTR record for {ips['relay1']}")
    assert "naming relay1.lab.test" in check["fix"]


def test_relay_ptr_names_another_host(inventory, ips):
    ptr = dns.reversename.from_address(ips["relay1"]).to_text()
    with record_changed(ips, reverse_zone(ips["relay1"]), ptr, "PTR", "mx1.lab.test."):
        rc, report = doctor(inventory)
    check = assert_fails_at(rc, report, "relay-dns")
    assert check["detail"].startswith(
        f"PTR of {ips['relay1']} names mx1.lab.test, which does not resolve back"
    )
    assert "point the PTR of" in check["fix"]


def test_postfix_stopped(inventory):
    LAB.exec("relay1", "systemctl", "stop", "postfix")
    try:
        rc, report = doctor(inventory)
    finally:
        LAB.exec("relay1", "systemctl", "start", "postfix")
    check = assert_fails_at(rc, report, "reach")
    assert check["subject"] == "relay1.lab.test:25"
    assert "Connection refused" in check["detail"]
    assert "Postfix on relay1 is inactive" in check["detail"]
    assert "start Postfix" in check["fix"]


def test_firewall_drops_587(inventory):
    LAB.exec(
        "relay1",
        "sh",
        "-ec",
        "nft add table inet doctortest; "
        "nft add chain inet doctortest input '{ type filter hook input priority -10; }'; "
        "nft add rule inet doctortest input tcp dport 587 drop",
    )
    try:
        rc, report = doctor(inventory)
    finally:
        LAB.exec("relay1", "nft", "delete", "table", "inet", "doctortest")
    check = assert_fails_at(rc, report, "reach")
    assert [c["subject"] for c in failed(report)] == ["relay1.lab.test:587"]
    assert check["detail"].startswith("timed out after")
    assert "a firewall drops it" in check["fix"]


def expired_pem() -> str:
    """A key and a certificate for relay1.lab.test from the lab CA that expired yesterday."""
    ca_key = serialization.load_pem_private_key((PKI / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((PKI / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay1.lab.test")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("relay1.lab.test")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem.decode() + cert.public_bytes(serialization.Encoding.PEM).decode()


def test_certificate_expired(inventory):
    original = LAB.exec("relay1", "cat", RELAY_PEM)
    LAB.exec("relay1", "sh", "-c", f"cat > {RELAY_PEM} && postfix reload", stdin=expired_pem())
    try:
        rc, report = doctor(inventory)
    finally:
        LAB.exec("relay1", "sh", "-c", f"cat > {RELAY_PEM} && postfix reload", stdin=original)
    check = assert_fails_at(rc, report, "tls")
    assert check["subject"].startswith("relay1.lab.test:")
    assert "certificate for relay1.lab.test expired 1 day(s) ago" in check["detail"]
    assert "renewed certificate" in check["fix"]


def test_smarthost_refuses_the_relays_login(inventory):
    original = LAB.exec("upstream1", "cat", UPSTREAM_USERS)
    changed = "\n".join(
        "relay@lab.test:{PLAIN}not-the-relays-password"
        if line.startswith("relay@lab.test:")
        else line
        for line in original.splitlines()
    )
    LAB.exec("upstream1", "sh", "-c", f"cat > {UPSTREAM_USERS}", stdin=changed + "\n")
    try:
        rc, report = doctor(inventory)
    finally:
        LAB.exec("upstream1", "sh", "-c", f"cat > {UPSTREAM_USERS}", stdin=original)
    check = assert_fails_at(rc, report, "smarthost-auth")
    assert check["subject"] == "relay1 -> upstream1 (upstream1.lab.test:587)"
    assert check["detail"].startswith("refuses relay@lab.test: 535")
    assert "relay_smarthosts" in check["fix"]


def test_smarthost_down_and_mail_queueing(inventory, ips):
    LAB.exec("upstream1", "systemctl", "stop", "postfix")
    try:
        sub = Submission(
            ips["relay1"],
            587,
            "starttls",
            server_name="relay1.lab.test",
            cafile=str(PKI / "ca.crt"),
            login=LOGIN,
            password=PASSWORD,
        )
        token = send(sub, LOGIN, "doctor@dest.test", "queued while upstream1 is down")
        deadline = time.monotonic() + 60
        while token and time.monotonic() < deadline:  # until the relay has tried and deferred
            if "Connection refused" in LAB.exec("relay1", "postqueue", "-p"):
                break
            time.sleep(1)
        rc, report = doctor(inventory)
    finally:
        LAB.exec("upstream1", "systemctl", "start", "postfix")
        LAB.exec("relay1", "postqueue", "-f")
    check = assert_fails_at(rc, report, "reach")
    assert check["subject"] == "relay1 -> upstream1 (upstream1.lab.test:587)"
    assert "Connection refused" in check["detail"]
    assert "message(s) in relay1's queue" in check["detail"]
    assert "0 message(s)" not in check["detail"]
    assert "smart host is down" in check["fix"]
    # The queued message goes out once upstream1 is back (and leaves the queue empty).
    LAB.find_mail(token, timeout=90)


def test_tenant_dkim_record_wrong(inventory, ips):
    name = "smtpgw-rsa._domainkey.routed.test."
    with record_changed(ips, "routed.test", name, "TXT", '"v=DKIM1; k=rsa; p=AAAAwrong"'):
        rc, report = doctor(inventory)
    check = assert_fails_at(rc, report, "tenant-dns")
    assert check["subject"].startswith(f"{name} dkim at ")
    assert check["detail"].startswith("wrong: seen v=DKIM1; k=rsa; p=AAAAwrong; expected v=DKIM1")
    assert "smtpgw dns apply" in check["fix"]


def test_one_host_and_port_from_anywhere(ips):
    """--host: only what a client sees (names, reach, TLS, AUTH), here by address."""
    env = dict(os.environ, SMTPGW_DOCTOR_PASSWORD=PASSWORD)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smtpgw.cli",
            "doctor",
            "--host",
            ips["relay2"],
            "--port",
            "465",
            "--server-name",
            "relay2.lab.test",
            "--ca",
            str(PKI / "ca.crt"),
            "--login",
            LOGIN,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["names", "reach", "tls", "auth"]
    assert f"{LOGIN} logged in on 465" in proc.stdout
    assert lines[-1].startswith("all layers passed (3 checks)")


def test_login_password_wrong(inventory):
    """Last: Dovecot delays the next logins from this machine after a failed one."""
    rc, report = doctor(inventory, password="not-the-password")
    check = assert_fails_at(rc, report, "auth")
    assert check["subject"] == "relay1.lab.test:587"
    assert check["detail"].startswith(f"{LOGIN} refused: 535")
    assert "check it in the tenant file" in check["fix"]
