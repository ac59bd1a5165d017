"""Sending limits over SMTP, on two relays that share redis1's counters (the cluster scenario).

Tenant `limited`: 5 messages a day, for its login and for its network (this machine, a device).
Tenant `other`: 100000 a day (so every message is counted in Redis), 3 recipients a message, and
the login capped@other.test with 2 a day of its own.
"""

from __future__ import annotations

import os
import re
import smtplib
import threading
import time
import uuid
from pathlib import Path

import pytest

from smtpgw import lab as smtpgw_lab
from smtpgw.smtpclient import Submission, connect

ROOT = Path(__file__).resolve().parents[3]
# The scenario's containers are <lab>-<host> (molecule.yml).
LAB = smtpgw_lab.Lab(os.environ.get("SMTPGW_MOLECULE_LAB", "smtpgw-cl"), root=ROOT)
CA = str(ROOT / ".lab" / "pki" / "ca.crt")
REDIS_PW = "lab-redis-counters-pw"
PASSWORDS = {
    "app@limited.test": "lab-acme-app-password",
    "bulk@other.test": "lab-acme-scanner-pw",
    "capped@other.test": "lab-globex-billing-pw",
}
DAY_TEXT = re.compile(
    r"tenant limited: 5 messages per day reached; next slot in 2[34]h\d\dm|"
    r"tenant limited: 5 messages per day reached; next slot in 24h00m"
)


def redis_cli(*args: str) -> str:
    return LAB.exec(
        "redis1", "redis-cli", "--no-auth-warning", "-a", REDIS_PW, "-h", LAB.ip("redis1"), *args
    )


def clear_counters() -> None:
    keys = redis_cli("--scan", "--pattern", "smtpgw:limits:*").split()
    if keys:
        redis_cli("DEL", *keys)


def sub(relay: str, login: str | None = None) -> Submission:
    if login is None:  # a device on the tenant's network: port 25, no login
        return Submission(LAB.ip(relay), 25, "none", timeout=30)
    return Submission(
        LAB.ip(relay),
        587,
        "starttls",
        server_name=f"{relay}.lab.test",
        cafile=CA,
        login=login,
        password=PASSWORDS[login],
        timeout=30,
    )


def message(sender: str, rcpts: list[str], token: str) -> str:
    return (
        f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: {token}\r\n"
        f"Message-ID: <{token}@smtpgw.test>\r\nX-Token: {token}\r\n\r\nbody {token}\r\n"
    )


def try_send(relay: str, login: str | None, sender: str, rcpts: list[str] | None = None):
    """Send one message; returns (token, None) when accepted, else (token, (code, text))
    of the first refusal (at RCPT, at the end of DATA)."""
    token = f"lim-{uuid.uuid4().hex}"
    rcpts = rcpts or [f"{token}@dest.test"]
    with connect(sub(relay, login)) as smtp:
        code, reply = smtp.mail(sender)
        assert code == 250, reply
        refused = None
        accepted = []
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            if code == 250:
                accepted.append(rcpt)
            elif refused is None:
                refused = (code, reply.decode())
        if not accepted:
            smtp.rset()
            return token, refused
        code, reply = smtp.data(message(sender, rcpts, token))
        if code != 250:
            return token, (code, reply.decode())
    return token, refused


def open_message(relay: str, login: str | None, sender: str, token: str):
    """A session with MAIL and one RCPT accepted (the look at the counters passed); the caller
    sends DATA and closes it."""
    smtp = connect(sub(relay, login))
    smtp.__enter__()
    code, reply = smtp.mail(sender)
    assert code == 250, reply
    code, reply = smtp.rcpt(f"{token}@dest.test")
    assert code == 250, reply
    return smtp


def test_a_day_limit_holds_across_relays_logins_and_devices():
    clear_counters()
    plan = [
        ("relay1", "app@limited.test"),
        ("relay2", "app@limited.test"),
        ("relay1", None),
        ("relay2", None),
    ]
    tokens = []
    for relay, login in plan:
        token, refused = try_send(relay, login, "app@limited.test")
        assert refused is None, (relay, login, refused)
        tokens.append(token)
    # One slot left, two messages at once, one on each relay: both pass the look at RCPT; the
    # count at the end of DATA (rspamd's, in redis1) takes one and defers the other.
    racers = {relay: f"lim-{uuid.uuid4().hex}" for relay in ("relay1", "relay2")}
    sessions = {
        r: open_message(r, "app@limited.test", "app@limited.test", t) for r, t in racers.items()
    }
    ends = {}
    for relay, token in racers.items():
        ends[relay] = sessions[relay].data(
            message("app@limited.test", [f"{token}@dest.test"], token)
        )
        sessions[relay].__exit__(None, None, None)
    assert ends["relay1"][0] == 250, ends
    code, text = ends["relay2"][0], ends["relay2"][1].decode()
    assert code == 451 and text.startswith("4.7.1 "), ends
    assert DAY_TEXT.search(text), text
    assert not LAB.mail_files(racers["relay2"])
    tokens.append(racers["relay1"])
    for token in tokens:
        LAB.find_mail(token)
    # The sixth: refused at RCPT on either relay, to the login and to the device, with the
    # limit's text.
    for relay, login in (
        ("relay1", "app@limited.test"),
        ("relay2", None),
        ("relay2", "app@limited.test"),
    ):
        token, refused = try_send(relay, login, "app@limited.test")
        assert refused is not None, (relay, login)
        code, text = refused
        assert code == 452 and text.startswith("4.7.1 "), refused
        assert DAY_TEXT.search(text), text
        assert not LAB.mail_files(token)
    # Another tenant on the same relays sends on.
    for relay in ("relay1", "relay2"):
        token, refused = try_send(relay, "bulk@other.test", "bulk@other.test")
        assert refused is None, refused
        LAB.find_mail(token)


def test_limits_show(monkeypatch, capsys):
    import json

    from smtpgw import cli

    monkeypatch.setenv("SMTPGW_LAB_NAME", LAB.name)
    assert cli.main(["limits", "show", "limited", "--json", "--relay", "relay2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {
            "kind": "tenant",
            "name": "limited",
            "tenant": "limited",
            "sent_day": 5,
            "limit_day": 5,
            "left_day": 0,
            "sent_hour": 5,
            "limit_hour": None,
            "left_hour": None,
            "recipients_per_message": 50,
        }
    ]
    assert cli.main(["limits", "show", "other", "--relay", "relay1"]) == 0
    table = capsys.readouterr().out
    assert "login capped@other.test" in table and "tenant other" in table, table


def test_recipients_over_the_limit_are_refused_at_rcpt():
    token = f"lim-{uuid.uuid4().hex}"
    rcpts = [f"{token}-{i}@dest.test" for i in range(5)]
    with connect(sub("relay1", "bulk@other.test")) as smtp:
        smtp.mail("bulk@other.test")
        replies = [smtp.rcpt(r) for r in rcpts]
        assert [c for c, _ in replies] == [250, 250, 250, 550, 550], replies
        text = replies[3][1].decode()
        assert text.startswith("5.5.3 "), text
        assert text.endswith(
            "Recipient address rejected: tenant other: at most 3 recipients per message"
        )
        code, _ = smtp.data(message("bulk@other.test", rcpts, token))
        assert code == 250
    arrived = LAB.find_mail(token)
    delivered = LAB.exec("mx1", "sh", "-c", f"grep -rl 'X-Token: {token}' {smtpgw_lab.MAILDIR}")
    assert len(delivered.split()) == 3, arrived


def script_calls() -> int:
    """The counter script's runs in redis1 (EVALSHA, and EVAL when Redis had lost it)."""
    stats = redis_cli("INFO", "commandstats")
    found = re.findall(r"^cmdstat_eval(?:sha)?:calls=(\d+),", stats, re.MULTILINE)
    return sum(int(n) for n in found)


def test_far_below_its_limits_a_message_costs_one_redis_round_trip():
    """`other` (100000 a day) is far below its limit: the policy service's look at the first
    RCPT rests on its last look (under 10 s old), so only rspamd's count at the end of DATA asks
    Redis; at most the first message's look does too (when relay1's last look at `other` is over
    10 s old). Every message is counted."""
    before = int(redis_cli("ZCARD", "smtpgw:limits:tenant:other"))
    calls = script_calls()
    token = f"lim-{uuid.uuid4().hex}"
    with connect(sub("relay1", "bulk@other.test")) as smtp:
        for i in range(6):
            rcpt = f"{token}-{i}@dest.test"
            smtp.sendmail("bulk@other.test", [rcpt], message("bulk@other.test", [rcpt], token))
    assert script_calls() - calls <= 7
    assert int(redis_cli("ZCARD", "smtpgw:limits:tenant:other")) == before + 6
    LAB.find_mail(token)


def test_a_login_has_a_limit_of_its_own():
    redis_cli("DEL", "smtpgw:limits:login:capped@other.test")
    for relay in ("relay1", "relay2"):
        token, refused = try_send(relay, "capped@other.test", "capped@other.test")
        assert refused is None, refused
        LAB.find_mail(token)
    token, refused = try_send("relay1", "capped@other.test", "capped@other.test")
    assert refused and refused[0] == 452, refused
    assert "login capped@other.test: 2 messages per day reached" in refused[1]
    # The tenant's other login is not held by it.
    token, refused = try_send("relay1", "bulk@other.test", "bulk@other.test")
    assert refused is None, refused


def rspamd_log_size(relay: str) -> int:
    return int(LAB.exec(relay, "stat", "-c", "%s", "/var/log/rspamd/rspamd.log").strip())


def reports(relay: str, since: str, rspamd_from: int) -> tuple[str, str]:
    """What the policy service (journal since `since`) and rspamd (its log from byte
    `rspamd_from`) logged on `relay`."""
    policy = LAB.exec(
        relay, "journalctl", "-u", "smtpgw-policy", "--since", since, "--no-pager", "-o", "cat"
    )
    rspamd = LAB.exec(relay, "tail", "-c", f"+{rspamd_from + 1}", "/var/log/rspamd/rspamd.log")
    return policy, rspamd


UNAVAILABLE = "sending limits unavailable; try again later"


def test_redis_down_defers_and_counting_resumes():
    relays = ("relay1", "relay2")
    before, refused = try_send("relay1", "bulk@other.test", "bulk@other.test")
    assert refused is None
    since = "@" + LAB.exec("relay1", "date", "+%s").strip()
    logged_from = {relay: rspamd_log_size(relay) for relay in relays}
    # A message past RCPT when Redis stops: rspamd's count at the end of DATA cannot count it,
    # so it is deferred (fail_closed), not taken uncounted.
    token = f"lim-{uuid.uuid4().hex}"
    smtp = open_message("relay1", "bulk@other.test", "bulk@other.test", token)
    LAB.exec("redis1", "systemctl", "stop", "redis-server")
    try:
        code, reply = smtp.data(message("bulk@other.test", [f"{token}@dest.test"], token))
        smtp.__exit__(None, None, None)
        assert code == 451 and reply.decode() == f"4.7.1 {UNAVAILABLE}", (code, reply)
        # Every later message, on either relay: deferred, at RCPT (the policy service's look,
        # 4.3.0) or at the end of DATA (rspamd's count, 4.7.1).
        for relay in relays:
            for _ in range(2):
                token, refused = try_send(relay, "bulk@other.test", "bulk@other.test")
                assert refused is not None and refused[0] == 451, refused
                assert refused[1] in (f"4.3.0 {UNAVAILABLE}", f"4.7.1 {UNAVAILABLE}"), refused
        # One report a minute from each of them, whichever met the failure.
        for relay in relays:
            policy, rspamd = reports(relay, since, logged_from[relay])
            counts = (policy.count("Redis unreachable"), rspamd.count("Redis unreachable"))
            assert max(counts) <= 1 and sum(counts) >= 1, (relay, policy, rspamd)
        assert (
            "smtpgw limits: Redis unreachable" in reports("relay1", since, logged_from["relay1"])[1]
        )
    finally:
        LAB.exec("redis1", "systemctl", "start", "redis-server")
    # What was accepted before arrives; after Redis is back (and has lost the counter script),
    # mail is taken and counted again on both relays.
    LAB.find_mail(before)
    for relay in relays:
        count_before = int(redis_cli("ZCARD", "smtpgw:limits:tenant:other"))
        deadline = time.monotonic() + 30
        while True:
            token, refused = try_send(relay, "bulk@other.test", "bulk@other.test")
            if refused is None or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert refused is None, refused
        LAB.find_mail(token)
        assert int(redis_cli("ZCARD", "smtpgw:limits:tenant:other")) == count_before + 1
        policy, rspamd = reports(relay, since, logged_from[relay])
        assert "Redis reachable again" in policy + rspamd, (relay, policy, rspamd)
    assert (
        "smtpgw limits: Redis reachable again" in reports("relay1", since, logged_from["relay1"])[1]
    )


# Run in a lab host: connect to Redis's port and say PING; prints what came of it.
REDIS_PROBE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 6379), timeout=5) as s:
        s.sendall(b"PING\\r\\n")
        print("answered", s.recv(100).decode().strip())
except OSError as exc:
    print("refused", type(exc).__name__)
"""


def redis_probe(host: str) -> str:
    return LAB.exec(host, "python3", "-c", REDIS_PROBE, LAB.ip("redis1")).strip()


def test_redis_answers_the_relays_only():
    # The relays reach it (and must log in); the other lab hosts get a TCP reset.
    for relay in ("relay1", "relay2"):
        assert redis_probe(relay).startswith("answered -NOAUTH"), relay
    for other in ("mx1", "dns1"):
        assert redis_probe(other) == "refused ConnectionRefusedError", other
    # It is the role's table that refuses them: without it mx1 reaches Redis; the unit's
    # reload puts it back.
    LAB.exec("redis1", "nft", "delete", "table", "inet", "smtpgw_redis")
    try:
        assert redis_probe("mx1").startswith("answered -NOAUTH")
    finally:
        LAB.exec("redis1", "systemctl", "reload", "smtpgw-redis-firewall")
    assert redis_probe("mx1") == "refused ConnectionRefusedError"
    assert redis_probe("relay2").startswith("answered -NOAUTH")


@pytest.mark.skipif(not os.environ.get("MOLECULE_INVENTORY_FILE"), reason="runs under Molecule")
def test_a_redis_address_that_is_not_an_address_fails_before_any_change():
    inventory = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
    run = smtpgw_lab.run_playbook(
        ROOT / "playbooks" / "site.yml",
        inventory,
        "-e",
        "relay_redis_host=redis1.lab.test",
        env={
            "SMTPGW_TENANTS_DIR": str(Path(__file__).resolve().parents[1] / "tenants"),
            "ANSIBLE_DISPLAY_OK_HOSTS": "false",
        },
    )
    assert run.rc != 0
    assert "relay_redis_host must be an IP address" in run.output, run.output[-3000:]
    assert "'redis1.lab.test'" in run.output
    assert run.changed_tasks == [], run.changed_tasks


ROLLING_COUNT = 500
ROLLING_SENDERS = 5
ROLLING_PER_SESSION = 10


def _send_many(count: int, offset: int, tokens: list[str], errors: list[str], pace: float):
    """Send `count` messages over both relays in sessions of ROLLING_PER_SESSION, as a client does:
    a 4xx or a lost connection is retried (the same message, the same token) on the other relay;
    a message counts as sent once the relay answered 250 to its DATA."""
    pending = [f"roll-{uuid.uuid4().hex}" for _ in range(count)]
    relays = ["relay1", "relay2"]
    attempts = 0
    while pending and attempts < 200:
        relay = relays[(offset + attempts) % 2]
        attempts += 1
        try:
            with connect(sub(relay, "bulk@other.test")) as smtp:
                for _ in range(ROLLING_PER_SESSION):
                    if not pending:
                        break
                    token = pending[0]
                    rcpt = f"{token}@dest.test"
                    smtp.sendmail(
                        "bulk@other.test", [rcpt], message("bulk@other.test", [rcpt], token)
                    )
                    tokens.append(pending.pop(0))
                    time.sleep(pace)
        except (smtplib.SMTPException, OSError):
            time.sleep(0.5)
    errors += pending


@pytest.mark.skipif(not os.environ.get("MOLECULE_INVENTORY_FILE"), reason="runs under Molecule")
def test_rolling_site_run_loses_nothing():
    tokens: list[str] = []
    errors: list[str] = []
    # Spread over about a minute, while the run changes relay1, then relay2.
    each = ROLLING_COUNT // ROLLING_SENDERS
    senders = [
        threading.Thread(target=_send_many, args=(each, i, tokens, errors, 0.6))
        for i in range(ROLLING_SENDERS)
    ]
    for sender in senders:
        sender.start()
    inventory = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
    # A change to main.cf, so that each relay (one at a time) is reloaded while mail comes in.
    size = int(LAB.exec("relay1", "postconf", "-h", "message_size_limit"))
    run = smtpgw_lab.run_playbook(
        ROOT / "playbooks" / "site.yml",
        inventory,
        "-e",
        f"relay_message_size_limit={size + 1 if size % 2 == 0 else size - 1}",
        env={
            "SMTPGW_TENANTS_DIR": str(Path(__file__).resolve().parents[1] / "tenants"),
            "ANSIBLE_DISPLAY_OK_HOSTS": "false",
        },
    )
    for sender in senders:
        sender.join(timeout=600)
    assert run.rc == 0, run.output[-3000:]
    assert run.changed.get(LAB.container("relay1")) and run.changed.get(LAB.container("relay2")), (
        run.changed
    )
    assert not errors
    assert len(tokens) == ROLLING_COUNT
    deadline = time.monotonic() + 120
    while True:
        found = LAB.exec(
            "mx1",
            "sh",
            "-c",
            f"grep -rhoE '^X-Token: roll-[0-9a-f]+' {smtpgw_lab.MAILDIR} || true",
        ).split()
        seen = [t for t in found if t.startswith("roll-")]
        if len(seen) >= ROLLING_COUNT or time.monotonic() > deadline:
            break
        time.sleep(2)
    counts: dict[str, int] = {}
    for t in seen:
        counts[t] = counts.get(t, 0) + 1
    assert all(counts.get(t) == 1 for t in tokens), {
        t: counts.get(t, 0) for t in tokens if counts.get(t) != 1
    }
