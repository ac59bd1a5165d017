"""The lab's smart host (upstream1), verified from the host over SMTP, the way a relay meets a
provider's doors; on the gateway scenario's own upstream1 (the lab inventory's settings).

587: STARTTLS first (TLS 1.2 or later, a certificate from the lab CA), then AUTH, then relay; the
mail arrives at mx1 with the login in a Received header. 465: the same with implicit TLS. 25: TLS
and a client certificate from the lab CA that upstream1 knows (the relays'; no login), like a
Microsoft 365 connector; no certificate, or one it does not know, is refused.
"""

from __future__ import annotations

import contextlib
import json
import smtplib
import socket
import ssl
import time
import uuid
from pathlib import Path

import pytest
import yaml
from gwlab import ROOT, run_playbook_on_scenario

FQDN = "upstream1.lab.test"
PORT = 587
# A client certificate upstream1 knows (a relay's) and one from the same CA it does not (mx1's).
KNOWN = "relay1.lab.test"
STRANGER = "mx1.lab.test"


class LabSMTP(smtplib.SMTP):
    """SMTP to a lab host by its IP, with STARTTLS checking the certificate against its name."""

    def __init__(self, ip: str, port: int = PORT) -> None:
        self._ip = ip
        super().__init__(FQDN, port, local_hostname="tester.test", timeout=30)

    def _get_socket(self, host, port, timeout):
        return super()._get_socket(self._ip, port, timeout)


@pytest.fixture(scope="module")
def upstream(lab) -> str:
    return lab.hosts.ip("upstream1")


@pytest.fixture(scope="module")
def user() -> dict[str, str]:
    """upstream1's login for the relays, as the lab inventory gives it."""
    secrets = yaml.safe_load((ROOT / "inventories/lab/group_vars/all/secrets.yml").read_text())
    return {"login": "relay@lab.test", "password": secrets["lab_secret_upstream"]}


@pytest.fixture
def tls(lab) -> ssl.SSLContext:
    """A client context that trusts the lab CA only."""
    return ssl.create_default_context(cafile=lab.ca)


@pytest.fixture
def pki(lab) -> Path:
    return Path(lab.ca).parent


@pytest.fixture
def smtp(upstream):
    """A session after EHLO; closed without fuss even when a test broke the connection."""
    smtp = LabSMTP(upstream)
    try:
        smtp.ehlo()
        yield smtp
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()


@pytest.fixture
def secured(smtp, tls):
    """A session after STARTTLS, before AUTH."""
    smtp.starttls(context=tls)
    smtp.ehlo()
    return smtp


def client_tls(tls: ssl.SSLContext, pki: Path, name: str | None) -> ssl.SSLContext:
    """The lab-CA client context, presenting the certificate of lab name ``name`` (if any)."""
    if name:
        tls.load_cert_chain(pki / f"{name}.crt", pki / f"{name}.key")
    return tls


def arrived(lab, token: str) -> str:
    """The headers of the message with ``token`` at mx1 (unfolded), waiting for it."""
    message = lab.find_mail(token, timeout=30)
    assert f"body {token}" in message
    return message.split("\n\n", 1)[0].replace("\n\t", " ")


def message(sender: str, token: str) -> str:
    return f"From: {sender}\r\nTo: someone@dest.test\r\nSubject: {token}\r\n\r\nbody {token}\r\n"


def test_25_refuses_a_client_without_a_certificate(upstream, tls):
    with LabSMTP(upstream, 25) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        smtp.starttls(context=tls)
        code, said = smtp.ehlo()
    assert (code, said) == (421, f"4.7.1 {FQDN} Error: No client certificate presented".encode())


def test_25_refuses_a_certificate_it_does_not_know(upstream, tls, pki):
    with LabSMTP(upstream, 25) as smtp:
        smtp.starttls(context=client_tls(tls, pki, STRANGER))
        smtp.ehlo()
        assert smtp.mail("sender@acme.test")[0] == 250
        code, said = smtp.rcpt("someone@dest.test")
    assert code == 554 and b"Access denied" in said, said


def test_25_relays_for_its_known_certificate_without_a_login(upstream, tls, pki, lab):
    token = uuid.uuid4().hex
    with LabSMTP(upstream, 25) as smtp:
        smtp.starttls(context=client_tls(tls, pki, KNOWN))
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        smtp.sendmail("sender@acme.test", ["someone@dest.test"], message("sender@acme.test", token))
    headers = arrived(lab, token)
    assert f'(Client CN "{KNOWN}", Issuer "smtpgw lab CA" (verified OK))' in headers
    assert f"by {FQDN} (Postfix) with ESMTPS id" in headers
    assert "Authenticated sender" not in headers


def test_465_implicit_tls_then_auth_relays(upstream, tls, user, lab):
    token = uuid.uuid4().hex

    class LabSMTPS(smtplib.SMTP_SSL):
        def _get_socket(self, host, port, timeout):
            return super()._get_socket(upstream, port, timeout)

    with LabSMTPS(FQDN, 465, local_hostname="tester.test", timeout=30, context=tls) as smtp:
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")
        smtp.ehlo()
        smtp.login(user["login"], user["password"])
        smtp.sendmail(user["login"], ["someone@dest.test"], message(user["login"], token))
    headers = arrived(lab, token)
    assert f"(Authenticated sender: {user['login']})" in headers
    assert f"by {FQDN} (Postfix) with ESMTPSA id" in headers


def test_no_auth_and_no_mail_before_starttls(smtp):
    assert smtp.has_extn("starttls")
    assert not smtp.has_extn("auth")
    code, said = smtp.mail("sender@acme.test")
    assert code == 530, said


def test_starttls_verifies_with_the_lab_ca(secured):
    tls_socket = secured.sock
    assert isinstance(tls_socket, ssl.SSLSocket)
    assert tls_socket.version() in ("TLSv1.2", "TLSv1.3")
    subject = dict(item[0] for item in tls_socket.getpeercert()["subject"])
    assert subject["commonName"] == FQDN
    assert set(secured.esmtp_features["auth"].upper().split()) >= {"PLAIN", "LOGIN"}


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_12_and_13_accepted(smtp, tls, version):
    tls.minimum_version = tls.maximum_version = version
    smtp.starttls(context=tls)
    assert smtp.sock.version() == version.name.replace("_", ".")


def test_tls_11_refused(smtp):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError) as refused:
        smtp.starttls(context=old)
    # The server's protocol_version alert, not a client that could not offer TLS 1.1.
    assert "PROTOCOL_VERSION" in str(refused.value).upper(), refused.value


def test_wrong_password_refused(secured, user):
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        secured.login(user["login"], user["password"] + "-wrong")
    assert refused.value.smtp_code == 535


def test_no_relay_without_auth(secured):
    code, said = secured.mail("sender@acme.test")
    assert code == 250, said
    code, said = secured.rcpt("someone@dest.test")
    assert 500 <= code < 600, said


def test_login_relays_to_mx_with_the_login_in_received(secured, user, lab):
    # The lab's password has spaces, a colon and symbols: the smart host's user file takes it.
    assert " " in user["password"] and ":" in user["password"]
    token = uuid.uuid4().hex
    secured.login(user["login"], user["password"])
    secured.sendmail(user["login"], ["someone@dest.test"], message(user["login"], token))
    headers = arrived(lab, token)  # asserts the body arrived too
    assert f"(Authenticated sender: {user['login']})" in headers
    assert f"by {FQDN} (Postfix) with ESMTPSA" in headers


def refuses(address: str, port: int, within: float) -> bool:
    """Whether connections to address:port are refused, within `within` seconds. (`systemctl stop
    postfix` returns once the master was told to stop; its listeners close a moment later.)"""
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection((address, port), timeout=10).close()
        except ConnectionRefusedError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def test_stoppable_for_outage_drills(lab, upstream):
    try:
        lab.exec("upstream1", "systemctl", "stop", "postfix")
        assert refuses(upstream, PORT, within=15), "587 still accepts 15 s after the stop"
    finally:
        lab.exec("upstream1", "systemctl", "start", "postfix")
    deadline = time.monotonic() + 30
    while True:
        try:
            with LabSMTP(upstream) as smtp:
                assert smtp.ehlo()[0] == 250
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "postfix did not come back"
            time.sleep(0.5)


def _refused(tmp_path: Path, role: str, role_vars: dict) -> str:
    """Apply a lab role on the controller with these variables; it must fail: its output."""
    playbook = tmp_path / "refused.yml"
    play = {
        "name": "Refused",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "tasks": [{"ansible.builtin.include_role": {"name": role}, "vars": role_vars}],
    }
    playbook.write_text(json.dumps([play]))
    run = run_playbook_on_scenario(playbook)
    assert run.rc != 0, run.output[-2000:]
    return " ".join(run.output.split())


def test_lab_upstream_refuses_a_run_without_its_required_inputs(tmp_path):
    output = _refused(tmp_path, "lab_upstream", {})
    for name in ("lab_upstream_relayhost", "lab_upstream_tls_cert", "lab_upstream_tls_key"):
        assert name in output, output


def test_lab_pki_refuses_an_unknown_key_type(tmp_path):
    output = _refused(
        tmp_path, "lab_pki", {"lab_pki_key_type": "DSA", "lab_pki_dir": str(tmp_path)}
    )
    assert "lab_pki_key_type" in output and "ECC" in output, output
