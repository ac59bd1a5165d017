"""Routes: direct to the recipients' MX, or through the smart host with the relay's own login
there; when the smart host is down the mail waits in the queue and nothing is lost."""

from __future__ import annotations

import uuid

from smtpgw.smtpclient import send

SCANNER = ("scanner@acme.test", "lab-acme-scanner-pw")
BILLING = ("billing@globex.test", "lab-globex-billing-pw")


def login_sub(lab, who):
    return lab.submission(*who)


def received(message: str) -> list[str]:
    headers = message.replace("\r\n", "\n").split("\n\n", 1)[0]
    return [
        h
        for h in headers.replace("\n\t", " ").replace("\n ", " ").split("\n")
        if h.startswith("Received:")
    ]


def test_direct_tenant_goes_straight_to_the_mx(lab):
    token = send(login_sub(lab, SCANNER), SCANNER[0], "direct@dest.test")
    hops = received(lab.find_mail(token))
    assert hops[0].startswith("Received: from relay1.lab.test") and "by mx1.lab.test" in hops[0]
    assert not any("upstream1" in h for h in hops)


def test_smarthost_tenant_goes_through_upstream_with_its_login(lab):
    token = send(login_sub(lab, BILLING), BILLING[0], "smart@dest.test")
    hops = received(lab.find_mail(token))
    # mx1 got it from upstream1, which got it from relay1 over TLS with the relay's login there.
    assert hops[0].startswith("Received: from upstream1.lab.test") and "by mx1.lab.test" in hops[0]
    assert "by upstream1.lab.test" in hops[1] and "from relay1.lab.test" in hops[1]
    assert "Authenticated sender: relay@lab.test" in hops[1]
    assert "ESMTPSA" in hops[1] and ("TLSv1.3" in hops[1] or "TLSv1.2" in hops[1])


def test_mail_waits_while_the_smarthost_is_down(lab):
    lab.exec("upstream1", "systemctl", "stop", "postfix")
    try:
        rcpt = f"queued-{uuid.uuid4().hex[:12]}@dest.test"
        token = send(login_sub(lab, BILLING), BILLING[0], rcpt)
        # Accepted, tried, deferred: it sits in the relay's queue for the smart host.
        queued, reason = lab.deferred(rcpt)
        assert queued["queue_name"] == "deferred"
        assert "upstream1.lab.test" in reason
        assert lab.mail_count(token) == 0
    finally:
        lab.exec("upstream1", "systemctl", "start", "postfix")
    lab.exec("relay1", "postqueue", "-f")
    assert token in lab.find_mail(token, timeout=120)
    assert not lab.queued_for(rcpt)
