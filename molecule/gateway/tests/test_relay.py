"""Relay: who may relay (logins, tenant networks) and who may not (everyone else, whatever the
address tricks), and a login may only send as its own tenant's domains."""

from __future__ import annotations

import json
import smtplib
import uuid

import pytest

from smtpgw.smtpclient import Submission, connect, send

SCANNER = ("scanner@acme.test", "lab-acme-scanner-pw")
BILLING = ("billing@globex.test", "lab-globex-billing-pw")


def login_sub(lab, who=SCANNER, port=587, mode="starttls"):
    return lab.submission(*who, port, mode)


def test_login_mail_arrives_with_body_intact(lab):
    token = uuid.uuid4().hex
    body = (
        f"token {token}\r\n"
        ".a line that starts with a dot\r\n"
        "..two dots\r\n"
        "trailing spaces   \r\n"
        + "x" * 990
        + "\r\n"
        + "\r\n".join(f"line {i:04d}" for i in range(2000))
        + "\r\n"
    )
    raw = f"From: scanner@acme.test\r\nTo: body@dest.test\r\nSubject: body {token}\r\n\r\n{body}"
    with connect(login_sub(lab)) as smtp:
        smtp.sendmail("scanner@acme.test", ["body@dest.test"], raw.encode())
    arrived = lab.find_mail(token).replace("\r\n", "\n")
    assert arrived.split("\n\n", 1)[1] == body.replace("\r\n", "\n")


def test_network_mail_arrives_without_login(lab):
    # This machine is in acme's networks: a device that cannot log in.
    sub = Submission(lab.relay_ip, 25, "none")
    token = send(sub, "scanner@acme.test", "device@dest.test")
    message = lab.find_mail(token)
    assert "ESMTPSA" not in message.split("by relay1.lab.test", 1)[0].split("Received:")[-1]


OUTSIDER = """
import json, smtplib
replies = []
for sender, rcpt in STEPS:
    s = smtplib.SMTP(RELAY, PORT, timeout=30)
    s.ehlo("outsider.test")
    m = s.docmd("MAIL", "FROM:" + sender)
    r = s.docmd("RCPT", "TO:" + rcpt) if m[0] < 400 else m
    replies.append([m[0], r[0], r[1].decode()])
    s.close()
print(json.dumps(replies))
"""

# The usual ways of sneaking a message past a relay check.
TRICKS = [
    "<victim@outside.test>",
    "<victim%outside.test@relay1.lab.test>",
    '<"victim@outside.test">',
    '<"victim@outside.test"@relay1.lab.test>',
    "<@relay1.lab.test:victim@outside.test>",
    "<outside.test!victim>",
    "<outside.test!victim@relay1.lab.test>",
    "<victim@outside.test@relay1.lab.test>",
    "<victim@[192.0.2.1]>",
    "<victim@outside.test.>",
    "<victim>",
    "<postmaster@relay1.lab.test>",
]


@pytest.mark.parametrize("port", [25, 587])
def test_outsider_cannot_relay(lab, port):
    """From mx1, which is in no tenant's networks and has no login."""
    steps = [["<outsider@outside.test>", rcpt] for rcpt in TRICKS]
    steps += [["<scanner@acme.test>", "<victim@dest.test>"]]  # a tenant's sender changes nothing
    script = f"RELAY = {lab.relay_ip!r}\nPORT = {port}\nSTEPS = {steps!r}\n" + OUTSIDER
    replies = json.loads(lab.python_on("mx1", script))
    for (sender, rcpt), (mail_code, rcpt_code, text) in zip(steps, replies, strict=True):
        assert rcpt_code >= 500, f"{sender} -> {rcpt} was accepted on {port}: {text}"
        if port == 587:
            assert mail_code == 530  # nothing happens there before STARTTLS


def test_outsider_cannot_relay_under_tls_either(lab):
    script = (
        f"RELAY = {lab.relay_ip!r}\n"
        "import smtplib, ssl\n"
        "ctx = ssl.create_default_context(); ctx.check_hostname = False\n"
        "ctx.verify_mode = ssl.CERT_NONE\n"
        "s = smtplib.SMTP(RELAY, 587, timeout=30); s.starttls(context=ctx); s.ehlo('o.test')\n"
        "s.docmd('MAIL', 'FROM:<outsider@outside.test>')\n"
        "print(s.docmd('RCPT', 'TO:<victim@dest.test>')[0])\n"
    )
    assert int(lab.python_on("mx1", script)) >= 500


@pytest.mark.parametrize(
    ("who", "sender"),
    [
        (SCANNER, "billing@globex.test"),  # another tenant's domain
        (BILLING, "scanner@acme.test"),
        (SCANNER, "someone@unowned.test"),  # nobody's domain
        (SCANNER, "scanner@sub.acme.test"),  # a subdomain is another domain
    ],
)
def test_login_cannot_send_as_another_domain(lab, who, sender):
    with connect(login_sub(lab, who)) as smtp, pytest.raises(smtplib.SMTPRecipientsRefused) as err:
        smtp.sendmail(sender, ["victim@dest.test"], b"Subject: spoof\r\n\r\nx\r\n")
    code, text = err.value.recipients["victim@dest.test"]
    assert code == 553 and b"not owned by user" in text


def test_login_may_use_any_address_of_its_domains(lab):
    token = send(login_sub(lab), "billing-reports@acme.test", "own@dest.test")
    assert lab.find_mail(token)


@pytest.mark.parametrize(
    "header_from",
    [
        "billing@globex.test",  # another tenant's domain
        '"scanner@acme.test" <ceo@globex.test>',  # a display name that looks right
        "scanner@acme.test, ceo@globex.test",  # one of two addresses foreign
    ],
)
@pytest.mark.parametrize(("port", "mode"), [(587, "starttls"), (465, "implicit")])
def test_login_cannot_use_another_domain_in_header_from(lab, header_from, port, mode):
    raw = f"From: {header_from}\r\nTo: victim@dest.test\r\nSubject: spoof\r\n\r\nx\r\n"
    sub = login_sub(lab, port=port, mode=mode)
    with connect(sub) as smtp, pytest.raises(smtplib.SMTPDataError) as err:
        smtp.sendmail("scanner@acme.test", ["victim@dest.test"], raw.encode())
    assert err.value.smtp_code == 554  # rspamd's milter refuses with 554 5.7.1 and our text
    assert b"is not a domain of login scanner@acme.test" in err.value.smtp_error


def test_login_header_from_of_own_domain_arrives(lab):
    token = uuid.uuid4().hex
    raw = (
        f'From: "Acme Billing" <billing@ACME.test>\r\nTo: own@dest.test\r\n'
        f"Subject: {token}\r\n\r\n{token}\r\n"
    )
    with connect(login_sub(lab)) as smtp:
        smtp.sendmail("scanner@acme.test", ["own@dest.test"], raw.encode())
    assert lab.find_mail(token)
