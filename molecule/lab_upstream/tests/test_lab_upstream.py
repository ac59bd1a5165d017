"""lab_upstream, verified from the host over SMTP, the way a relay meets a provider's doors.

587: STARTTLS first (TLS 1.2 or later, a certificate from the lab CA), then AUTH, then relay; the
mail arrives at mx1 with the login in a Received header. 465: the same with implicit TLS. 25: TLS
and a client certificate from the lab CA that upstream1 knows (no login), like a Microsoft 365
connector; no certificate, or one it does not know, is refused.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
import time
import uuid
from pathlib import Path

import pytest

UPSTREAM = "smtpgw-labup-upstream1"
MX = "smtpgw-labup-mx1"
PORT = 587
MAILDIR = "/var/mail/lab/Maildir/new/"


class LabSMTP(smtplib.SMTP):
    """SMTP to a lab host by its IP, with STARTTLS checking the certificate against its name."""

    def __init__(self, name: str, ip: str, port: int = PORT) -> None:
        self._ip = ip
        super().__init__(name, port, local_hostname="tester.test", timeout=30)

    def _get_socket(self, host, port, timeout):
        return super()._get_socket(self._ip, port, timeout)


@pytest.fixture(scope="module")
def upstream_vars(lab_host) -> dict:
    return lab_host(UPSTREAM).ansible.get_variables()


@pytest.fixture(scope="module")
def fqdn(upstream_vars) -> str:
    return upstream_vars["lab_upstream_hostname"]


@pytest.fixture(scope="module")
def users(upstream_vars) -> list[dict[str, str]]:
    return upstream_vars["lab_upstream_users"]


@pytest.fixture
def tls(upstream_vars) -> ssl.SSLContext:
    """A client context that trusts the lab CA only."""
    return ssl.create_default_context(cafile=str(Path(upstream_vars["lab_pki_dir"]) / "ca.crt"))


@pytest.fixture
def smtp(ips, fqdn):
    """A session after EHLO; closed without fuss even when a test broke the connection."""
    smtp = LabSMTP(fqdn, ips[UPSTREAM])
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


def arrived(lab_host, token: str) -> str:
    """The headers of the message with ``token`` at mx1, waiting up to 30 s for it."""
    mx = lab_host(MX)
    deadline = time.monotonic() + 30
    found = mx.run("grep -rl %s %s", token, MAILDIR)
    while found.rc != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        found = mx.run("grep -rl %s %s", token, MAILDIR)
    assert found.rc == 0, "the message did not arrive at mx1"
    message = mx.file(found.stdout.split()[0]).content_string
    assert f"body {token}" in message
    return message.split("\n\n", 1)[0].replace("\n\t", " ")


def message(sender: str, token: str) -> str:
    return f"From: {sender}\r\nTo: someone@dest.test\r\nSubject: {token}\r\n\r\nbody {token}\r\n"


@pytest.fixture
def pki(upstream_vars) -> Path:
    return Path(upstream_vars["lab_pki_dir"])


def test_25_refuses_a_client_without_a_certificate(ips, fqdn, tls):
    with LabSMTP(fqdn, ips[UPSTREAM], 25) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        smtp.starttls(context=tls)
        code, said = smtp.ehlo()
    assert (code, said) == (421, f"4.7.1 {fqdn} Error: No client certificate presented".encode())


def test_25_refuses_a_certificate_it_does_not_know(ips, fqdn, tls, pki):
    with LabSMTP(fqdn, ips[UPSTREAM], 25) as smtp:
        smtp.starttls(context=client_tls(tls, pki, "stranger.lab.test"))
        smtp.ehlo()
        assert smtp.mail("sender@acme.test")[0] == 250
        code, said = smtp.rcpt("someone@dest.test")
    assert code == 554 and b"Access denied" in said, said


def test_25_relays_for_its_known_certificate_without_a_login(ips, fqdn, tls, pki, lab_host):
    token = uuid.uuid4().hex
    with LabSMTP(fqdn, ips[UPSTREAM], 25) as smtp:
        smtp.starttls(context=client_tls(tls, pki, "client.lab.test"))
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        smtp.sendmail("sender@acme.test", ["someone@dest.test"], message("sender@acme.test", token))
    headers = arrived(lab_host, token)
    assert '(Client CN "client.lab.test", Issuer "smtpgw lab CA" (verified OK))' in headers
    assert f"by {fqdn} (Postfix) with ESMTPS id" in headers
    assert "Authenticated sender" not in headers


def test_465_implicit_tls_then_auth_relays(ips, fqdn, tls, users, lab_host):
    user = users[0]
    token = uuid.uuid4().hex

    class LabSMTPS(smtplib.SMTP_SSL):
        def _get_socket(self, host, port, timeout):
            return super()._get_socket(ips[UPSTREAM], port, timeout)

    with LabSMTPS(fqdn, 465, local_hostname="tester.test", timeout=30, context=tls) as smtp:
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")
        smtp.ehlo()
        smtp.login(user["login"], user["password"])
        smtp.sendmail(user["login"], ["someone@dest.test"], message(user["login"], token))
    headers = arrived(lab_host, token)
    assert f"(Authenticated sender: {user['login']})" in headers
    assert f"by {fqdn} (Postfix) with ESMTPSA id" in headers


def test_no_auth_and_no_mail_before_starttls(smtp):
    assert smtp.has_extn("starttls")
    assert not smtp.has_extn("auth")
    code, message = smtp.mail("sender@acme.test")
    assert code == 530, message


def test_starttls_verifies_with_the_lab_ca(secured, fqdn):
    tls_socket = secured.sock
    assert isinstance(tls_socket, ssl.SSLSocket)
    assert tls_socket.version() in ("TLSv1.2", "TLSv1.3")
    subject = dict(item[0] for item in tls_socket.getpeercert()["subject"])
    assert subject["commonName"] == fqdn
    assert set(secured.esmtp_features["auth"].upper().split()) >= {"PLAIN", "LOGIN"}


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_12_and_13_accepted(smtp, tls, version):
    tls.minimum_version = tls.maximum_version = version
    smtp.starttls(context=tls)
    assert smtp.sock.version() == version.name.replace("_", ".")


def test_tls_11_refused(smtp, fqdn):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError) as refused:
        smtp.starttls(context=old)
    # The server's protocol_version alert, not a client that could not offer TLS 1.1.
    assert "PROTOCOL_VERSION" in str(refused.value).upper(), refused.value


def test_wrong_password_refused(secured, users):
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        secured.login(users[0]["login"], users[0]["password"] + "-wrong")
    assert refused.value.smtp_code == 535


def test_no_relay_without_auth(secured):
    code, message = secured.mail("sender@acme.test")
    assert code == 250, message
    code, message = secured.rcpt("someone@dest.test")
    assert 500 <= code < 600, message


@pytest.mark.parametrize("index", [0, 1])
def test_login_relays_to_mx_with_the_login_in_received(secured, users, lab_host, fqdn, index):
    user = users[index]
    token = uuid.uuid4().hex
    secured.login(user["login"], user["password"])
    secured.sendmail(
        user["login"],
        ["someone@dest.test"],
        f"From: {user['login']}\r\nTo: someone@dest.test\r\nSubject: {token}\r\n"
        f"\r\nbody {token}\r\n",
    )
    headers = arrived(lab_host, token)  # asserts the body arrived too
    assert f"(Authenticated sender: {user['login']})" in headers
    assert f"by {fqdn} (Postfix) with ESMTPSA" in headers


def test_stoppable_for_outage_drills(lab_host, ips, fqdn):
    upstream = lab_host(UPSTREAM)
    try:
        upstream.run_expect([0], "systemctl stop postfix")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ips[UPSTREAM], PORT), timeout=10).close()
    finally:
        upstream.run_expect([0], "systemctl start postfix")
    deadline = time.monotonic() + 30
    while True:
        try:
            with LabSMTP(fqdn, ips[UPSTREAM]) as smtp:
                assert smtp.ehlo()[0] == 250
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "postfix did not come back"
            time.sleep(0.5)
