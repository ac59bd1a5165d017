"""The DNS records every tenant domain needs, computed from the inventory (pure: no I/O).

One function, :func:`desired_records`, turns the normalised tenants, the relays' public
addresses, the smart hosts' SPF mechanisms and the DKIM public keys into dnspython TXT records:

- ``<selector>._domainkey.<domain>``: the DKIM key of each selector (``v=DKIM1; k=...; p=...``),
  split into strings of at most 255 bytes;
- ``<domain>``: SPF (``v=spf1 ip4:... include:... ~all``), the relays' addresses, the mechanism
  of each smart host the tenant routes through, the tenant's own ``dns.spf``; a record that
  needs more than 10 DNS lookups (RFC 7208 4.6.4) is refused (with a resolver, the lookups
  inside each ``include:`` count too);
- ``_dmarc.<domain>``: DMARC (``v=DMARC1; p=none`` unless the tenant says otherwise);
- ``_mta-sts.<domain>`` (``v=STSv1; id=...``) when the tenant has ``dns.mta_sts``, with the
  policy file's text for the user's web server (``id`` changes when the policy does);
- ``_smtp._tls.<domain>`` (``v=TLSRPTv1; rua=mailto:...``) when it has ``dns.tls_reports``;
- ``_smtpgw.<zone>``: smtpgw's register of what it owns in the zone, one string per domain
  (``smtpgw acme.test @ _dmarc smtpgw-rsa._domainkey ...``), up to :data:`REGISTER_PER_RECORD`
  strings in a TXT record (BIND refuses more than 100 records of a type at a name): a later run
  finds the records of a removed tenant or selector through it.

smtpgw owns, at each of these names, only the TXT records whose text starts with the tag of
their kind (``v=spf1``, ``v=DKIM1``, ...): another TXT at the apex is never touched.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT

from .tenant_schema import DNS_DEFAULTS

__all__ = [
    "REGISTER_LABEL",
    "SPF_LOOKUP_LIMIT",
    "TAGS",
    "Desired",
    "DnsProblem",
    "Record",
    "desired_records",
    "export_lines",
    "include_lookups",
    "parse_register",
    "register_strings",
    "spf_lookups",
    "tag_of",
    "txt",
    "txt_text",
    "zone_for",
]

SPF_LOOKUP_LIMIT = 10
REGISTER_LABEL = "_smtpgw"
#: Domains per TXT record of the register (so 100 records, BIND's default limit, hold 2,000).
REGISTER_PER_RECORD = 20
#: The text each kind of record starts with: smtpgw owns only TXT records with these prefixes.
TAGS = {
    "spf": "v=spf1",
    "dkim": "v=DKIM1",
    "dmarc": "v=DMARC1",
    "mta-sts": "v=STSv1",
    "tls-rpt": "v=TLSRPTv1",
    "register": "smtpgw ",
}
# Relative names of each kind (the DKIM one is per selector).
_NAMES = {"spf": "@", "dmarc": "_dmarc", "mta-sts": "_mta-sts", "tls-rpt": "_smtp._tls"}
_LOOKUP_TERMS = ("include:", "a", "mx", "ptr", "exists:", "redirect=")


class DnsProblem(ValueError):
    """Input the records cannot be made from; the message names the place and the fix."""


@dataclass(frozen=True)
class Record:
    """One TXT record smtpgw wants: absolute name, kind (a key of :data:`TAGS`), rdata, TTL."""

    name: dns.name.Name
    kind: str
    rdata: dns.rdtypes.ANY.TXT.TXT
    ttl: int
    domain: str = ""

    @property
    def text(self) -> str:
        return txt_text(self.rdata)


@dataclass
class Desired:
    """What :func:`desired_records` computes: records by zone, MTA-STS policy files by domain."""

    zones: dict[str, list[Record]] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)  # domain -> zone

    def records(self) -> list[Record]:
        return [r for zone in sorted(self.zones) for r in self.zones[zone]]


def txt(text: str) -> dns.rdtypes.ANY.TXT.TXT:
    """A TXT rdata holding ``text``, split into strings of at most 255 bytes."""
    data = text.encode()
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)


def txt_text(rdata: Any) -> str:
    """The text a TXT rdata holds, its strings joined (as DKIM, SPF and DMARC read it)."""
    return b"".join(rdata.strings).decode(errors="replace")


def tag_of(text: str) -> str | None:
    """The kind of an owned record's text, or None for a TXT record smtpgw does not own."""
    for kind, tag in TAGS.items():
        if text == tag.strip() or text.startswith(
            tag if tag.endswith(" ") else (tag + " ", tag + ";")
        ):
            return kind
    return None


def zone_for(domain: str, zones: Iterable[str]) -> str:
    """The zone a domain's records go into: the longest of ``zones`` at or above it, else the
    domain itself (each domain its own zone)."""
    best = ""
    for zone in zones:
        zone = zone.rstrip(".").lower()
        if (domain == zone or domain.endswith("." + zone)) and len(zone) > len(best):
            best = zone
    return best or domain


def spf_lookups(terms: Iterable[str]) -> int:
    """DNS lookups an SPF record's own terms cost (RFC 7208 4.6.4; nested includes not counted)."""
    count = 0
    for term in terms:
        bare = term.lstrip("+-~?").lower()
        if bare.startswith(("include:", "exists:", "redirect=", "ptr")) or bare.split(":")[0].split(
            "/"
        )[0] in ("a", "mx"):
            count += 1
    return count


def include_lookups(
    target: str, fetch: Callable[[str], list[str]], _seen: frozenset[str] = frozenset()
) -> int:
    """DNS lookups inside an ``include:`` or ``redirect=`` target: the lookup terms of its own SPF
    record and, recursively, of those it includes. ``fetch(name)`` returns the TXT texts at a
    name (none when it has none or cannot be asked); a loop counts once."""
    target = target.rstrip(".").lower()
    if target in _seen or len(_seen) > SPF_LOOKUP_LIMIT:
        return 0
    records = [t for t in fetch(target) if t == "v=spf1" or t.startswith("v=spf1 ")]
    if len(records) != 1:
        return 0
    terms = records[0].split()[1:]
    count = spf_lookups(terms)
    for term in terms:
        nested = _target(term)
        if nested:
            count += include_lookups(nested, fetch, _seen | {target})
    return count


def _target(term: str) -> str | None:
    bare = term.lstrip("+-~?")
    for prefix in ("include:", "redirect="):
        if bare.lower().startswith(prefix) and "%" not in bare:
            return bare[len(prefix) :]
    return None


def register_strings(domain: str, names: Iterable[str]) -> list[str]:
    """The register's strings for a domain (more than one when they outgrow 255 bytes)."""
    strings: list[str] = []
    current = TAGS["register"] + domain
    for name in sorted(set(names)):
        if len(current) + 1 + len(name) > 255:
            strings.append(current)
            current = TAGS["register"] + domain
        current += " " + name
    return [*strings, current]


def parse_register(strings: Iterable[str]) -> dict[str, set[str]]:
    """Domain -> relative names, from the strings of the register's TXT records (strings that
    are not smtpgw's are ignored)."""
    found: dict[str, set[str]] = {}
    for text in strings:
        if not text.startswith(TAGS["register"]):
            continue
        domain, *names = text[len(TAGS["register"]) :].split()
        found.setdefault(domain, set()).update(names)
    return found


def absolute(relative: str, domain: str) -> dns.name.Name:
    origin = dns.name.from_text(domain)
    return origin if relative == "@" else dns.name.from_text(relative, origin)


def mta_sts_policy(settings: Mapping[str, Any]) -> str:
    """The policy file (RFC 8461 3.2) for https://mta-sts.<domain>/.well-known/mta-sts.txt."""
    lines = ["version: STSv1", f"mode: {settings['mode']}"]
    lines += [f"mx: {mx}" for mx in settings["mx"]]
    lines.append(f"max_age: {settings['max_age']}")
    return "\r\n".join(lines) + "\r\n"


def desired_records(
    tenants: Iterable[Mapping[str, Any]],
    relay_addresses: Iterable[str],
    dkim: Mapping[tuple[str, str], str],
    selectors: Iterable[str],
    *,
    smarthost_spf: Mapping[str, str] | None = None,
    route: str = "direct",
    zones: Iterable[str] = (),
    ttl: int = 3600,
    domain_selectors: Mapping[str, Iterable[str]] | None = None,
    spf_fetch: Callable[[str], list[str]] | None = None,
) -> Desired:
    """Every record of every present tenant's domains, grouped by zone.

    ``tenants``: normalised (``smtpgw.tenant_schema``); ``relay_addresses``: the relays' public
    addresses (SPF ``ip4``/``ip6``); ``dkim``: (domain, selector) -> the DKIM TXT value
    (``smtpgw.dkim_keys.txt_value``); ``selectors``: the selectors to publish; ``smarthost_spf``:
    smart host name -> the SPF mechanism of its senders (``include:spf.protection.outlook.com``);
    ``route``: the relays' route for tenants that name none; ``zones``: the zones the DNS
    server serves (a domain not below one is its own zone); ``domain_selectors``: domain -> the
    selectors to publish for it instead of ``selectors`` (a domain in a DKIM rotation);
    ``spf_fetch``: name -> its TXT texts, through a resolver: the lookups inside each
    ``include:`` count toward SPF's limit too (:func:`include_lookups`). Raises
    :class:`DnsProblem` listing every problem.
    """
    problems: list[str] = []
    spf_addresses = _spf_addresses(relay_addresses, problems)
    smarthost_spf = dict(smarthost_spf or {})
    selectors = list(selectors)
    zones = list(zones)
    desired = Desired()
    names_by_domain: dict[str, set[str]] = {}
    for tenant in sorted(tenants, key=lambda t: t["name"]):
        settings = {**DNS_DEFAULTS, **(tenant.get("dns") or {})}
        via = tenant.get("relay", {}).get("via") or route
        spf_terms = list(spf_addresses)
        if via != "direct":
            mechanism = smarthost_spf.get(via)
            if mechanism is None:
                problems.append(
                    f"tenant {tenant['name']}: routes through smart host '{via}', whose SPF "
                    f"mechanism is unknown; add {via}: include:<its SPF domain> to "
                    "smtpgw_dns_smarthost_spf"
                )
            else:
                spf_terms.append(mechanism)
        spf_terms += [t for t in settings["spf"] if t not in spf_terms]
        lookups = spf_lookups(spf_terms)
        inside: list[str] = []
        if spf_fetch is not None:
            for term in spf_terms:
                target = _target(term)
                nested = include_lookups(target, spf_fetch) if target else 0
                if nested:
                    lookups += nested
                    inside.append(f"{term} costs {nested} more inside")
        if lookups > SPF_LOOKUP_LIMIT:
            problems.append(
                f"tenant {tenant['name']}: dns.spf: the SPF record would need {lookups} DNS "
                f"lookups, more than SPF's limit of {SPF_LOOKUP_LIMIT} (every include:, a, mx, "
                "exists: costs one"
                + (f"; {', '.join(inside)}" if inside else "")
                + "); list fewer, or ip4:/ip6: networks instead"
            )
            continue
        for domain in tenant["domains"]:
            zone = zone_for(domain, zones)
            desired.domains[domain] = zone
            records = desired.zones.setdefault(zone, [])
            texts: list[tuple[str, str]] = [
                ("spf", " ".join(["v=spf1", *spf_terms, settings["spf_all"]]))
            ]
            for selector in (domain_selectors or {}).get(domain) or selectors:
                value = dkim.get((domain, selector))
                if value is None:
                    problems.append(
                        f"{domain}: no DKIM key for selector {selector}; run playbooks/dns.yml "
                        "or playbooks/site.yml, which make the missing keys"
                    )
                    continue
                texts.append((f"dkim:{selector}", value))
            texts.append(("dmarc", _dmarc(settings["dmarc"])))
            if settings["mta_sts"]:
                policy = mta_sts_policy(settings["mta_sts"])
                desired.policies[domain] = policy
                policy_id = hashlib.sha256(policy.encode()).hexdigest()[:20]
                texts.append(("mta-sts", f"v=STSv1; id={policy_id}"))
            if settings["tls_reports"]:
                rua = ",".join(f"mailto:{a}" for a in settings["tls_reports"])
                texts.append(("tls-rpt", f"v=TLSRPTv1; rua={rua}"))
            names = names_by_domain.setdefault(domain, set())
            for kind, text in texts:
                if kind.startswith("dkim:"):
                    relative, kind = f"{kind[5:]}._domainkey", "dkim"
                else:
                    relative = _NAMES[kind]
                names.add(relative)
                records.append(Record(absolute(relative, domain), kind, txt(text), ttl, domain))
    if problems:
        raise DnsProblem("\n".join(problems))
    for zone in zones:  # visited even without records: its register names removed domains
        desired.zones.setdefault(zone.rstrip(".").lower(), [])
    for zone, records in desired.zones.items():
        register = absolute(REGISTER_LABEL, zone)
        domains = sorted(d for d, z in desired.domains.items() if z == zone)
        for start in range(0, len(domains), REGISTER_PER_RECORD):
            strings = [
                text.encode()
                for domain in domains[start : start + REGISTER_PER_RECORD]
                for text in register_strings(domain, names_by_domain[domain])
            ]
            rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
            records.append(Record(register, "register", rdata, ttl, zone))
    return desired


def _dmarc(settings: Mapping[str, Any]) -> str:
    text = f"v=DMARC1; p={settings['policy']}"
    if settings["reports"]:
        text += "; rua=" + ",".join(f"mailto:{a}" for a in settings["reports"])
    return text


def _spf_addresses(addresses: Iterable[str], problems: list[str]) -> list[str]:
    terms: list[str] = []
    for address in addresses:
        try:
            network = ipaddress.ip_network(str(address).strip(), strict=True)
        except ValueError:
            problems.append(
                f"smtpgw_public_addresses: '{address}' is not an IP address; list the addresses "
                "the relays send from, as the recipients' MX hosts see them"
            )
            continue
        term = f"ip{network.version}:{network}"
        if network.num_addresses == 1:
            term = f"ip{network.version}:{network.network_address}"
        if term not in terms:
            terms.append(term)
    if not terms and not problems:
        problems.append(
            "smtpgw_public_addresses: no relay has one; set it on each relay (the addresses it "
            "sends from) so SPF can name them"
        )
    return terms


def export_lines(desired: Desired) -> list[str]:
    """The records as zone-file lines (absolute names), for publishing by hand."""
    lines: list[str] = []
    for zone in sorted(desired.zones):
        lines.append(f"; zone {zone}")
        for record in desired.zones[zone]:
            lines.append(
                f"{record.name.to_text()}\t{record.ttl}\tIN\tTXT\t{record.rdata.to_text()}"
            )
    for domain, policy in sorted(desired.policies.items()):
        lines.append(
            f"; https://mta-sts.{domain}/.well-known/mta-sts.txt (serve it as text/plain):"
        )
        lines += [f";   {line}" for line in policy.splitlines()]
    return lines
