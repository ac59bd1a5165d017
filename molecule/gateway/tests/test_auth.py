"""Auth: a good login relays; a wrong password, an unknown login and AUTH without TLS do not."""

from __future__ import annotations

import base64
import smtplib

import pytest

from smtpgw.smtpclient import connect, send

PASSWORDS = {"scanner@acme.test": "lab-acme-scanner-pw"}


def sub(lab, port=587, mode="starttls", login=None, password=None):
    return lab.submission(login, password, port, mode)


@pytest.mark.parametrize(("port", "mode"), [(587, "starttls"), (465, "implicit")])
def test_good_login_relays(lab, port, mode):
    s = sub(lab, port, mode, "scanner@acme.test", PASSWORDS["scanner@acme.test"])
    token = send(s, "scanner@acme.test", "auth-ok@dest.test")
    assert token in lab.find_mail(token)


@pytest.mark.parametrize(
    ("login", "password"),
    [("scanner@acme.test", "not-the-password"), ("nobody@acme.test", "lab-acme-scanner-pw")],
    ids=["wrong-password", "unknown-login"],
)
@pytest.mark.parametrize(("port", "mode"), [(587, "starttls"), (465, "implicit")])
def test_bad_credentials_refused(lab, port, mode, login, password):
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        connect(sub(lab, port, mode, login, password))
    assert err.value.smtp_code == 535


@pytest.mark.parametrize("port", [587, 25])
def test_auth_without_tls_refused(lab, port):
    with smtplib.SMTP(lab.relay_ip, port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert not smtp.has_extn("auth")
        secret = base64.b64encode(
            b"\0scanner@acme.test\0" + PASSWORDS["scanner@acme.test"].encode()
        )
        code, _ = smtp.docmd("AUTH", "PLAIN " + secret.decode())
        assert code >= 500  # the right password, but never in the clear


def test_port_25_never_offers_auth_even_under_tls(lab):
    with connect(sub(lab, 25, "starttls")) as smtp:
        assert not smtp.has_extn("auth")
