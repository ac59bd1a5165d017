"""Plan, apply and check the records of :mod:`smtpgw.dns_records` against real DNS servers.

- :func:`plan` asks the primary server (over one TCP connection) for the register of each zone
  and for the TXT records at every name smtpgw owns or wants: one query per name. It compares
  only the records smtpgw owns (their text starts with the tag of their kind); a CNAME at a name
  is someone else's and is left alone (reported as a conflict).
- :func:`apply` sends one RFC 2136 update per zone that has changes, signed with TSIG, with a
  prerequisite per name: the TXT records there are exactly those the plan saw (or there are
  none). If anyone changed them since, the server refuses the whole update and nothing of that
  zone is applied; the next plan sees the new state. A plan without changes sends no update.
- :func:`check` asks every authoritative server of each zone (and a resolver, if given) for each
  wanted record and reports ok / missing / wrong with the expected and the seen value, and the
  primary for leftovers: owned records at names the register lists that are no longer wanted.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.resolver
import dns.tsig
import dns.tsigkeyring
import dns.update

from .dns_records import (
    REGISTER_LABEL,
    Desired,
    Record,
    absolute,
    parse_register,
    tag_of,
    txt_text,
)

__all__ = [
    "Change",
    "Conflict",
    "DnsError",
    "Plan",
    "Server",
    "TsigKey",
    "apply",
    "check",
    "plan",
]

TIMEOUT = 5.0


class DnsError(Exception):
    """A DNS server could not be used; the message names the server, zone and what to do."""


@dataclass(frozen=True)
class TsigKey:
    name: str
    algorithm: str
    secret: str

    def keyring(self) -> dict[dns.name.Name, dns.tsig.Key]:
        return dns.tsigkeyring.from_text({self.name: (self.algorithm, self.secret)})


class Server:
    """One DNS server reached over one TCP connection; counts the messages sent."""

    def __init__(self, address: str, port: int = 53, timeout: float = TIMEOUT) -> None:
        self.address, self.port, self.timeout = address, port, timeout
        self.queries = 0
        self.updates = 0
        self._sock: socket.socket | None = None

    def __str__(self) -> str:
        return self.address if self.port == 53 else f"{self.address}:{self.port}"

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect((self.address, self.port))
            except OSError as exc:
                raise DnsError(
                    f"DNS server {self}: cannot connect over TCP ({exc.strerror or exc}); check "
                    "smtpgw_dns_server and that the server is up and reachable from here"
                ) from None
            self._sock = sock
        return self._sock

    def exchange(self, message: dns.message.Message, what: str) -> dns.message.Message:
        """Send a message, return the answer; one retry on a fresh connection if it dropped."""
        for attempt in (1, 2):
            sock = self._connect()
            try:
                return dns.query.tcp(message, self.address, timeout=self.timeout, sock=sock)
            except dns.tsig.PeerError as exc:
                raise DnsError(_tsig_problem(self, what, exc)) from None
            except (dns.exception.Timeout, TimeoutError):
                self.close()
                raise DnsError(
                    f"DNS server {self}: no answer to {what} within {self.timeout:.0f} s; check "
                    "that it is up and reachable"
                ) from None
            except (OSError, EOFError, dns.exception.FormError) as exc:
                self.close()
                if attempt == 2:
                    raise DnsError(
                        f"DNS server {self}: the connection failed during {what} ({exc}); check "
                        "that it is up and reachable"
                    ) from None
        raise AssertionError("unreachable")

    def query_txt(self, name: dns.name.Name, recursive: bool = False) -> dns.message.Message:
        self.queries += 1
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        if not recursive:
            query.flags &= ~dns.flags.RD
        return self.exchange(query, f"the query for {name}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _tsig_problem(server: Server, what: str, exc: Exception) -> str:
    reason = {
        "PeerBadKey": "does not know the key",
        "PeerBadSignature": "says the signature is wrong (wrong secret or algorithm)",
        "PeerBadTime": "says the clock is off (check the time on both ends)",
        "PeerBadTruncation": "refuses the signature's truncation",
    }.get(type(exc).__name__, f"refuses the signature ({exc})")
    return (
        f"DNS server {server}: {what} was refused: the server {reason}; check smtpgw_dns_tsig "
        "(name, algorithm and secret) against the key the server trusts"
    )


# --------------------------------------------------------------------------------------------
# The state of a name, and the plan


@dataclass
class Seen:
    """The TXT records at a name (all of them, and which are ours), or a CNAME there."""

    texts: list[str] = field(default_factory=list)
    rdatas: list[Any] = field(default_factory=list)
    ttl: int = 0
    cname: str | None = None


@dataclass
class Change:
    """What a plan does at one name: the owned texts before and after."""

    zone: str
    name: str
    before: list[str]
    after: list[str]
    seen: Seen = field(repr=False, default_factory=Seen)
    remove: list[Any] = field(repr=False, default_factory=list)  # rdatas to delete
    add: list[Record] = field(repr=False, default_factory=list)

    @property
    def action(self) -> str:
        if not self.before:
            return "add"
        return "remove" if not self.after else "change"

    def as_dict(self) -> dict[str, Any]:
        return {
            "zone": self.zone,
            "name": self.name,
            "action": self.action,
            "before": self.before,
            "after": self.after,
        }


@dataclass
class Conflict:
    zone: str
    name: str
    reason: str


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    queries: int = 0
    seconds: float = 0.0

    @property
    def zones(self) -> list[str]:
        return sorted({c.zone for c in self.changes})

    def lines(self) -> list[str]:
        """The plan for people: per zone, + added, ~ changed, - removed, ! left alone."""
        out: list[str] = []
        for zone in sorted({c.zone for c in self.changes} | {c.zone for c in self.conflicts}):
            out.append(f"zone {zone}:")
            for change in (c for c in self.changes if c.zone == zone):
                sign = {"add": "+", "change": "~", "remove": "-"}[change.action]
                out.append(f"  {sign} {change.name} TXT")
                out += [f"      - {_quote(t)}" for t in change.before if t not in change.after]
                out += [f"      + {_quote(t)}" for t in change.after if t not in change.before]
            for conflict in (c for c in self.conflicts if c.zone == zone):
                out.append(f"  ! {conflict.name}: {conflict.reason}; left alone")
        return out


def _quote(text: str) -> str:
    return f'"{text}"' if len(text) <= 120 else f'"{text[:100]}..." ({len(text)} characters)'


def read_name(server: Server, name: dns.name.Name, zone: str) -> Seen:
    answer = server.query_txt(name)
    rcode = answer.rcode()
    if rcode == dns.rcode.REFUSED or (
        rcode == dns.rcode.NOERROR and not answer.flags & dns.flags.AA
    ):
        raise DnsError(
            f"DNS server {server}: is not authoritative for zone {zone} (it answered "
            f"{dns.rcode.to_text(rcode)} for {name}); add the zone to the server, or set "
            "smtpgw_dns_zones to the zones it serves"
        )
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise DnsError(
            f"DNS server {server}: answered {dns.rcode.to_text(rcode)} for {name} in zone "
            f"{zone}; check the zone on the server"
        )
    seen = Seen()
    for rrset in answer.answer:
        if rrset.name != name:
            continue
        if rrset.rdtype == dns.rdatatype.CNAME:
            seen.cname = rrset[0].target.to_text()
        elif rrset.rdtype == dns.rdatatype.TXT:
            seen.rdatas = list(rrset)
            seen.texts = [txt_text(r) for r in rrset]
            seen.ttl = rrset.ttl
    return seen


def plan(desired: Desired, server: Server) -> Plan:
    """Compare what the server holds with what is wanted; one query per owned name."""
    start = time.monotonic()
    queries_before = server.queries
    result = Plan()
    for zone in sorted(desired.zones):
        register_name = absolute(REGISTER_LABEL, zone)
        register = read_name(server, register_name, zone)
        wanted: dict[dns.name.Name, list[Record]] = {}
        for record in desired.zones[zone]:
            wanted.setdefault(record.name, []).append(record)
        owned_names = {*wanted, register_name}
        strings = (s.decode(errors="replace") for r in register.rdatas for s in r.strings)
        for domain, names in parse_register(strings).items():
            owned_names.update(absolute(n, domain) for n in names)
        for name in sorted(owned_names):
            seen = register if name == register_name else read_name(server, name, zone)
            _compare(result, zone, name, seen, wanted.get(name, []))
    result.queries = server.queries - queries_before
    result.seconds = time.monotonic() - start
    return result


def _compare(result: Plan, zone: str, name: dns.name.Name, seen: Seen, want: list[Record]) -> None:
    shown = name.to_text()
    if seen.cname is not None:
        if want:
            result.conflicts.append(
                Conflict(zone, shown, f"a CNAME to {seen.cname} that smtpgw did not make")
            )
        return
    owned = [(t, r) for t, r in zip(seen.texts, seen.rdatas, strict=True) if tag_of(t)]
    before = [t for t, _ in owned]
    after = [r.text for r in want]
    ttl_differs = bool(owned) and bool(want) and seen.ttl != want[0].ttl
    if sorted(before) == sorted(after) and not ttl_differs:
        return
    if ttl_differs:
        remove, add = [r for _, r in owned], list(want)
    else:
        remove = [r for t, r in owned if t not in after]
        add = [r for r in want if r.text not in before]
    result.changes.append(Change(zone, shown, before, after, seen, remove, add))


# --------------------------------------------------------------------------------------------
# Apply


@dataclass
class Applied:
    zones: list[str] = field(default_factory=list)
    updates: int = 0
    seconds: float = 0.0


#: Room for the records of one update message (a DNS message over TCP holds at most 65,535 bytes).
UPDATE_BYTES = 60_000


def apply(the_plan: Plan, server: Server, key: TsigKey) -> Applied:
    """One signed update per zone with changes (more only when a zone's changes outgrow one
    message, each then with the prerequisites of its own names; the register last). Raises
    :class:`DnsError` on the first refusal: what was sent before it stands, the rest is not
    applied, and the next plan shows it."""
    start = time.monotonic()
    applied = Applied()
    keyring = key.keyring()
    for zone in the_plan.zones:
        changes = [c for c in the_plan.changes if c.zone == zone]
        changes.sort(key=lambda c: c.name.startswith(REGISTER_LABEL + "."))
        batches: list[list[Change]] = [[]]
        size = 0
        for change in changes:
            cost = _wire_size(change)
            if batches[-1] and size + cost > UPDATE_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(change)
            size += cost
        for batch in batches:
            update = dns.update.UpdateMessage(zone, keyring=keyring, keyalgorithm=key.algorithm)
            for change in batch:
                _add_change(update, change)
            server.updates += 1
            answer = server.exchange(update, f"the update of zone {zone}")
            rcode = answer.rcode()
            if rcode != dns.rcode.NOERROR:
                raise DnsError(_update_problem(server, zone, rcode))
            applied.updates += 1
        applied.zones.append(zone)
    applied.seconds = time.monotonic() - start
    return applied


def _add_change(update: dns.update.UpdateMessage, change: Change) -> None:
    name = dns.name.from_text(change.name)
    if change.seen.rdatas:  # prerequisite: exactly the TXT records the plan saw
        rdataset = dns.rdataset.Rdataset(dns.rdataclass.IN, dns.rdatatype.TXT)
        for rdata in change.seen.rdatas:
            rdataset.add(rdata)
        update.present(name, rdataset)
    else:  # prerequisite: still none
        update.absent(name, dns.rdatatype.TXT)
    for rdata in change.remove:
        update.delete(name, rdata)
    for record in change.add:
        update.add(name, record.ttl, record.rdata)


def _wire_size(change: Change) -> int:
    """Bytes a change takes in an update message, roughly (names uncompressed)."""
    rdatas = [*change.seen.rdatas, *change.remove, *(r.rdata for r in change.add)]
    return sum(len(change.name) + 12 + len(r.to_wire()) for r in rdatas) + len(change.name) + 12


def _update_problem(server: Server, zone: str, rcode: int) -> str:
    text = dns.rcode.to_text(rcode)
    if rcode in (dns.rcode.NXRRSET, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.YXDOMAIN):
        return (
            f"DNS server {server}: the update of zone {zone} was refused ({text}): records there "
            "changed since the plan; nothing of that zone was applied: run plan and apply again"
        )
    if rcode == dns.rcode.NOTAUTH:
        return (
            f"DNS server {server}: refused the update of zone {zone} (NOTAUTH): it is not the "
            "primary of that zone or does not accept the key; send updates to the zone's primary "
            "and check smtpgw_dns_tsig"
        )
    if rcode == dns.rcode.REFUSED:
        return (
            f"DNS server {server}: refused the update of zone {zone} (REFUSED): the zone does "
            "not take updates signed with this key; allow the key in the zone's update policy"
        )
    if rcode == dns.rcode.NOTZONE:
        return (
            f"DNS server {server}: a name is outside zone {zone} (NOTZONE); check smtpgw_dns_zones"
        )
    return f"DNS server {server}: refused the update of zone {zone} ({text})"


# --------------------------------------------------------------------------------------------
# Check


@dataclass
class Finding:
    domain: str
    name: str
    kind: str
    server: str
    status: str  # ok | missing | wrong | leftover (owned, in the register, no longer wanted)
    expected: str
    seen: list[str]


def authoritative_servers(primary: Server, zone: str) -> list[str]:
    """Addresses of the zone's NS hosts, resolved through the primary (else this machine)."""
    query = dns.message.make_query(zone, dns.rdatatype.NS)
    primary.queries += 1
    answer = primary.exchange(query, f"the NS query for {zone}")
    addresses: list[str] = []
    for rrset in answer.answer:
        if rrset.rdtype != dns.rdatatype.NS:
            continue
        for ns in rrset:
            target = ns.target
            query = dns.message.make_query(target, dns.rdatatype.A)
            primary.queries += 1
            found = primary.exchange(query, f"the address query for {target}")
            ips = [r.address for rs in found.answer if rs.rdtype == dns.rdatatype.A for r in rs]
            if not ips:
                try:
                    ips = [r.address for r in dns.resolver.resolve(target, "A")]
                except dns.exception.DNSException:
                    ips = []
            addresses += [ip for ip in ips if ip not in addresses]
    return addresses or [primary.address]


def check(desired: Desired, primary: Server, resolver: str | None = None) -> list[Finding]:
    """Each wanted record at every authoritative server of its zone, and at ``resolver``."""
    findings: list[Finding] = []
    servers: dict[str, Server] = {}
    try:
        for zone in sorted(desired.zones):
            if all(r.kind == "register" for r in desired.zones[zone]):
                continue  # a zone visited only for its register: nothing to check there
            targets = [(a, False) for a in authoritative_servers(primary, zone)]
            if resolver:
                targets.append((resolver, True))
            for address, recursive in targets:
                server = servers.setdefault(
                    f"{address}/{recursive}",
                    primary if address == primary.address and not recursive else Server(address),
                )
                label = f"{address} (resolver)" if recursive else address
                for record in desired.zones[zone]:
                    if record.kind == "register":
                        continue
                    answer = server.query_txt(record.name, recursive=recursive)
                    texts = [
                        txt_text(r)
                        for rs in answer.answer
                        if rs.rdtype == dns.rdatatype.TXT and rs.name == record.name
                        for r in rs
                    ]
                    mine = [t for t in texts if tag_of(t) == record.kind]
                    status = "ok" if record.text in mine else ("wrong" if mine else "missing")
                    findings.append(
                        Finding(
                            record.domain,
                            record.name.to_text(),
                            record.kind,
                            label,
                            status,
                            record.text,
                            mine,
                        )
                    )
        for zone in sorted(desired.zones):
            findings += leftovers(desired, primary, zone)
    finally:
        for server in servers.values():
            if server is not primary:
                server.close()
    return findings


NOT_WANTED = "(none: no longer wanted; `smtpgw dns apply` removes it)"


def leftovers(desired: Desired, primary: Server, zone: str) -> list[Finding]:
    """Records smtpgw owns at the primary that are no longer wanted: the names the zone's
    register lists that no wanted record has (a removed tenant, domain or DKIM selector), with
    owned TXT records still there. `apply` removes them."""
    register_name = absolute(REGISTER_LABEL, zone)
    register = read_name(primary, register_name, zone)
    wanted = {r.name for r in desired.zones.get(zone, [])}
    strings = (s.decode(errors="replace") for r in register.rdatas for s in r.strings)
    found = []
    for domain, names in sorted(parse_register(strings).items()):
        for relative in sorted(names):
            name = absolute(relative, domain)
            if name in wanted:
                continue
            owned = [t for t in read_name(primary, name, zone).texts if tag_of(t)]
            if owned:
                kind = tag_of(owned[0]) or ""
                found.append(
                    Finding(
                        domain, name.to_text(), kind, str(primary), "leftover", NOT_WANTED, owned
                    )
                )
    return found


def findings_as_dicts(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    return [asdict(f) for f in findings]


def tsig_key(value: Mapping[str, Any] | None) -> TsigKey:
    """The TSIG key from ``smtpgw_dns_tsig`` ({name, algorithm, secret}), checked."""
    if not isinstance(value, Mapping) or not all(value.get(k) for k in ("name", "secret")):
        raise DnsError(
            "smtpgw_dns_tsig: needs name, algorithm and secret of the key the DNS server takes "
            "updates signed with (e.g. from tsig-keygen); set it, the secret in a vault"
        )
    key = TsigKey(
        str(value["name"]), str(value.get("algorithm") or "hmac-sha256"), str(value["secret"])
    )
    try:
        key.keyring()
    except Exception as exc:  # binascii.Error, dns.name errors
        raise DnsError(
            f"smtpgw_dns_tsig: cannot use the key ({exc}); check name and secret"
        ) from None
    return key
