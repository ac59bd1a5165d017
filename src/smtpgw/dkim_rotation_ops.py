"""DKIM rotation on the controller: the state files in the key store, the DNS observations that
move a cycle on, and the ``smtpgw dkim`` commands (the phases: :mod:`smtpgw.dkim_rotation`).

Each domain in a cycle has ``<domain>.rotation.json`` in the key store (``relay_dkim_keys_dir``),
beside its keys, written atomically (a temporary file renamed over it). Every step reads it,
works out the phase from it, the time and the inventory's relays, and writes it back only when
something was observed: a rerun at any step changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import dns.name
import dns.rdatatype

from . import dkim_keys
from .dkim_rotation import Rotation, RotationProblem, Status, from_json, status, to_json
from .dns_publish import DnsError, Server, authoritative_servers
from .dns_records import tag_of, txt_text, zone_for

__all__ = [
    "ensure_keys",
    "load",
    "load_all",
    "observe",
    "publish_selectors",
    "record_switch",
    "save",
    "signing_selectors",
    "state_path",
    "statuses",
]

SUFFIX = ".rotation.json"


def state_path(store: Path, domain: str) -> Path:
    return store / f"{domain}{SUFFIX}"


def load(store: Path, domain: str) -> Rotation | None:
    path = state_path(store, domain)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RotationProblem(
            f"{path}: cannot read the rotation state ({exc.strerror}); give the user running "
            "smtpgw read access"
        ) from None
    rotation = from_json(text, str(path))
    if rotation.domain != domain:
        raise RotationProblem(f"{path}: holds the state of {rotation.domain}; remove or rename it")
    return rotation


def load_all(store: Path, domains: Iterable[str]) -> dict[str, Rotation]:
    found = {}
    for domain in sorted(set(domains)):
        rotation = load(store, domain)
        if rotation is not None:
            found[domain] = rotation
    return found


def save(store: Path, rotation: Rotation) -> None:
    """Write the state atomically (a reader sees the old or the new file, never a part)."""
    _write(state_path(store, rotation.domain), to_json(rotation).encode(), 0o600)


def _write(path: Path, data: bytes, mode: int, replace: bool = True) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # never over an existing key
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def statuses(
    rotations: Mapping[str, Rotation], relays: Iterable[str], now: float | None = None
) -> dict[str, Status]:
    now = time.time() if now is None else now
    relays = list(relays)
    return {d: status(r, now, relays) for d, r in rotations.items()}


def signing_selectors(states: Mapping[str, Status]) -> dict[str, list[dict[str, str]]]:
    """Domain -> the one selector pair its relays sign with (domains in a cycle only)."""
    return {d: [s.signing] for d, s in states.items()}


def publish_selectors(states: Mapping[str, Status]) -> dict[str, list[dict[str, str]]]:
    """Domain -> the selector pairs whose records are wanted (both during the overlap)."""
    return {d: list(s.publish) for d, s in states.items()}


def ensure_keys(store: Path, domain: str, selectors: Mapping[str, str]) -> list[str]:
    """Make the domain's missing keys under ``selectors`` (never replacing one); their .txt too."""
    made = []
    for spec in dkim_keys.key_specs([domain], selectors):
        path = store / spec.key_file
        if not path.exists():
            _write(path, dkim_keys.generate(spec.algorithm), 0o600, replace=False)
            made.append(str(path))
        data = path.read_bytes()
        if data.startswith(b"$ANSIBLE_VAULT"):
            continue  # the action plugin decrypts it and writes the .txt
        key = dkim_keys.load_private(data, spec.algorithm, str(path))
        txt = dkim_keys.txt_value(key) + "\n"
        txt_path = store / spec.txt_file
        if not txt_path.is_file() or txt_path.read_text() != txt:
            _write(txt_path, txt.encode(), 0o644)
    return made


def record_switch(
    store: Path,
    domains: Iterable[str],
    relays: Iterable[str],
    host: str,
    now: float | None = None,
    check: bool = False,
) -> list[str]:
    """Note that ``host`` now signs with the new keys of every domain whose phase lets it;
    the domains noted (none on a rerun)."""
    now = time.time() if now is None else now
    noted = []
    for domain, rotation in load_all(store, domains).items():
        phase = status(rotation, now, relays).phase
        if phase in ("switch", "grace", "retire") and host not in rotation.switched:
            rotation.switched[host] = now
            if not check:
                save(store, rotation)
            noted.append(domain)
    return noted


def _dkim_seen(server: Server, domain: str, selector: str) -> tuple[list[str], int]:
    """The owned DKIM texts at a selector's name on an authoritative server, and their TTL."""
    name = dns.name.from_text(f"{selector}._domainkey.{domain}")
    answer = server.query_txt(name)
    texts, ttl = [], 0
    for rrset in answer.answer:
        if rrset.name == name and rrset.rdtype == dns.rdatatype.TXT:
            texts += [t for t in (txt_text(r) for r in rrset) if tag_of(t) == "dkim"]
            ttl = max(ttl, rrset.ttl)
    return texts, ttl


def _read_txt(path: Path) -> str | None:
    """A key's TXT value as the key action wrote it (None before it has)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def observe(
    store: Path,
    domains: Iterable[str],
    relays: Iterable[str],
    primary: Server,
    zones: Iterable[str],
    now: float | None = None,
    check: bool = False,
) -> dict[str, str]:
    """Look at the authoritative servers for what the cycles in ``publish`` and ``retire`` wait
    for; record what is seen. Domain -> what was recorded (``published``, ``retired``)."""
    now = time.time() if now is None else now
    relays, zones = list(relays), list(zones)
    recorded: dict[str, str] = {}
    servers: dict[str, Server] = {}

    def server_list(zone: str) -> list[Server]:
        return [
            servers.setdefault(a, primary if a == primary.address else Server(a, primary.port))
            for a in authoritative_servers(primary, zone)
        ]

    try:
        for domain, rotation in load_all(store, domains).items():
            phase = status(rotation, now, relays).phase
            if phase not in ("publish", "retire"):
                continue
            targets = server_list(zone_for(domain, zones))
            if phase == "publish":
                want = {s: _read_txt(store / f"{domain}.{s}.txt") for s in rotation.new.values()}
                ttl, visible = 0, True
                for server in targets:
                    for selector in [*rotation.new.values(), *rotation.old.values()]:
                        texts, seen_ttl = _dkim_seen(server, domain, selector)
                        ttl = max(ttl, seen_ttl)
                        if selector in want and (
                            want[selector] is None or want[selector] not in texts
                        ):
                            visible = False
                if visible:
                    rotation.published, rotation.ttl = now, ttl
                    recorded[domain] = "published"
            else:
                gone = all(
                    not _dkim_seen(server, domain, selector)[0]
                    for server in targets
                    for selector in rotation.old.values()
                )
                if gone:
                    rotation.retired = now
                    recorded[domain] = "retired"
                    if not check:
                        for selector in rotation.old.values():
                            for suffix in (".key", ".txt"):
                                (store / f"{domain}.{selector}{suffix}").unlink(missing_ok=True)
            if domain in recorded and not check:
                save(store, rotation)
    finally:
        for server in servers.values():
            if server is not primary:
                server.close()
    return recorded


def describe(state: Status) -> dict[str, Any]:
    """A status for people and ``--json``: times as UTC ISO 8601 too."""
    out = state.as_dict()
    out["not_before_utc"] = (
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.not_before))
        if state.not_before is not None
        else None
    )
    return out


__all__ += ["DnsError", "describe"]


# --------------------------------------------------------------------------------------------
# The `smtpgw dkim` commands


def _publish(inputs: Any, print_: Any) -> None:
    """Plan and apply the records the inventory wants now (as `smtpgw dns apply`)."""
    from .dns_publish import apply, plan, tsig_key

    if not inputs.server:
        raise DnsError("smtpgw_dns_server is not set; name the primary DNS server of the zones")
    server = Server(str(inputs.server).strip(), inputs.port)
    try:
        the_plan = plan(inputs.desired(), server)
        for line in the_plan.lines():
            print_(line)
        if the_plan.changes:
            applied = apply(the_plan, server, tsig_key(inputs.tsig))
            print_(f"applied: {applied.updates} update(s) to {server}")
        else:
            print_("DNS: no changes, no update sent")
    finally:
        server.close()


def _observe(inputs: Any, domains: Iterable[str], print_: Any) -> None:
    server = Server(str(inputs.server).strip(), inputs.port)
    try:
        for domain, what in observe(
            inputs.keys_dir, domains, inputs.relays, server, inputs.zones
        ).items():
            print_(f"{domain}: {what}")
    finally:
        server.close()


def rotate(
    inventory: Path,
    domain: str | None,
    grace: int | None,
    print_: Any = print,
    now: float | None = None,
) -> list[Status]:
    """``smtpgw dkim rotate DOMAIN`` (start a cycle, or go on with one under way) and
    ``--continue`` (``domain`` None: every cycle): make the new keys, publish what the phase
    wants, observe the authoritative servers, and return where each cycle is."""
    from .dns_inputs import from_inventory

    inputs = from_inventory(inventory)
    domains = sorted(inputs.desired().domains)
    if domain is not None:
        if domain not in domains:
            raise RotationProblem(
                f"{domain}: is not a domain of any tenant in {inventory}; name one of "
                f"{', '.join(domains) or '(none)'}"
            )
        current = load(inputs.keys_dir, domain)
        if current is not None and current.retired is None:
            print_(f"{domain}: a rotation is under way (generation {current.generation}); going on")
        else:
            from .dkim_rotation import DEFAULT_GRACE, start

            if grace is None:
                grace = (
                    inputs.rotation_grace if inputs.rotation_grace is not None else DEFAULT_GRACE
                )
            rotation = start(
                domain,
                current,
                inputs.base_selectors,
                grace,
                time.time() if now is None else now,
            )
            made = ensure_keys(inputs.keys_dir, domain, rotation.old)
            made += ensure_keys(inputs.keys_dir, domain, rotation.new)
            save(inputs.keys_dir, rotation)
            print_(
                f"{domain}: rotation {rotation.generation} started: "
                f"{', '.join(rotation.old.values())} -> {', '.join(rotation.new.values())}, "
                f"grace {rotation.grace} s; {len(made)} key(s) made"
            )
            inputs = from_inventory(inventory)  # with the new cycle's records
    _publish(inputs, print_)
    _observe(inputs, domains, print_)
    return list(statuses(load_all(inputs.keys_dir, domains), inputs.relays).values())


def report(inventory: Path) -> list[dict[str, Any]]:
    """``smtpgw dkim status``: every tenant domain, its phase and what the next step waits for."""
    from .dns_inputs import from_inventory

    inputs = from_inventory(inventory)
    domains = sorted(inputs.desired().domains)
    states = statuses(load_all(inputs.keys_dir, domains), inputs.relays)
    out = []
    for domain in domains:
        if domain in states:
            out.append(describe(states[domain]))
        else:
            base = dict(inputs.base_selectors)
            out.append(
                {
                    "domain": domain,
                    "phase": "none",
                    "signing": base,
                    "publish": [base],
                    "waits_for": "nothing (no rotation; `smtpgw dkim rotate DOMAIN` starts one)",
                    "not_before": None,
                    "not_before_utc": None,
                    "pending_relays": [],
                }
            )
    return out


def status_lines(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    lines = []
    for e in entries:
        sign = ", ".join(e["signing"].values())
        published = " + ".join(", ".join(p.values()) for p in e["publish"])
        lines.append(f"{e['domain']}: {e['phase']}; signs with {sign}; publishes {published}")
        when = f" (not before {e['not_before_utc']})" if e["not_before_utc"] else ""
        lines.append(f"  next: waits for {e['waits_for']}{when}")
    return lines
