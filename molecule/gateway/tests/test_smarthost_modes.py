"""Smart hosts through each door a provider offers, as the lab's upstream1 offers them: 587
with STARTTLS and a login (the m365 preset), 465 with implicit TLS and a login, and 25 with TLS
and no login, where upstream1 recognises the relay by its client certificate (the m365-connector
preset with auth: certificate). Each tenant of this scenario routes through one (tenants/), and
the relay verifies upstream1's certificate against the smart host's name; under a name the
certificate does not carry (upstream1-wrongname) the mail waits in the queue and says why.
"""

from __future__ import annotations

import re
import uuid

import pytest

from smtpgw.smtpclient import send

# tenant login, its smart host's port, the relay's transport (master.cf), how upstream1 took it
DOORS = {
    "587-starttls-login": ("billing@globex.test", "lab-globex-billing-pw", 587, "smtp", "ESMTPSA"),
    "465-implicit-login": ("app@umbrella.test", "lab-umbrella-app-pw", 465, "smtps", "ESMTPSA"),
    "25-certificate": ("app@soylent.test", "lab-soylent-app-pw", 25, "smtpcert", "ESMTPS"),
}


def headers(message: str) -> str:
    return message.replace("\r\n", "\n").split("\n\n", 1)[0].replace("\n\t", " ")


def relay_journal(lab) -> list[str]:
    """The relay's recent log lines (the journal)."""
    return lab.exec("relay1", "journalctl", "--no-pager", "--since", "-10min").splitlines()


@pytest.mark.parametrize("door", sorted(DOORS))
def test_mail_goes_through_each_door_with_the_name_verified(lab, door):
    login, password, port, transport, received_with = DOORS[door]
    token = send(lab.submission(login, password), login, "doors@dest.test")
    text = headers(lab.find_mail(token))
    hops = [h for h in text.split("\n") if h.startswith("Received:")]
    # mx1 got it from upstream1, which got it from relay1.
    assert hops[0].startswith("Received: from upstream1.lab.test") and "by mx1.lab.test" in hops[0]
    assert "from relay1.lab.test" in hops[1] and "by upstream1.lab.test" in hops[1]
    assert f"with {received_with} id" in hops[1]
    if port == 25:
        # No login; upstream1 verified the relay's certificate and knew it by its fingerprint.
        assert "Authenticated sender" not in hops[1]
        assert '(Client CN "relay1.lab.test", Issuer "smtpgw lab CA" (verified OK))' in hops[1]
    else:
        assert "(Authenticated sender: relay@lab.test)" in hops[1]
    # The relay's side: the transport of the door, to the door's port, TLS verified by name.
    queue_id = re.search(r"by relay1\.lab\.test \(Postfix\) with ESMTPSA id (\w+)", hops[2])[1]
    journal = relay_journal(lab)
    (sent,) = [line for line in journal if f"{queue_id}: to=<" in line]
    assert ("postfix/smtp[" if transport == "smtp" else f"postfix/{transport}/smtp[") in sent
    assert "relay=upstream1.lab.test[" in sent and f"]:{port}," in sent and "status=sent" in sent
    # The same smtp process had verified upstream1's certificate against the name.
    process = re.search(r"(postfix/[\w/]+\[\d+\]):", sent)[1]
    assert any(
        f"{process}: Verified TLS connection established to upstream1.lab.test[" in line
        and f"]:{port}:" in line
        for line in journal
    ), [line for line in journal if process in line]


def test_a_wrong_name_on_the_certificate_defers_and_says_why(lab):
    rcpt = f"wrongname-{uuid.uuid4().hex[:12]}@dest.test"
    token = send(lab.submission("app@wayne.test", "lab-wayne-app-pw"), "app@wayne.test", rcpt)
    try:
        queued, reason = lab.deferred(rcpt)
        assert queued["queue_name"] == "deferred"
        assert reason == "Server certificate not verified"
        log = "\n".join(relay_journal(lab))
        assert re.search(
            r"server certificate verification failed for upstream1-alias\.lab\.test\[[\d.]+\]:587: "
            r"num=62:hostname mismatch",
            log,
        ), log[-2000:]
        assert lab.mail_count(token) == 0
    finally:
        for message in lab.queued_for(rcpt):
            lab.exec("relay1", "postsuper", "-d", message["queue_id"])
