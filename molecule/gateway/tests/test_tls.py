"""TLS: 587 wants STARTTLS before AUTH, 465 speaks TLS at once, TLS 1.0/1.1 refused, and the
certificate is the one deployed."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from smtpgw.smtpclient import Submission, connect, tls_context


def test_587_offers_starttls_and_no_auth_before_it(lab):
    with smtplib.SMTP(lab.relay_ip, 587, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")
        code, _ = smtp.docmd("AUTH", "PLAIN AHNjYW5uZXJAYWNtZS50ZXN0AHg=")
        assert code >= 500
        code, msg = smtp.docmd("MAIL", "FROM:<scanner@acme.test>")
        assert code == 530, msg  # Must issue a STARTTLS command first
        smtp._host = lab.relay_name
        smtp.starttls(context=tls_context(lab.ca))
        smtp.ehlo("client.test")
        assert "PLAIN" in smtp.esmtp_features["auth"].split()


def test_465_speaks_tls_at_once(lab):
    raw = socket.create_connection((lab.relay_ip, 465), timeout=30)
    with tls_context(lab.ca).wrap_socket(raw, server_hostname=lab.relay_name) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        banner = tls.recv(512)
    assert banner.startswith(b"220 relay1.lab.test ESMTP")


def test_465_refuses_plaintext(lab):
    with socket.create_connection((lab.relay_ip, 465), timeout=10) as sock:
        sock.settimeout(5)
        sock.sendall(b"EHLO client.test\r\n")
        try:
            reply = sock.recv(512)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert not reply.startswith(b"250")


def _legacy_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = version
    ctx.maximum_version = version
    return ctx


@pytest.mark.parametrize("port", [587, 465, 25])
def test_tls_before_1_2_refused_and_1_2_accepted(lab, port):
    def handshake(version: ssl.TLSVersion) -> str:
        raw = socket.create_connection((lab.relay_ip, port), timeout=30)
        try:
            if port != 465:
                f = raw.makefile("rb")
                f.readline()
                raw.sendall(b"EHLO client.test\r\n")
                while f.readline()[3:4] == b"-":
                    pass
                raw.sendall(b"STARTTLS\r\n")
                assert f.readline().startswith(b"220")
            with _legacy_context(version).wrap_socket(raw) as tls:
                return tls.version()
        finally:
            raw.close()

    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            handshake(old)
    # The same client, allowed TLS 1.2, gets through: the refusal above is the server's.
    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


@pytest.mark.parametrize(("port", "mode"), [(587, "starttls"), (465, "implicit"), (25, "starttls")])
def test_certificate_is_the_deployed_one(lab, port, mode):
    with open(lab.relay_cert) as f:
        deployed = ssl.PEM_cert_to_DER_cert(f.read())
    sub = Submission(lab.relay_ip, port, mode, server_name=lab.relay_name, cafile=lab.ca)
    with connect(sub) as smtp:
        assert smtp.sock.getpeercert(binary_form=True) == deployed
