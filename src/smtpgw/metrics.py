"""smtpgw's mail-flow service on a relay: per-tenant counts, a log line per delivery, health.

This file runs on the relays as it is (the relay role copies it to
/usr/local/lib/smtpgw/metrics.py): Python's standard library only, no smtpgw import.

It follows Postfix's log in the journal (``journalctl -f -o json SYSLOG_FACILITY=2``, the mail
facility) and keeps, per queue id, what a message's lines say about it: the client and its SASL
login (smtpd), the Message-ID (cleanup), the envelope sender (qmgr). Its tenant is the login's
tenant, else the tenant whose network holds the client address, from the policy service's limits
file (``limits.json``: ``logins`` {login: {tenant}}, ``networks`` [[cidr, tenant]]); mail of no
tenant (bounces the relay writes) is ``none``.

- Counts, per tenant: ``accepted`` (a message queued, counted once, at qmgr's first ``from=``)
  and ``delivered``, ``deferred``, ``bounced`` (one per recipient delivery attempt, as Postfix
  logs them: ``status=sent|deferred|bounced|expired``, expired counted as bounced), and the
  messages of each tenant in the queue now.
- A line per delivery attempt of each recipient (a message's hop through this relay), on
  standard output (the unit's journal identifier is ``smtpgw-mail``): relay, tenant, queue id,
  Message-ID, sender, recipient, route (Postfix transport and next hop), result, and the next
  hop's queue id when it said ``queued as``; ``key=value`` text or one JSON object (``log_format``).
- HTTP: ``GET /metrics`` (Prometheus text: these counts, the queue's size by Postfix queue and
  the age of its oldest message from ``postqueue -j``, then what the configured ``sources`` serve,
  e.g. Debian's prometheus-postfix-exporter and rspamd's controller; a source that does not answer
  is ``smtpgw_source_up 0``), ``GET /health``: ``200 healthy: ...`` or ``503 unhealthy: REASON``
  when Postfix does not answer ``postqueue`` or the oldest message in the queue is older than
  ``max_queue_age`` seconds (the reason names the last deferral this service saw).

Usage: ``metrics.py serve CONFIG``; ``metrics.py health CONFIG`` asks the running service's
/health on the loopback (exit 0 or 1).
CONFIG (JSON, written by the role): ``listen`` [address, port], ``relay`` (this relay's name),
``limits_file``, ``log_format`` (text | json), ``max_queue_age``, ``sources`` [{name, url}].
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from typing import Any

RESULTS = ("accepted", "delivered", "deferred", "bounced")
STATUS_RESULT = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced"}
STATUS_RESULT["expired"] = "bounced"
NO_TENANT = "none"
MAX_TRACKED = 200_000

_QID = r"(?P<qid>[0-9A-Za-z]{6,20})"
_HEAD = re.compile(_QID + r": (?P<rest>.*)$")
_CLIENT = re.compile(r"^client=(?P<client>[^,\s]*\[(?P<ip>[^\]]*)\])(?P<more>.*)$")
_LOGIN = re.compile(r"sasl_username=(?P<login>[^,\s]+)")
_MSGID = re.compile(r"^message-id=(?P<mid><[^>]*>|\S*)")
_FROM = re.compile(r"^from=<(?P<sender>[^>]*)>, size=\d+, nrcpt=\d+")
_TO = re.compile(r"^to=<(?P<to>[^>]*)>")
_FIELD = re.compile(r"(?:^|, )(?P<key>relay|dsn|delay|orig_to)=(?P<value>[^,]*)")
_STATUS = re.compile(r", status=(?P<status>\w+)(?: \((?P<text>.*)\))?$")
_QUEUED_AS = re.compile(r"queued as (?P<next>[0-9A-Za-z]{6,20})")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Postfix's log lines (pure)


def parse_line(ident: str, message: str) -> dict[str, Any] | None:
    """One Postfix log line (syslog identifier, message) -> an event, or None if not one of ours.

    Events: ``client`` (qid, client, ip, login), ``message_id`` (qid, message_id), ``from``
    (qid, sender), ``delivery`` (qid, to, relay, dsn, status, text, transport, queued_as),
    ``removed`` (qid).
    """
    if not ident.startswith("postfix"):
        return None
    head = _HEAD.match(message)
    if not head:
        return None
    qid, rest = head["qid"], head["rest"]
    daemon = ident.rsplit("/", 1)[-1]
    if daemon == "smtpd" and (m := _CLIENT.match(rest)):
        login = _LOGIN.search(m["more"])
        return {
            "event": "client",
            "qid": qid,
            "client": m["client"],
            "ip": m["ip"],
            "login": login["login"] if login else "",
        }
    if daemon == "cleanup" and (m := _MSGID.match(rest)):
        return {"event": "message_id", "qid": qid, "message_id": m["mid"]}
    if daemon == "qmgr":
        if rest == "removed":
            return {"event": "removed", "qid": qid}
        if m := _FROM.match(rest):
            return {"event": "from", "qid": qid, "sender": m["sender"]}
        return None
    if m := _TO.match(rest):
        status = _STATUS.search(rest)
        if not status:
            return None
        fields = {f["key"]: f["value"] for f in _FIELD.finditer(rest)}
        text = status["text"] or ""
        queued = _QUEUED_AS.search(text) if status["status"] == "sent" else None
        parts = ident.split("/")
        return {
            "event": "delivery",
            "qid": qid,
            "to": m["to"],
            "relay": fields.get("relay", ""),
            "dsn": fields.get("dsn", ""),
            "status": status["status"],
            "text": text,
            # postfix/smtp, or a service's own syslog_name (postfix/smarthost/smtp)
            "transport": "/".join(parts[1:]) if len(parts) > 1 else daemon,
            "queued_as": queued["next"] if queued else "",
        }
    return None


class Tenants:
    """Login -> tenant and client address -> tenant, from the limits file."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.logins = {k.lower(): v["tenant"] for k, v in (data.get("logins") or {}).items()}
        nets = [(ipaddress.ip_network(cidr), name) for cidr, name in data.get("networks") or []]
        self.networks = sorted(nets, key=lambda item: -item[0].prefixlen)
        self.names = sorted(data.get("tenants") or {})

    @classmethod
    def load(cls, path: str) -> Tenants:
        with open(path, encoding="utf-8") as handle:  # JSON after "# Ansible managed" lines
            return cls(json.loads("".join(x for x in handle if not x.startswith("#"))))

    def of(self, login: str, ip: str) -> str:
        if login:
            return self.logins.get(login.lower(), NO_TENANT)
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return NO_TENANT
        for net, name in self.networks:
            if addr.version == net.version and addr in net:
                return name
        return NO_TENANT


class Tracker:
    """Messages in flight by queue id, the per-tenant counts, and the lines to log."""

    def __init__(self, tenants: Tenants, relay: str) -> None:
        self.tenants = tenants
        self.relay = relay
        self.messages: dict[str, dict[str, Any]] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.last_deferral = ""

    def _message(self, qid: str) -> dict[str, Any]:
        msg = self.messages.get(qid)
        if msg is None:
            if len(self.messages) >= MAX_TRACKED:  # a lost "removed" line must not grow forever
                self.messages.pop(next(iter(self.messages)))
            msg = self.messages[qid] = {"tenant": NO_TENANT, "client": "", "login": ""}
        return msg

    def _count(self, tenant: str, result: str) -> None:
        self.counts[(tenant, result)] = self.counts.get((tenant, result), 0) + 1

    def feed(self, event: dict[str, Any], when: float) -> dict[str, Any] | None:
        """Take one event; returns the record to log for a delivery attempt, else None."""
        kind, qid = event["event"], event["qid"]
        if kind == "removed":
            self.messages.pop(qid, None)
            return None
        msg = self._message(qid)
        if kind == "client":
            msg.update(client=event["client"], login=event["login"])
            msg["tenant"] = self.tenants.of(event["login"], event["ip"])
        elif kind == "message_id":
            msg["message_id"] = event["message_id"]
        elif kind == "from":
            msg["sender"] = event["sender"]
            if not msg.get("counted"):
                msg["counted"] = True
                self._count(msg["tenant"], "accepted")
        elif kind == "delivery":
            result = STATUS_RESULT.get(event["status"], event["status"])
            if result in RESULTS:
                self._count(msg["tenant"], result)
            if event["status"] == "deferred":
                self.last_deferral = f"{event['to']}: {event['text']}"
            return {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
                + f".{int(when * 1000) % 1000:03d}Z",
                "relay": self.relay,
                "tenant": msg["tenant"],
                "queue_id": qid,
                "message_id": msg.get("message_id", ""),
                "sender": msg.get("sender", ""),
                "recipient": event["to"],
                "route": f"{event['transport']} {event['relay']}",
                "result": result,
                "dsn": event["dsn"],
                "queued_as": event["queued_as"],
                "client": msg["client"],
                "login": msg["login"],
                "detail": event["text"],
            }
        return None

    def queued_by_tenant(self) -> dict[str, int]:
        out = dict.fromkeys(self.tenants.names, 0)
        for msg in self.messages.values():
            if msg.get("counted"):
                out[msg["tenant"]] = out.get(msg["tenant"], 0) + 1
        return out


_TEXT_KEYS = ("time", "relay", "tenant", "queue_id", "message_id", "sender", "recipient", "route")
_TEXT_KEYS += ("result", "dsn", "queued_as", "client", "login", "detail")


def format_record(record: dict[str, Any], fmt: str = "text") -> str:
    """One log line: ``key=value ...`` (a value with spaces or quotes in JSON quotes), or JSON."""
    if fmt == "json":
        return json.dumps(record, sort_keys=False, separators=(",", ":"))
    parts = []
    for key in _TEXT_KEYS:
        value = str(record.get(key, ""))
        if value == "":
            continue
        if re.search(r'[\s"=]', value):
            value = json.dumps(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


_TEXT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_record(line: str) -> dict[str, Any] | None:
    """A line :func:`format_record` wrote (text or JSON) -> the record, else None."""
    line = line.strip()
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        return record if isinstance(record, dict) and "queue_id" in record else None
    record = {}
    for key, value in _TEXT_PAIR.findall(line):
        record[key] = json.loads(value) if value.startswith('"') else value
    return record if "queue_id" in record and "relay" in record else None


# --------------------------------------------------------------------------------------------
# The queue and health (pure parts)


def queue_summary(postqueue_json: str, now: float) -> dict[str, Any]:
    """``postqueue -j`` output -> {queues: {name: count}, oldest: seconds (0 when empty)}."""
    queues = dict.fromkeys(("maildrop", "incoming", "active", "deferred", "hold"), 0)
    oldest = 0.0
    for line in postqueue_json.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        queues[entry.get("queue_name", "unknown")] = queues.get(entry.get("queue_name"), 0) + 1
        oldest = max(oldest, now - float(entry.get("arrival_time", now)))
    return {"queues": queues, "oldest": round(max(oldest, 0.0), 1)}


def health(summary: dict[str, Any] | None, error: str, max_age: float, last_deferral: str):
    """(healthy, reason) from the queue summary (None with ``error`` when postqueue failed)."""
    if summary is None:
        return False, f"Postfix does not answer: {error}"
    total = sum(summary["queues"].values())
    if summary["oldest"] > max_age:
        why = (
            f"oldest message in the queue is {summary['oldest']:.0f} s old (limit {max_age:.0f} s)"
        )
        why += f", {total} queued"
        if last_deferral:
            why += f"; last deferral: {last_deferral}"
        return False, why
    return True, f"{total} queued, oldest {summary['oldest']:.0f} s (limit {max_age:.0f} s)"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(
    counts: dict[tuple[str, str], int],
    tenants: Iterable[str],
    queued: dict[str, int],
    summary: dict[str, Any] | None,
) -> str:
    """The service's own metrics in Prometheus's text format (every known tenant, zeros too)."""
    names = sorted(set(tenants) | {t for t, _ in counts} | set(queued))
    out = [
        "# HELP smtpgw_messages_total Messages per tenant: accepted (queued once), and delivery "
        "attempts per recipient delivered, deferred or bounced.",
        "# TYPE smtpgw_messages_total counter",
    ]
    for tenant in names:
        for result in RESULTS:
            value = counts.get((tenant, result), 0)
            out.append(
                f'smtpgw_messages_total{{tenant="{_escape(tenant)}",result="{result}"}} {value}'
            )
    out += [
        "# HELP smtpgw_tenant_queued_messages Messages of each tenant in the queue now.",
        "# TYPE smtpgw_tenant_queued_messages gauge",
    ]
    for tenant in names:
        out.append(
            f'smtpgw_tenant_queued_messages{{tenant="{_escape(tenant)}"}} {queued.get(tenant, 0)}'
        )
    out += [
        "# HELP smtpgw_postfix_up 1 when Postfix answers postqueue.",
        "# TYPE smtpgw_postfix_up gauge",
        f"smtpgw_postfix_up {0 if summary is None else 1}",
    ]
    if summary is not None:
        out += [
            "# HELP smtpgw_queue_messages Messages in each Postfix queue.",
            "# TYPE smtpgw_queue_messages gauge",
        ]
        for name, count in sorted(summary["queues"].items()):
            out.append(f'smtpgw_queue_messages{{queue="{_escape(name)}"}} {count}')
        out += [
            "# HELP smtpgw_queue_oldest_message_age_seconds Age of the oldest queued message.",
            "# TYPE smtpgw_queue_oldest_message_age_seconds gauge",
            f"smtpgw_queue_oldest_message_age_seconds {summary['oldest']}",
        ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# The service (I/O)


def read_queue() -> tuple[dict[str, Any] | None, str]:
    try:
        proc = subprocess.run(
            ["postqueue", "-j"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    if proc.returncode != 0:
        return None, (proc.stderr.strip() or f"postqueue exited {proc.returncode}")[:300]
    return queue_summary(proc.stdout, time.time()), ""


class Service:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.limits_file = config["limits_file"]
        self.limits_mtime = 0.0
        self.tracker = Tracker(Tenants({}), config.get("relay") or os.uname().nodename)
        self.fmt = config.get("log_format", "text")
        self.max_age = float(config.get("max_queue_age", 600))
        self._reload_tenants()

    def _reload_tenants(self) -> None:
        try:
            mtime = os.stat(self.limits_file).st_mtime
            if mtime != self.limits_mtime:
                self.tracker.tenants = Tenants.load(self.limits_file)
                self.limits_mtime = mtime
        except (OSError, ValueError) as exc:
            log(f"tenants NOT (re)read from {self.limits_file}: {exc}")

    def take(self, entry: dict[str, Any]) -> None:
        event = parse_line(str(entry.get("SYSLOG_IDENTIFIER", "")), str(entry.get("MESSAGE", "")))
        if event is None:
            return
        if event["event"] == "client":
            self._reload_tenants()
        when = int(entry.get("__REALTIME_TIMESTAMP", time.time() * 1e6)) / 1e6
        record = self.tracker.feed(event, when)
        if record is not None:
            print(format_record(record, self.fmt), flush=True)

    async def follow(self) -> None:
        cmd = ["journalctl", "-f", "-n", "0", "-o", "json", "SYSLOG_FACILITY=2"]
        while True:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, limit=1 << 20
            )
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry.get("MESSAGE"), str):
                    self.take(entry)
            log(f"journalctl ended ({await proc.wait()}); following again in 1 s")
            await asyncio.sleep(1)

    async def metrics(self) -> str:
        summary, _ = await asyncio.to_thread(read_queue)
        text = exposition(
            self.tracker.counts,
            self.tracker.tenants.names,
            self.tracker.queued_by_tenant(),
            summary,
        )
        parts = [text, "# TYPE smtpgw_source_up gauge\n"]
        bodies = []
        for source in self.config.get("sources") or []:
            try:
                body = await asyncio.to_thread(_fetch, source["url"])
                up = 1
            except OSError as exc:
                log(f"source {source['name']} ({source['url']}): {exc}")
                body, up = "", 0
            parts.append(f'smtpgw_source_up{{source="{_escape(source["name"])}"}} {up}\n')
            bodies.append(body if body.endswith("\n") or not body else body + "\n")
        return "".join(parts + bodies)

    async def health(self) -> tuple[bool, str]:
        summary, error = await asyncio.to_thread(read_queue)
        return health(summary, error, self.max_age, self.tracker.last_deferral)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", "GET only\n"
            elif path == "/metrics":
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                body = await self.metrics()
            elif path == "/health":
                ok, reason = await self.health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = (
                    "text/plain; charset=utf-8",
                    f"{'healthy' if ok else 'unhealthy'}: {reason}\n",
                )
            else:
                status, ctype, body = "404 Not Found", "text/plain", "/metrics or /health\n"
            data = body.encode()
            head = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
            writer.write((head + "Connection: close\r\n\r\n").encode())
            if method != "HEAD":
                writer.write(data)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.read().decode("utf-8", "replace")


async def serve(config: dict[str, Any]) -> None:
    service = Service(config)
    host, port = config.get("listen") or ["0.0.0.0", 9155]
    server = await asyncio.start_server(service.handle, host, int(port))
    log(f"listening on {host}:{port}; following Postfix's log in the journal")
    async with server:
        await service.follow()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metrics.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "health"):
        sub.add_parser(name).add_argument("config")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as handle:
        config = json.load(handle)
    if args.cmd == "serve":
        asyncio.run(serve(config))
        return 0
    return check_local(config)


def check_local(config: dict[str, Any]) -> int:
    """Ask the running service's /health on the loopback; print its answer; 0 when healthy."""
    import urllib.error

    port = int((config.get("listen") or ["", 9155])[1])
    try:
        text = _fetch(f"http://127.0.0.1:{port}/health")
        code = 0
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        code = 1
    except OSError as exc:
        text = f"unhealthy: the mail-flow service does not answer on port {port}: {exc}\n"
        code = 1
    print(text, end="")
    return code


if __name__ == "__main__":
    sys.exit(main())
