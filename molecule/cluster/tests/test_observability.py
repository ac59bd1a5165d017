"""Metrics, health and the mail-flow log on the relays the role deployed (the cluster scenario).

From this machine (in relay_metrics_allowed, see inventories/lab/group_vars/relays) over HTTP:
GET /metrics and GET /health on each relay's port 9155. Tenant `other` goes direct to the MX
(mx1), tenant `routed` through the smart host upstream1, which the tests stop to make mail wait.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from smtpgw import cli
from smtpgw import lab as smtpgw_lab
from smtpgw.smtpclient import Submission, connect

ROOT = Path(__file__).resolve().parents[3]
LAB = smtpgw_lab.Lab(os.environ.get("SMTPGW_MOLECULE_LAB", "smtpgw-cl"), root=ROOT)
CA = str(ROOT / ".lab" / "pki" / "ca.crt")
PORT = 9155
LOGINS = {"bulk@other.test": "lab-acme-scanner-pw", "app@routed.test": "lab-acme-app-password"}


def get(relay: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{LAB.ip(relay)}:{PORT}{path}", timeout=15) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(relay: str, name: str, **labels: str) -> float:
    status, text = get(relay, "/metrics")
    assert status == 200, text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not want and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in the metrics of {relay}")


def wait_for(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(1)


def send(relay: str, login: str, token: str) -> str:
    """One message (Message-ID <token@smtpgw.test>) to token@dest.test; the relay's queue id."""
    sub = Submission(
        LAB.ip(relay),
        587,
        "starttls",
        server_name=f"{relay}.lab.test",
        cafile=CA,
        login=login,
        password=LOGINS[login],
        timeout=30,
    )
    rcpt = f"{token}@dest.test"
    body = (
        f"From: <{login}>\r\nTo: <{rcpt}>\r\nSubject: {token}\r\n"
        f"Message-ID: <{token}@smtpgw.test>\r\n\r\nbody {token}\r\n"
    )
    with connect(sub) as smtp:
        assert smtp.mail(login)[0] == 250
        assert smtp.rcpt(rcpt)[0] == 250
        code, reply = smtp.data(body)
    assert code == 250, reply
    return re.search(rb"queued as (\w+)", reply).group(1).decode()


def inventory() -> Path:
    if os.environ.get("MOLECULE_INVENTORY_FILE"):
        return Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
    pytest.skip("runs under Molecule (its inventory)")


def test_delivered_count_goes_up_by_the_messages_sent():
    before = {
        r: metric("relay1", "smtpgw_messages_total", tenant="other", result=r)
        for r in ("accepted", "delivered", "bounced")
    }
    removed = metric("relay1", "postfix_qmgr_messages_removed_total")
    tokens = [f"obs-{uuid.uuid4().hex}" for _ in range(3)]
    for token in tokens:
        send("relay1", "bulk@other.test", token)
    for token in tokens:
        LAB.find_mail(token)
    wait_for(
        "delivered count of tenant other",
        lambda: (
            metric("relay1", "smtpgw_messages_total", tenant="other", result="delivered")
            >= before["delivered"] + 3
        ),
        30,
    )
    time.sleep(2)  # nothing more comes in late
    after = {r: metric("relay1", "smtpgw_messages_total", tenant="other", result=r) for r in before}
    assert after == {k: v + (0 if k == "bounced" else 3) for k, v in before.items()}
    # The same endpoint passes on Debian's Postfix exporter (its qmgr counts the same messages)
    # and rspamd's controller.
    wait_for(
        "the Postfix exporter's removed count",
        lambda: metric("relay1", "postfix_qmgr_messages_removed_total") == removed + 3,
        30,
    )
    _status, text = get("relay1", "/metrics")
    assert 'smtpgw_source_up{source="postfix_exporter"} 1' in text
    assert 'smtpgw_source_up{source="rspamd"} 1' in text
    assert re.search(r'^rspamd_build_info\{version="[\d.]+"\} 1$', text, re.M), text[-2000:]


def test_the_metrics_port_refuses_a_client_not_allowed():
    # This machine is allowed (the other tests read it); mx1 is not: a TCP reset, at once.
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(('{LAB.ip('relay1')}', {PORT}), 5).close(); print('open')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except OSError as e: print('other', e)\n"
    )
    assert LAB.exec("mx1", "python3", "-c", probe).strip() == "refused"
    with socket.create_connection((LAB.ip("relay1"), PORT), 5):
        pass
    # and the relay itself asks its own /health (smtpgw health does) over the loopback
    out = LAB.exec(
        "relay1",
        "python3",
        "/usr/local/lib/smtpgw/metrics.py",
        "health",
        "/etc/smtpgw/metrics.json",
        check=False,
    )
    assert out.startswith(("healthy: ", "unhealthy: ")), out


def test_smart_host_down_defers_and_health_follows_the_queue():
    wait_for("relay2 healthy at the start", lambda: get("relay2", "/health")[0] == 200, 60)
    deferred = metric("relay2", "smtpgw_messages_total", tenant="routed", result="deferred")
    delivered = metric("relay2", "smtpgw_messages_total", tenant="routed", result="delivered")
    token = f"obs-{uuid.uuid4().hex}"
    LAB.exec("upstream1", "systemctl", "stop", "postfix")
    try:
        qid = send("relay2", "app@routed.test", token)
        wait_for(
            "a deferral of tenant routed in the metrics",
            lambda: (
                metric("relay2", "smtpgw_messages_total", tenant="routed", result="deferred")
                > deferred
            ),
            30,
        )
        assert metric("relay2", "smtpgw_tenant_queued_messages", tenant="routed") >= 1
        _status, reason = wait_for(
            "relay2 unhealthy",
            lambda: (r := get("relay2", "/health"))[0] == 503 and r,
            60,
        )
        assert reason.startswith("unhealthy: oldest message in the queue is"), reason
        assert "limit 20 s" in reason and "Connection refused" in reason, reason
        assert metric("relay2", "smtpgw_queue_oldest_message_age_seconds") > 20
        if os.environ.get("MOLECULE_INVENTORY_FILE"):
            assert cli.main(["health", str(inventory())]) == 1
    finally:
        LAB.exec("upstream1", "systemctl", "start", "postfix")
    LAB.exec("relay2", "postqueue", "-f")
    LAB.find_mail(token)
    wait_for("relay2 healthy again", lambda: get("relay2", "/health")[0] == 200, 60)

    # The queue (read directly) can empty before the service has read the delivery's log line
    # from the journal: wait for the count, then it must be exactly one more.
    def delivered_now() -> float:
        return metric("relay2", "smtpgw_messages_total", tenant="routed", result="delivered")

    try:
        wait_for("the delivery in the metrics", lambda: delivered_now() > delivered, 30)
    except AssertionError as exc:
        seen = LAB.exec("relay2", "journalctl", "-t", "smtpgw-mail", "--no-pager", check=False)
        service = LAB.exec("relay2", "systemctl", "status", "smtpgw-metrics", check=False)
        raise AssertionError(f"{exc}\n{seen[-3000:]}\n{service[-1500:]}") from None
    assert delivered_now() == delivered + 1
    assert metric("relay2", "smtpgw_tenant_queued_messages", tenant="routed") == 0
    # Its hops: the deferred attempts and the delivery through upstream1, by the relay's queue id.
    if os.environ.get("MOLECULE_INVENTORY_FILE"):
        hops = trace_json(qid)
        assert {h["result"] for h in hops} == {"deferred", "delivered"}, hops
        last = hops[-1]
        assert last["relay"].endswith("relay2") and last["tenant"] == "routed"
        assert last["route"].startswith("smtp upstream1.lab.test[") and last["queued_as"], last


def trace_json(ident: str) -> list[dict]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["trace", ident, str(inventory()), "--json"]) == 0
    return json.loads(out.getvalue())


def test_trace_finds_a_message_sent_through_relay2_by_its_message_id():
    inventory()
    token = f"obs-{uuid.uuid4().hex}"
    qid = send("relay2", "bulk@other.test", token)
    LAB.find_mail(token)
    hops = wait_for("the hop in relay2's log", lambda: trace_json(f"<{token}@smtpgw.test>"), 20)
    assert len(hops) == 1, hops
    hop = hops[0]
    assert hop["relay"] == LAB.container("relay2") and hop["queue_id"] == qid
    assert hop["tenant"] == "other" and hop["result"] == "delivered" and hop["dsn"] == "2.0.0"
    assert hop["sender"] == "bulk@other.test" and hop["recipient"] == f"{token}@dest.test"
    assert f"[{LAB.ip('mx1')}]:25" in hop["route"], hop
    # The next hop's queue id is mx1's own for this message (mx1 logs to /var/log/postfix.log).
    mx_log = LAB.exec("mx1", "grep", "-F", f"{hop['queued_as']}: ", "/var/log/postfix.log")
    assert f"message-id=<{token}@smtpgw.test>" in mx_log, mx_log
