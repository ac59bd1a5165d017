"""lab_mx, verified from outside the container: SMTP in over the network, the mail kept."""

from __future__ import annotations

import smtplib
import uuid


def test_accepts_and_keeps_mail(host, ips):
    token = uuid.uuid4().hex
    with smtplib.SMTP(ips["smtpgw-default-mx1"], 25, timeout=30) as smtp:
        smtp.ehlo("tester.test")
        assert smtp.has_extn("starttls")
        smtp.sendmail(
            "sender@example.test",
            ["someone@dest.test"],
            f"Subject: {token}\r\n\r\nbody {token}\r\n",
        )
    found = host.run("grep -rl --include='*' %s /var/mail/lab/Maildir/new/", token)
    for _ in range(50):
        if found.rc == 0:
            break
        found = host.run("sleep 0.2; grep -rl %s /var/mail/lab/Maildir/new/", token)
    assert found.rc == 0, "the message did not arrive in the Maildir"
    assert f"body {token}" in host.file(found.stdout.split()[0]).content_string


def test_postfix_enabled(host):
    assert host.service("postfix").is_enabled
    assert host.service("postfix").is_running
