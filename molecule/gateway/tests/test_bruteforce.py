"""Brute force: many wrong passwords from one address are slowed (Dovecot) and then refused
(Postfix's AUTH rate limit), each failure logged with the client's address, while a good login
from another address goes through at the same moment."""

from __future__ import annotations

import json
import smtplib
import statistics
import threading
import time

from smtpgw.smtpclient import connect

ATTEMPTS = 50
GOOD = ("scanner@acme.test", "lab-acme-scanner-pw")

# Runs on upstream1, which is in no tenant's networks: ATTEMPTS sessions on 465 (10 at a time),
# each one AUTH PLAIN with another wrong password; prints the reply and time of each.
ATTACK = """
import base64, json, socket, ssl, time
from concurrent.futures import ThreadPoolExecutor

ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE

def attempt(i):
    start = time.monotonic()
    try:
        with socket.create_connection(("{relay}", 465), timeout=30) as raw:
            with ctx.wrap_socket(raw) as tls:
                f = tls.makefile("rb")
                def reply():
                    while True:
                        line = f.readline()
                        if not line:
                            raise ConnectionError("closed by the relay")
                        if line[3:4] != b"-":
                            return line.decode(errors="replace").strip()
                reply()
                tls.sendall(b"EHLO attacker.test\\r\\n")
                reply()
                secret = base64.b64encode(b"\\0scanner@acme.test\\0wrong-%d" % i).decode()
                tls.sendall(b"AUTH PLAIN " + secret.encode() + b"\\r\\n")
                answer = reply()
                tls.sendall(b"QUIT\\r\\n")
    except Exception as exc:
        answer = "error " + repr(exc)
    return {{"i": i, "reply": answer, "seconds": time.monotonic() - start}}

with ThreadPoolExecutor(10) as pool:
    print(json.dumps(list(pool.map(attempt, range({attempts})))))
"""


def good_login(lab) -> float:
    """Seconds a good login on 587 from this machine takes (it must succeed)."""
    start = time.monotonic()
    with connect(lab.submission(*GOOD)):
        pass
    return time.monotonic() - start


def test_repeated_wrong_passwords_slowed_then_refused_others_unaffected(lab):
    setting = lab.exec("relay1", "postconf", "-hP", "465/inet/smtpd_client_auth_rate_limit")
    limit = int(setting.strip() or 0)  # 0: none
    attacker = lab.hosts.ip("upstream1")
    # A good login first: it also clears any penalty this machine's address has from other tests.
    deadline = time.monotonic() + 60
    while True:
        try:
            good_login(lab)
            break
        except smtplib.SMTPAuthenticationError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)

    since = time.time() - 1
    out: dict[str, str] = {}
    attack = threading.Thread(
        target=lambda: out.update(
            json=lab.python_on("upstream1", ATTACK.format(relay=lab.relay_ip, attempts=ATTEMPTS))
        )
    )
    attack.start()
    time.sleep(5)  # the attack is under way: its first failures are in, the penalty is growing
    during = good_login(lab)
    still_running = attack.is_alive()
    attack.join(timeout=150)
    assert not attack.is_alive(), "the attack did not finish in time"
    results = json.loads(out["json"])

    assert len(results) == ATTEMPTS
    assert not [r for r in results if r["reply"].startswith("235")], "a wrong password got in"
    refused = [r for r in results if r["reply"].startswith("450 4.7.1")]
    failed = [r for r in results if r["reply"][:3] in ("535", "454")]
    assert len(refused) + len(failed) == ATTEMPTS, [r["reply"] for r in results]
    # Refused: the AUTH commands beyond the limit, answered at once.
    assert refused, f"none of {ATTEMPTS} AUTH commands refused (limit: {limit or 'none'})"
    assert len(refused) >= ATTEMPTS - limit, f"{len(refused)} refused, limit {limit}"
    assert "too many AUTH commands" in refused[0]["reply"], refused[0]
    assert statistics.median(r["seconds"] for r in refused) < 2
    # Slowed: a failure waits for Dovecot's auth_failure_delay (2 s, flushed on a 2 s timer, so
    # 0-2 s), later ones for its penalty too (4, 8, 15 s; Postfix gives up after about 10 s: 454).
    slow = sorted(r["seconds"] for r in failed)
    assert slow, "every AUTH refused: upstream1 has sent AUTH in the last minute; rerun after it"
    print(f"\n{len(failed)} failed after {[round(s, 1) for s in slow]} s; {len(refused)} refused")
    assert statistics.median(slow) >= 4, slow
    assert slow[-1] >= 8, f"no penalty growth: {slow}"
    # Meanwhile a good login from another address went through, unslowed.
    assert still_running, "the attack ended before the good login was tried"
    assert during < 3, f"good login took {during:.1f} s during the attack"
    print(f"good login from this machine during the attack: {during * 1000:.0f} ms")

    log = lab.exec(
        "relay1", "journalctl", "--no-pager", "-o", "cat", f"--since=@{since:.0f}",
        "SYSLOG_IDENTIFIER=postfix/submissions/smtpd",
    )  # fmt: skip
    assert f"[{attacker}]: SASL PLAIN authentication failed" in log, log[-3000:]
    assert "AUTH command rate limit exceeded" in log and f"[{attacker}]" in log, log[-3000:]
