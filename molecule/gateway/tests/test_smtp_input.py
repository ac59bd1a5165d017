"""What clients send that a relay must not misread: SMTP smuggling (a DATA ended early by a bare
<CR> or <LF>, the rest read as commands), and the relay's log staying free of warnings while
ordinary mail goes through every port."""

from __future__ import annotations

import smtplib
import time
import uuid

import pytest

from smtpgw.smtpclient import Submission, connect, send

SCANNER = ("scanner@acme.test", "lab-acme-scanner-pw")

# The end-of-DATA look-alikes of SMTP smuggling: only <CR><LF>.<CR><LF> may end DATA.
VARIANTS = {
    "LF.LF": "\n.\n",
    "LF.CRLF": "\n.\r\n",
    "CRLF.LF": "\r\n.\n",
    "CR.CR": "\r.\r",
    "CR.CRLF": "\r.\r\n",
    "CRLF.CR": "\r\n.\r",
    "LF.CR": "\n.\r",
}


def smuggle(smtp: smtplib.SMTP, token: str, variant: str) -> tuple[int, bytes]:
    """DATA whose body hides `variant` and a second envelope, sent byte for byte (smtplib's own
    data() would turn every bare <CR> and <LF> into <CR><LF>); returns the reply to the DATA."""
    code, reply = smtp.docmd("DATA")
    assert code == 354, reply
    payload = (
        f"From: scanner@acme.test\r\nTo: first@dest.test\r\nSubject: first {token}\r\n\r\n"
        f"first body {token}"
        f"{variant}"
        "MAIL FROM:<scanner@acme.test>\r\n"
        "RCPT TO:<smuggled@dest.test>\r\n"
        "DATA\r\n"
        f"From: scanner@acme.test\r\nTo: smuggled@dest.test\r\nSubject: smuggled {token}\r\n\r\n"
        f"smuggled body {token}\r\n"
        ".\r\n"
    )
    smtp.send(payload.encode())
    return smtp.getreply()


def open_session(lab, port: int) -> smtplib.SMTP:
    if port == 25:  # this machine is in acme's networks: a device, no login
        return connect(Submission(lab.relay_ip, 25, "none"))
    return connect(lab.submission(*SCANNER, port=port))


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
@pytest.mark.parametrize("port", [587, 25])
def test_bare_cr_lf_do_not_end_data(lab, port, variant):
    token = uuid.uuid4().hex
    with open_session(lab, port) as smtp:
        smtp.mail("scanner@acme.test")
        smtp.rcpt("first@dest.test")
        code, reply = smuggle(smtp, token, VARIANTS[variant])
        assert code == 250, reply
        # Had DATA ended early, the replies to the smuggled commands would be waiting here.
        smtp.sock.settimeout(2)
        with pytest.raises((TimeoutError, smtplib.SMTPServerDisconnected)):
            extra = smtp.getreply()
            pytest.fail(f"the relay answered commands hidden in the body: {extra}")
    arrived = lab.find_mail(token)
    time.sleep(2)  # a second message, had there been one, would be on its way by now
    assert lab.mail_count(token) == 1, "the hidden envelope became a message of its own"
    body = arrived.replace("\r", "\n").split("\n\n", 1)[1]
    assert f"smuggled body {token}" in body
    assert "RCPT TO:<smuggled@dest.test>" in body


def test_no_warnings_in_the_log_while_mail_goes_through(lab):
    """Mail through 25, 587 and 465 logs no warning (port 25 used to warn on every message that
    reject_authenticated_sender_login_mismatch has no SASL there)."""
    since = lab.exec("relay1", "date", "+%s").strip()
    tokens = [
        send(Submission(lab.relay_ip, 25, "none"), "scanner@acme.test", "quiet@dest.test"),
        send(lab.submission(*SCANNER, port=587), "scanner@acme.test", "quiet@dest.test"),
        send(
            lab.submission(*SCANNER, port=465, mode="implicit"),
            "scanner@acme.test",
            "quiet@dest.test",
        ),
    ]
    for token in tokens:
        lab.find_mail(token)
    log = lab.exec(
        "relay1",
        "journalctl",
        "--no-pager",
        "-q",
        "-o",
        "cat",
        "--since",
        f"@{since}",
        "SYSLOG_FACILITY=2",
    )
    assert "status=sent" in log, "the relay's mail log is not where this test reads it"
    warnings = [line for line in log.splitlines() if "warning:" in line]
    assert not warnings, "\n".join(warnings)
