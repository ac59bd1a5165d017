"""DKIM signing and the sender checks in rspamd, over SMTP against the deployed relay.

Every message a tenant sends (a login on 587 or 465, a device on its network on 25) arrives at
the MX with an RSA and an Ed25519 signature of the header From's domain, both verified here with
dkimpy against the public keys the role made on the controller (not DNS). Devices are held to
their tenant's domains as logins are. rspamd down defers mail; reruns keep the keys; a removed
tenant's keys leave the relay; bad keys, key stores and rspamd configurations fail the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import smtplib
import stat
import threading
import time
import uuid
from pathlib import Path

import dkim
import pytest
from gwlab import run_site

from smtpgw.smtpclient import Submission, connect

LOGINS = {
    "acme.test": ("scanner@acme.test", "lab-acme-scanner-pw"),
    "globex.test": ("billing@globex.test", "lab-globex-billing-pw"),
}
KEYS_DIR = "/var/lib/rspamd/smtpgw-dkim"
MAPS = "/etc/rspamd/smtpgw"
SIGNING = "/etc/rspamd/local.d/dkim_signing.conf"
SPOOL = [f"/var/spool/postfix/{q}" for q in ("maildrop", "incoming", "active", "deferred", "hold")]


def key_store() -> Path:
    """The controller's key store: relay_dkim_keys_dir's default, beside the inventory."""
    return Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / "dkim"


def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
    """DKIM key lookups answered from the role's <domain>.<selector>.txt files."""
    selector, _, domain = name.decode().rstrip(".").partition("._domainkey.")
    path = key_store() / f"{domain}.{selector}.txt"
    return path.read_bytes().strip() if path.is_file() else b""


def signatures(message: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature header, in order."""
    found = []
    for name, value in dkim.rfc822_parse(message)[0]:
        if name.lower() == b"dkim-signature":
            found.append(dkim.util.parse_tag_value(value))
    return found


def verifies(checker: dkim.DKIM, index: int) -> bool:
    try:
        return bool(checker.verify(idx=index, dnsfunc=dnsfunc))
    except dkim.ValidationError:  # a body hash mismatch is raised, not returned
        return False


def assert_signed(message: str, domain: str) -> None:
    raw = message.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    sigs = signatures(raw)
    algorithms = sorted(s[b"a"].decode() for s in sigs)
    assert algorithms == ["ed25519-sha256", "rsa-sha256"], f"signatures: {sigs}"
    assert {s[b"d"].decode() for s in sigs} == {domain}
    checker = dkim.DKIM(raw)
    for index, sig in enumerate(sigs):
        assert verifies(checker, index), (
            f"{sig[b'a'].decode()} signature of {domain} does not verify"
        )


def message(sender: str, token: str, header_from: str | None = None) -> bytes:
    return (
        f"From: {header_from or sender}\r\nTo: dkim@dest.test\r\nSubject: dkim {token}\r\n"
        f"Message-ID: <{token}@{sender.split('@')[1]}>\r\n\r\nsigned body {token}\r\n"
    ).encode()


def submit(lab, domain: str, port: int, token: str) -> None:
    sender = LOGINS[domain][0]
    if port == 25:  # this machine is on acme's network: a device without a login
        sub = Submission(lab.relay_ip, 25, "none")
    else:
        sub = lab.submission(*LOGINS[domain], port, "implicit" if port == 465 else "starttls")
    with connect(sub) as smtp:
        smtp.sendmail(sender, ["dkim@dest.test"], message(sender, token))


@pytest.mark.parametrize(
    ("domain", "port"),
    [
        ("acme.test", 587),
        ("acme.test", 465),
        ("acme.test", 25),
        ("globex.test", 587),  # through the smart host upstream1
        ("globex.test", 465),
    ],
)
def test_tenant_mail_arrives_signed_twice(lab, domain, port):
    token = uuid.uuid4().hex
    submit(lab, domain, port, token)
    assert_signed(lab.find_mail(token), domain)


def test_a_changed_body_fails_verification(lab):
    """The check above can fail: a signature over other content does not verify."""
    token = uuid.uuid4().hex
    submit(lab, "acme.test", 587, token)
    arrived = lab.find_mail(token).replace(f"signed body {token}", "a changed body")
    raw = arrived.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    checker = dkim.DKIM(raw)
    count = len(signatures(raw))
    assert count == 2
    assert not any(verifies(checker, i) for i in range(count))


def device_refused(lab, envelope: str, header_from: str) -> tuple[int, bytes]:
    sub = Submission(lab.relay_ip, 25, "none")
    with connect(sub) as smtp, pytest.raises(smtplib.SMTPDataError) as err:
        smtp.sendmail(envelope, ["victim@dest.test"], message(envelope, "x", header_from))
    return err.value.smtp_code, err.value.smtp_error


@pytest.mark.parametrize(
    ("envelope", "header_from", "said"),
    [
        ("billing@globex.test", "scanner@acme.test", b"envelope sender <billing@globex.test>"),
        ("someone@unowned.test", "scanner@acme.test", b"envelope sender <someone@unowned.test>"),
        ("scanner@acme.test", "billing@globex.test", b"header From <billing@globex.test>"),
        ("scanner@acme.test", '"scanner@acme.test" <ceo@globex.test>', b"<ceo@globex.test>"),
        ("scanner@acme.test", "scanner@acme.test, ceo@globex.test", b"<ceo@globex.test>"),
        ("scanner@sub.acme.test", "scanner@acme.test", b"<scanner@sub.acme.test>"),
    ],
)
def test_device_held_to_its_tenants_domains(lab, envelope, header_from, said):
    code, text = device_refused(lab, envelope, header_from)
    assert code == 554
    assert said in text and b"is not a domain of tenant acme" in text


def test_device_without_from_header_is_refused(lab):
    sub = Submission(lab.relay_ip, 25, "none")
    with connect(sub) as smtp, pytest.raises(smtplib.SMTPDataError) as err:
        smtp.sendmail("scanner@acme.test", ["victim@dest.test"], b"Subject: none\r\n\r\nx\r\n")
    assert err.value.smtp_code == 554 and b"a From header" in err.value.smtp_error


def test_rspamd_down_defers_then_mail_goes_out_signed(lab):
    """rspamd stopped: Postfix answers 4xx (milter_default_action=tempfail), nothing is queued
    or relayed unsigned; started again, the client's retry goes out signed."""
    token = uuid.uuid4().hex
    lab.exec("relay1", "systemctl", "stop", "rspamd")
    try:
        for port, mode in ((587, "starttls"), (465, "implicit")):
            sub = lab.submission(*LOGINS["acme.test"], port, mode)
            with pytest.raises(smtplib.SMTPResponseException) as err, connect(sub) as smtp:
                smtp.sendmail(
                    "scanner@acme.test", ["dkim@dest.test"], message("scanner@acme.test", token)
                )
            assert 400 <= err.value.smtp_code < 500, err.value
        sub = Submission(lab.relay_ip, 25, "none")
        with pytest.raises(smtplib.SMTPResponseException) as err, connect(sub) as smtp:
            smtp.sendmail(
                "scanner@acme.test", ["dkim@dest.test"], message("scanner@acme.test", token)
            )
        assert 400 <= err.value.smtp_code < 500, err.value
        queued = lab.exec("relay1", "grep", "-rlF", token, *SPOOL, check=False)
        assert queued == "", f"the relay queued it while rspamd was down: {queued}"
    finally:
        lab.exec("relay1", "systemctl", "start", "rspamd")
    lab.exec("relay1", "postqueue", "-f")
    assert lab.mail_count(token) == 0, "a message went out while rspamd was down"
    deadline = time.monotonic() + 30
    while True:  # the client's retry, as a client retries a 4xx, until rspamd answers
        try:
            submit(lab, "acme.test", 587, token)
            break
        except smtplib.SMTPResponseException as err:
            assert err.smtp_code < 500 and time.monotonic() < deadline, err
            time.sleep(1)
    assert_signed(lab.find_mail(token), "acme.test")


def test_reload_drops_no_message(lab):
    """A tenant change reloads rspamd (new workers take over): mail sent meanwhile is neither
    refused nor deferred, and arrives signed."""
    tokens: list[str] = []
    errors: list[str] = []

    def sender() -> None:
        sub = lab.submission(*LOGINS["acme.test"], 587, "starttls")
        for _ in range(4):
            with connect(sub) as smtp:
                for _ in range(15):
                    token = uuid.uuid4().hex
                    try:
                        smtp.sendmail(
                            "scanner@acme.test",
                            ["dkim@dest.test"],
                            message("scanner@acme.test", token),
                        )
                        tokens.append(token)
                    except smtplib.SMTPException as exc:
                        errors.append(repr(exc))

    thread = threading.Thread(target=sender)
    thread.start()
    for _ in range(3):
        lab.exec("relay1", "systemctl", "reload", "rspamd")
        time.sleep(0.7)
    thread.join(120)
    assert errors == [], errors
    assert len(tokens) == 60
    for token in (tokens[0], tokens[30], tokens[-1]):
        assert_signed(lab.find_mail(token), "acme.test")
    for token in tokens:
        assert lab.find_mail(token)


# --- Runs of site.yml ---------------------------------------------------------------------------


def store_state() -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(key_store().iterdir())
    }


def relay_keys(lab) -> dict[str, str]:
    out = lab.exec("relay1", "stat", "-c", "%n %a %U", *_relay_key_paths(lab))
    return {line.split()[0].rsplit("/", 1)[1]: line.split(None, 1)[1] for line in out.splitlines()}


def _relay_key_paths(lab) -> list[str]:
    return lab.exec("relay1", "find", KEYS_DIR, "-type", "f").split()


def test_removed_tenant_leaves_and_returns_with_the_same_keys(lab, tenants_copy: Path):
    """Two runs. (1) globex removed: its keys and map entries leave the relay, and the
    controller's key store is untouched. (2) globex back: its same keys return and sign, and no
    key was made or touched (the key store is as it was: a run never regenerates a key).
    (A widened key mode is put back in test_tenant_changes; a rerun that changes nothing is
    Molecule's idempotence step.)"""
    before = store_state()
    # The store keeps every key it made (other tests' tenants too); the relay has its tenants'.
    scenario = set(relay_keys(lab))
    assert {n for n in scenario if n.startswith(tuple(LOGINS))} == {
        f"{d}.{s}.key" for d in LOGINS for s in ("smtpgw-rsa", "smtpgw-ed25519")
    }
    assert scenario <= set(before)

    (tenants_copy / "globex.yml").unlink()
    run = run_site(tenants_copy)
    assert run.rc == 0, run.output[-3000:]
    keys = relay_keys(lab)
    assert not [k for k in keys if k.startswith("globex.test.")], keys
    traces = lab.exec("relay1", "grep", "-rl", "globex", MAPS, SIGNING, check=False)
    assert traces == "", f"globex is still in {traces}"
    assert store_state() == before, "the controller's key store changed"

    run = run_site(_scenario_tenants())
    assert run.rc == 0, run.output[-3000:]
    assert set(relay_keys(lab)) == scenario
    assert all(v == "600 _rspamd" for v in relay_keys(lab).values())
    token = uuid.uuid4().hex
    submit(lab, "globex.test", 587, token)
    assert_signed(lab.find_mail(token), "globex.test")
    assert store_state() == before, "a run made or touched a key"


def _scenario_tenants() -> Path:
    return Path(__file__).resolve().parents[1] / "tenants"


# --- Bad input ------------------------------------------------------------------------------------


@pytest.fixture
def store_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "dkim"
    shutil.copytree(key_store(), dest)
    dest.chmod(0o700)
    return dest


def assert_failed_naming(run, *words: str) -> None:
    assert run.rc != 0, "the run should have failed"
    for word in words:
        assert word in run.output, f"{word!r} not in the output:\n{run.output[-3000:]}"


def test_world_readable_store_fails_the_run(lab, store_copy: Path):
    store_copy.chmod(0o755)
    before = lab.relay_state()
    run = run_site(_scenario_tenants(), "-e", f"relay_dkim_keys_dir={store_copy}")
    assert_failed_naming(run, f"{store_copy}: mode 0755", f"chmod 0700 {store_copy}")
    assert lab.relay_state() == before


def test_world_readable_key_fails_the_run(lab, store_copy: Path):
    key = store_copy / "acme.test.smtpgw-rsa.key"
    key.chmod(0o644)
    run = run_site(_scenario_tenants(), "-e", f"relay_dkim_keys_dir={store_copy}")
    assert_failed_naming(run, f"{key}: mode 0644", f"chmod 0600 {key}")


def test_unreadable_key_fails_the_run(lab, store_copy: Path):
    key = store_copy / "globex.test.smtpgw-ed25519.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    before = lab.relay_state()
    run = run_site(_scenario_tenants(), "-e", f"relay_dkim_keys_dir={store_copy}")
    assert_failed_naming(run, f"{key}: cannot read the private key", "restore it from a backup")
    assert lab.relay_state() == before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_rspamd_configuration_it_rejects_fails_the_run(lab):
    # An unterminated string: rspamd's UCL parser refuses the file.
    bad = json.dumps({"relay_rspamd_local": {"worker-controller.inc": 'bind_socket = "x;\n'}})
    run = run_site(_scenario_tenants(), "-e", bad)
    assert_failed_naming(run, "rspamd rejects /etc/rspamd/local.d/worker-controller.inc")
    assert "No such file" in lab.exec(
        "relay1", "sh", "-c", "ls /etc/rspamd/local.d/worker-controller.inc 2>&1", check=False
    )
    token = uuid.uuid4().hex  # the live configuration still signs
    submit(lab, "acme.test", 587, token)
    assert_signed(lab.find_mail(token), "acme.test")
