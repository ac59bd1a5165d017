"""lab_upstream, verified from the host over SMTP, the way a relay meets Microsoft 365 on 587.

STARTTLS first (TLS 1.2 or later, a certificate from the lab CA), then AUTH, then relay; the mail
arrives at mx1 with the login in a Received header.
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


def test_port_25_is_closed(ips):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ips[UPSTREAM], 25), timeout=10).close()


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
    mx = lab_host(MX)
    deadline = time.monotonic() + 30
    found = mx.run("grep -rl %s %s", token, MAILDIR)
    while found.rc != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        found = mx.run("grep -rl %s %s", token, MAILDIR)
    assert found.rc == 0, "the message did not arrive at mx1"
    message = mx.file(found.stdout.split()[0]).content_string
    headers = message.split("\n\n", 1)[0]
    assert f"(Authenticated sender: {user['login']})" in headers
    assert f"by {fqdn} (Postfix) with ESMTPSA" in headers
    assert f"body {token}" in message


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
