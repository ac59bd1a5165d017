#!/usr/bin/env python3
"""What `smtpgw doctor` needs to know from inside a relay, gathered in one run on the relay.

Copied to the relay and run there by Ansible (`ansible.builtin.script`), as root, with Python's
standard library only (the relay has nothing else). Its one argument is base64 of a JSON list of
the smart hosts in use, ``[{name, host, port, tls, auth, username}]``; it prints one JSON object:

- ``myhostname``, ``helo``: Postfix's name for itself and the name it gives in HELO;
- ``postfix``: the state of the Postfix service (``systemctl is-active postfix@-``);
- ``deployed``: /etc/smtpgw/deployed.json as the relay role wrote it (the smart hosts' addresses
  at deploy time), or null;
- ``smarthosts``: per smart host, the addresses its name resolves to now on the relay, whether a
  TCP connection to it succeeds, and (``auth: login``) whether it accepts the relay's deployed
  credentials (from the Postfix table ``sasl_passwd``) over TLS verified as Postfix verifies it:
  EHLO, STARTTLS or implicit TLS, AUTH, QUIT; no mail is sent;
- ``queue``: every message in the queue (``postqueue -j``: arrival time, delay reasons);
- ``deferred``: the reasons of the deferrals logged in the last hour (``status=deferred (...)``).

Nothing it prints carries a password.
"""

from __future__ import annotations

import base64
import contextlib
import json
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

POSTFIX_DIR = Path("/etc/postfix/smtpgw")
DEPLOYED = Path("/etc/smtpgw/deployed.json")
TIMEOUT = 8.0


def run(*cmd: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip()


def resolve(host: str) -> tuple[list[str], str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        return [], str(exc)
    return sorted({i[4][0] for i in infos}), ""


def credentials(host: str, port: int) -> tuple[str, str] | None:
    """The relay's login at [host]:port, as Postfix's sasl_passwd table holds it."""
    path = POSTFIX_DIR / "sasl_passwd"
    if not path.is_file():
        return None
    key = f"[{host}]:{port}"
    for line in path.read_text().splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == key:
            user, _, password = parts[1].partition(":")
            return user, password
    return None


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    extra = POSTFIX_DIR / "tls" / "smarthost-ca.pem"
    if extra.is_file():
        ctx.load_verify_locations(cafile=str(extra))
    return ctx


def try_login(sh: dict, address: str, helo: str) -> dict:
    """Log in at the smart host as the relay does, without sending mail."""
    login = credentials(sh["host"], int(sh["port"]))
    if login is None:
        return {
            "ok": False,
            "detail": f"no credentials for [{sh['host']}]:{sh['port']} in "
            f"{POSTFIX_DIR}/sasl_passwd",
            "user": sh.get("username"),
        }
    user, password = login
    ctx = tls_context()
    try:
        if sh.get("tls") == "implicit":
            smtp = smtplib.SMTP_SSL(timeout=TIMEOUT, context=ctx, local_hostname=helo)
            smtp._host = sh["host"]
            smtp.connect(address, int(sh["port"]))
        else:
            smtp = smtplib.SMTP(timeout=TIMEOUT, local_hostname=helo)
            smtp.connect(address, int(sh["port"]))
            smtp._host = sh["host"]
            smtp.starttls(context=ctx)
        try:
            smtp.ehlo()
            smtp.login(user, password)
        finally:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()
    except smtplib.SMTPAuthenticationError as exc:
        text = (
            exc.smtp_error.decode(errors="replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        return {"ok": False, "refused": True, "code": exc.smtp_code, "detail": text, "user": user}
    except ssl.SSLCertVerificationError as exc:
        return {"ok": False, "tls": True, "detail": exc.verify_message or str(exc), "user": user}
    except (OSError, smtplib.SMTPException) as exc:
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}", "user": user}
    return {"ok": True, "detail": "", "user": user}


def probe_smarthost(sh: dict, helo: str) -> dict:
    addresses, error = resolve(sh["host"])
    out = {
        "name": sh["name"],
        "host": sh["host"],
        "port": int(sh["port"]),
        "addresses": addresses,
        "resolve_error": error,
        "tcp": None,
        "auth": None,
    }
    if not addresses:
        return out
    address = addresses[0]
    try:
        with socket.create_connection((address, int(sh["port"])), timeout=TIMEOUT):
            out["tcp"] = {"ok": True, "address": address, "detail": ""}
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        out["tcp"] = {"ok": False, "address": address, "detail": reason}
        return out
    if sh.get("auth", "login") == "login" and sh.get("username"):
        out["auth"] = try_login(sh, address, helo)
    return out


def queue() -> list[dict]:
    entries = []
    for line in run("postqueue", "-j").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        entries.append(
            {
                "queue_id": item.get("queue_id"),
                "queue_name": item.get("queue_name"),
                "arrival_time": item.get("arrival_time"),
                "sender": item.get("sender"),
                "reasons": [r.get("delay_reason", "") for r in item.get("recipients", [])],
            }
        )
    return entries


def main(argv: list[str]) -> int:
    smarthosts = json.loads(base64.b64decode(argv[1])) if len(argv) > 1 else []
    myhostname = run("postconf", "-xh", "myhostname")
    helo = run("postconf", "-xh", "smtp_helo_name") or myhostname
    deployed = None
    if DEPLOYED.is_file():
        try:
            deployed = json.loads(DEPLOYED.read_text())
        except ValueError:
            deployed = None
    log = run("journalctl", "-u", "postfix@-", "--since", "-1h", "-o", "cat", "--no-pager")
    print(
        json.dumps(
            {
                "myhostname": myhostname,
                "helo": helo,
                "postfix": run("systemctl", "is-active", "postfix@-") or "unknown",
                "deployed": deployed,
                "smarthosts": [probe_smarthost(sh, helo or "localhost") for sh in smarthosts],
                "queue": queue(),
                "deferred_log": [line for line in log.splitlines() if "status=deferred" in line][
                    -500:
                ],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
