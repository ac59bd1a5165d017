"""smtpgw's Postfix policy service: per-tenant sending limits, counted in Redis.

This file runs on the relays as it is (the relay role copies it to
/usr/local/lib/smtpgw/policyd.py): Python's standard library only, no smtpgw import.

Postfix asks it (the policy delegation protocol, ``check_policy_service``) at each RCPT: the
recipients of one message (Postfix's ``instance``) are counted; one over the tenant's
``recipients_per_message`` gets ``550 5.5.3``. The first recipient of a message also looks at the
tenant's counters: a tenant at a limit gets ``452 4.7.1 tenant acme: 5 messages per day reached;
next slot in 23h59m`` for this and every later recipient of the message. That look asks Redis
(the counter script with commit 0) unless the last look at the same counters, at most
``ROOM_SECONDS`` old, left more than ``ROOM_MARGIN`` messages in every window (less the messages
that began here since): a tenant far below its limits costs a Redis round trip every
``ROOM_SECONDS``, not one a message.

The look is an early refusal only. What holds the limit is the count at the end of DATA, which is
not this service's: rspamd, the milter every message passes anyway, runs the same counter script
(``limits_count.lua``, beside this file) with commit 1 in the same Redis, atomically over every
counter of the message (the tenant's and, when the login has limits of its own, the login's), so
that relays sharing a Redis count a tenant once; a message that does not fit is deferred there
(``451 4.7.1``).

A counter is a sorted set of the accepted messages' times (Redis's clock): the day is a rolling
24 hours, the hour a rolling 60 minutes, and "next slot" is when the oldest message that keeps
the counter full leaves the window.

The tenant of a message: its SASL login's tenant, else the tenant whose network holds the client
address. Mail of no tenant (rejected by Postfix's relay checks before it gets here) is passed.

Redis unreachable: ``fail_closed`` (the default) defers with ``451 4.3.0``, ``fail_open`` passes the
mail uncounted; either way one log line a minute says so, and the next request tries Redis again,
so the service recovers by itself (rspamd's count does the same on its side). SIGHUP rereads the
limits file (the role reloads on change).

Usage: ``policyd.py serve CONFIG`` (the service), ``policyd.py show CONFIG [TENANT] [--json]``.
CONFIG (JSON, written by the role): ``socket``, ``limits_file``, ``redis`` {host, port,
password}, ``on_redis_failure`` (fail_closed | fail_open).
The limits file (JSON, from smtpgw.relay_files): ``tenants`` {name: limits}, ``logins``
{login: {tenant, limits}} (``limits`` only for a login with its own), ``networks`` [[cidr, name]].
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
KEY_PREFIX = "smtpgw:limits:"
LOG_EVERY = 60.0
# A message is forgotten this long after its last RCPT (Postfix waits 300 s for a command).
INSTANCE_TTL = 600.0
# The RCPT look rests on the last count seen when it is this fresh and left more than this.
ROOM_SECONDS = 10.0
ROOM_MARGIN = 50
# A request larger than this closes the connection (Postfix's are well under 2 KB).
MAX_REQUEST = 1 << 20

# The counter script (src/smtpgw/limits_count.lua, installed beside this file): rspamd counts
# each message with it at the end of DATA; this service runs it to look (commit 0) at RCPT.
COUNT_SCRIPT = (Path(__file__).resolve().parent / "limits_count.lua").read_text(encoding="utf-8")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_text(ms: int) -> str:
    """``2h13m``, ``13m``: the wait rounded up to the minute."""
    minutes = max(1, math.ceil(ms / 60_000))
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def counter_key(kind: str, name: str) -> str:
    return f"{KEY_PREFIX}{kind}:{name}"


# --------------------------------------------------------------------------------------------
# Redis, the few commands needed, over asyncio streams (RESP2)


class RedisError(Exception):
    pass


class RedisReplyError(RedisError):
    pass


def _encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    line = await reader.readline()
    if not line.endswith(b"\r\n"):
        raise RedisError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = await reader.readexactly(size + 2)
        return data[:-2].decode()
    if kind == b"*":
        size = int(rest)
        if size < 0:
            return None
        return [await _read_reply(reader) for _ in range(size)]
    raise RedisError(f"unexpected reply {line[:40]!r}")


class Redis:
    """A small pool of connections; a failed connection is dropped, the next call reconnects."""

    def __init__(self, host: str, port: int, password: str | None, timeout: float = 2.0):
        self.host, self.port, self.password, self.timeout = host, port, password, timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._sha: str | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
        except (TimeoutError, OSError) as exc:
            raise RedisError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        if self.password:
            writer.write(_encode(("AUTH", self.password)))
            try:
                await asyncio.wait_for(_read_reply(reader), self.timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                writer.close()
                raise RedisError(f"AUTH failed: {exc}") from None
            except RedisReplyError:
                writer.close()
                raise
        return reader, writer

    async def call(self, *args: Any) -> Any:
        # A kept connection may have died with a Redis restart: then once more on a new one.
        for fresh in (not self._idle, True):
            conn = await self._connect() if fresh else self._idle.pop()
            reader, writer = conn
            try:
                writer.write(_encode(args))
                # asyncio.timeout, not wait_for: no task of its own for every call.
                async with asyncio.timeout(self.timeout):
                    reply = await _read_reply(reader)
            except RedisReplyError:
                self._idle.append(conn)
                raise
            except (TimeoutError, OSError, asyncio.IncompleteReadError, RedisError) as exc:
                writer.close()
                if not fresh:
                    for _, old in self._idle:
                        old.close()
                    self._idle.clear()
                    continue
                raise RedisError(f"{self.host}:{self.port}: {exc or type(exc).__name__}") from None
            self._idle.append(conn)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def count(self, keys: list[str], argv: list[Any]) -> list[Any]:
        """Run COUNT_SCRIPT (by its SHA once Redis has it)."""
        if self._sha:
            try:
                return await self.call("EVALSHA", self._sha, len(keys), *keys, *argv)
            except RedisReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
        self._sha = await self.call("SCRIPT", "LOAD", COUNT_SCRIPT)
        return await self.call("EVALSHA", self._sha, len(keys), *keys, *argv)


# --------------------------------------------------------------------------------------------
# Limits: whose message, and which counters


class Limits:
    """The limits file: tenant of a login or client address, and the counters of a message."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.tenants: dict[str, dict[str, Any]] = data.get("tenants") or {}
        self.logins: dict[str, dict[str, Any]] = {
            k.lower(): v for k, v in (data.get("logins") or {}).items()
        }
        nets = [(ipaddress.ip_network(cidr), name) for cidr, name in data.get("networks") or []]
        self.networks = sorted(nets, key=lambda item: -item[0].prefixlen)

    @classmethod
    def load(cls, path: str) -> Limits:
        # JSON, after the role's "# Ansible managed" header lines.
        with open(path, encoding="utf-8") as handle:
            text = "".join(line for line in handle if not line.startswith("#"))
        return cls(json.loads(text))

    def tenant_of(self, login: str, address: str) -> tuple[str, str | None] | None:
        """(tenant, login with limits of its own or None), or None for mail of no tenant."""
        if login:
            entry = self.logins.get(login.lower())
            if entry is None:
                return None
            return entry["tenant"], (login.lower() if entry.get("limits") else None)
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        for net, name in self.networks:
            if ip.version == net.version and ip in net:
                return name, None
        return None

    def effective(self, tenant: str, login: str | None) -> dict[str, Any]:
        limits = dict(self.tenants.get(tenant) or {})
        if login:
            limits.update({k: v for k, v in self.logins[login]["limits"].items() if v})
        return limits

    def counters(self, tenant: str, login: str | None) -> list[tuple[str, str, dict[str, Any]]]:
        """(key, who for messages, limits) of every counter a message of this sender fills."""
        out = [(counter_key("tenant", tenant), f"tenant {tenant}", self.tenants.get(tenant) or {})]
        if login:
            out.append(
                (counter_key("login", login), f"login {login}", self.logins[login]["limits"])
            )
        return [c for c in out if c[2].get("messages_per_day") or c[2].get("messages_per_hour")]


def _argv(counters: list[tuple[str, str, dict[str, Any]]]) -> list[Any]:
    out: list[Any] = []
    for _, _, lim in counters:
        out += [lim.get("messages_per_day") or 0, lim.get("messages_per_hour") or 0]
    return out


def over_text(counters: list[tuple[str, str, dict[str, Any]]], reply: list[Any]) -> str:
    _, who, _ = counters[int(reply[0]) - 1]
    window, limit, wait = reply[1], int(reply[2]), int(reply[3])
    return f"452 4.7.1 {who}: {limit} messages per {window} reached; next slot in {wait_text(wait)}"


# --------------------------------------------------------------------------------------------
# The service


class Policy:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.limits = Limits.load(config["limits_file"])
        redis = config.get("redis") or {}
        self.redis = Redis(
            redis.get("host", "127.0.0.1"), int(redis.get("port", 6379)), redis.get("password")
        )
        self.mode = config.get("on_redis_failure", "fail_closed")
        self.fail_open = self.mode == "fail_open"
        self.instances: dict[str, list[Any]] = {}  # instance -> [recipients, over text, time]
        # The last look, per counters of a message: [messages left, monotonic time].
        self.room: dict[tuple[str, ...], list[float]] = {}
        self.down_since: float | None = None
        self.last_log = 0.0
        self.failures = 0

    def reload(self) -> None:
        try:
            self.limits = Limits.load(self.config["limits_file"])
            self.room.clear()
            log(f"limits reloaded: {len(self.limits.tenants)} tenant(s)")
        except (OSError, ValueError) as exc:
            log(f"limits NOT reloaded, keeping the old ones: {exc}")

    def _redis_failed(self, exc: Exception) -> str:
        now = time.monotonic()
        self.failures += 1
        if self.down_since is None:
            self.down_since = now
        if now - self.last_log >= LOG_EVERY:
            mode = "passing mail uncounted" if self.fail_open else "deferring mail"
            log(
                f"Redis unreachable ({exc}); {mode} ({self.mode}); "
                f"{self.failures} request(s) since the last report"
            )
            self.last_log = now
            self.failures = 0
        return (
            "DUNNO" if self.fail_open else "451 4.3.0 sending limits unavailable; try again later"
        )

    def _redis_ok(self) -> None:
        if self.down_since is not None:
            log(f"Redis reachable again after {time.monotonic() - self.down_since:.0f} s")
            self.down_since = None
            self.last_log = 0.0
            self.failures = 0

    def _purge(self, now: float) -> None:
        """Forget the messages whose last RCPT is over INSTANCE_TTL old (they come first: each
        RCPT moves its message to the end)."""
        cutoff = now - INSTANCE_TTL
        while self.instances:
            oldest = next(iter(self.instances))
            if self.instances[oldest][2] >= cutoff:
                break
            del self.instances[oldest]

    def answer(self, attrs: dict[str, str]) -> str | Coroutine[Any, Any, str]:
        """The action for a request: at once, or (when it must ask Redis) a coroutine."""
        if attrs.get("protocol_state", "").upper() != "RCPT":
            return "DUNNO"
        whose = self.limits.tenant_of(
            attrs.get("sasl_username", ""), attrs.get("client_address", "")
        )
        if whose is None:
            return "DUNNO"
        tenant, login = whose
        instance = attrs.get("instance", "")
        now = time.monotonic()
        entry = self.instances.pop(instance, None)
        if entry is not None:
            entry[2] = now
            self.instances[instance] = entry  # to the end: the most recent RCPT
            return self._recipient(tenant, login, entry)
        self._purge(now)
        entry = self.instances[instance] = [0, None, now]
        counters = self.limits.counters(tenant, login)
        if not counters:
            return self._recipient(tenant, login, entry)
        keys = tuple(c[0] for c in counters)
        room = self.room.get(keys)
        if room and room[0] > ROOM_MARGIN and now - room[1] < ROOM_SECONDS:
            room[0] -= 1  # far below the limits: this message, counted at the end of DATA
            return self._recipient(tenant, login, entry)
        return self._look(tenant, login, instance, entry, counters, keys)

    async def _look(
        self,
        tenant: str,
        login: str | None,
        instance: str,
        entry: list[Any],
        counters: list[tuple[str, str, dict[str, Any]]],
        keys: tuple[str, ...],
    ) -> str:
        """The first RCPT of a message whose counters must be read in Redis."""
        try:
            reply = await self.redis.count(list(keys), ["", 0, *_argv(counters)])
        except RedisError as exc:
            self.instances.pop(instance, None)
            self.room.pop(keys, None)
            return self._redis_failed(exc)
        self._redis_ok()
        if int(reply[0]):
            entry[1] = over_text(counters, reply)
            self.room.pop(keys, None)
        else:
            # What Redis counted, less this message (rspamd counts it at the end of DATA).
            self.room[keys] = [int(reply[1]) - 1, time.monotonic()]
        return self._recipient(tenant, login, entry)

    def _recipient(self, tenant: str, login: str | None, entry: list[Any]) -> str:
        if entry[1]:
            return entry[1]
        most = self.limits.effective(tenant, login).get("recipients_per_message")
        if most and entry[0] >= most:
            return f"550 5.5.3 tenant {tenant}: at most {most} recipients per message"
        entry[0] += 1
        return "DUNNO"


def parse(request: bytes) -> dict[str, str]:
    """A request's name=value lines."""
    attrs: dict[str, str] = {}
    for line in request.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            attrs[key] = value
    return attrs


class Connection(asyncio.Protocol):
    """One connection from Postfix (an smtpd process): requests (name=value lines, then an
    empty line) answered in order. Nearly every request is answered in the callback that read
    it: no task and no stream, which measured on a relay were most of a request's cost. One that
    must ask Redis is answered by a task, and the requests behind it wait for it."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.buffer = b""
        # The task answering a request that waits for Redis (kept: the loop holds tasks weakly).
        self.waiting: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_REQUEST:
            log(f"a request over {MAX_REQUEST} bytes; connection closed")
            self.transport.close()
        elif self.waiting is None:
            self._answer()

    def _answer(self) -> None:
        replies = []
        while (end := self.buffer.find(b"\n\n")) >= 0:
            attrs = parse(self.buffer[: end + 1])
            self.buffer = self.buffer[end + 2 :]
            try:
                action = self.policy.answer(attrs)
            except Exception as exc:  # a bug must not stall Postfix: defer, and say why
                action = failed(attrs, exc)
            if not isinstance(action, str):
                self.waiting = asyncio.get_running_loop().create_task(self._later(attrs, action))
                break
            replies.append(b"action=%s\n\n" % action.encode())
        if replies and not self.transport.is_closing():
            self.transport.write(b"".join(replies))

    async def _later(self, attrs: dict[str, str], pending: Coroutine[Any, Any, str]) -> None:
        try:
            action = await pending
        except Exception as exc:
            action = failed(attrs, exc)
        self.waiting = None
        if not self.transport.is_closing():
            self.transport.write(b"action=%s\n\n" % action.encode())
            self._answer()


def failed(attrs: dict[str, str], exc: Exception) -> str:
    log(f"error on {attrs.get('queue_id') or attrs.get('instance')}: {exc!r}")
    return "451 4.3.0 sending limits unavailable; try again later"


async def serve(config: dict[str, Any]) -> None:
    policy = Policy(config)
    path = config["socket"]
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o117)
    try:
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: Connection(policy), path=path, backlog=512
        )
    finally:
        os.umask(old)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, policy.reload)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    log(
        f"listening on {path}: {len(policy.limits.tenants)} tenant(s), Redis "
        f"{policy.redis.host}:{policy.redis.port}, "
        f"{'fail_open' if policy.fail_open else 'fail_closed'}"
    )
    async with server:
        await stop.wait()


async def show(config: dict[str, Any], tenant: str | None) -> list[dict[str, Any]]:
    """Counters, limits and what is left, per tenant (and per login with limits of its own)."""
    limits = Limits.load(config["limits_file"])
    redis = config.get("redis") or {}
    client = Redis(
        redis.get("host", "127.0.0.1"), int(redis.get("port", 6379)), redis.get("password")
    )
    now_s, now_us = await client.call("TIME")
    now = int(now_s) * 1000 + int(now_us) // 1000
    rows = []
    subjects = [("tenant", name, lim) for name, lim in sorted(limits.tenants.items())]
    subjects += [
        ("login", login, entry["limits"])
        for login, entry in sorted(limits.logins.items())
        if entry.get("limits")
    ]
    for kind, name, lim in subjects:
        owner = name if kind == "tenant" else limits.logins[name]["tenant"]
        if tenant and owner != tenant:
            continue
        key = counter_key(kind, name)
        day = await client.call("ZCOUNT", key, now - DAY_MS, "+inf")
        hour = await client.call("ZCOUNT", key, now - HOUR_MS, "+inf")
        row = {"kind": kind, "name": name, "tenant": owner}
        for window, used in (("day", day), ("hour", hour)):
            most = lim.get(f"messages_per_{window}")
            row[f"sent_{window}"] = used
            row[f"limit_{window}"] = most
            row[f"left_{window}"] = None if most is None else max(0, most - used)
        row["recipients_per_message"] = lim.get("recipients_per_message")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policyd.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("config")
    p = sub.add_parser("show")
    p.add_argument("config")
    p.add_argument("tenant", nargs="?")
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as handle:
        config = json.load(handle)
    if args.cmd == "serve":
        asyncio.run(serve(config))
        return 0
    try:
        rows = asyncio.run(show(config, args.tenant))
    except RedisError as exc:
        print(f"policyd.py: Redis: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(
                f"{r['kind']:<6} {r['name']:<30} day {r['sent_day']}/{r['limit_day'] or '-'}"
                f"  hour {r['sent_hour']}/{r['limit_hour'] or '-'}"
                f"  recipients/message {r['recipients_per_message'] or '-'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
