"""Postfix lookup tables of a relay, computed from its tenants and smart hosts.

Pure functions: the relay role renders their lines into files (through the filter plugin
`smtpgw_postfix_maps`), so per-tenant data lands in a few maps instead of per-tenant tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

DIRECT = "direct"


class RouteError(ValueError):
    """A tenant or the relay names a smart host that is not defined."""


def nexthop(smarthost: Mapping[str, Any]) -> str:
    """`[host]:port`: the brackets turn off MX lookups for the smart host's name."""
    return f"[{smarthost['host']}]:{int(smarthost.get('port') or 587)}"


#: master.cf transport by (TLS mode, whether the relay presents its client certificate).
TRANSPORTS = {
    ("starttls", False): "smtp",
    ("implicit", False): "smtps",
    ("starttls", True): "smtpcert",
    ("implicit", True): "smtpscert",
}


def tls_mode(smarthost: Mapping[str, Any]) -> str:
    """`starttls` or `implicit`: as given, else implicit on port 465 only."""
    mode = smarthost.get("tls")
    if mode:
        return str(mode)
    return "implicit" if int(smarthost.get("port") or 587) == 465 else "starttls"


def transport(smarthost: Mapping[str, Any] | None) -> str:
    """The `transport:nexthop` that reaches a smart host (or the MX, for None).

    Implicit TLS (`tls: implicit`) goes through `smtps` (TLS from the first byte); a smart host
    that knows the relay by its certificate (`auth: certificate`) through `smtpcert`/`smtpscert`,
    which present the relay's own certificate (roles/relay master.cf).
    """
    if smarthost is None:
        return "smtp:"
    name = TRANSPORTS[(tls_mode(smarthost), smarthost.get("auth") == "certificate")]
    return f"{name}:{nexthop(smarthost)}"


def _by_name(smarthosts: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(s["name"]): s for s in smarthosts}


def _route_of(tenant: Mapping[str, Any], default: str) -> str:
    via = (tenant.get("relay") or {}).get("via")
    return str(via) if via else default


def _lookup(hosts: Mapping[str, Mapping[str, Any]], name: str, where: str) -> Mapping | None:
    if name == DIRECT:
        return None
    if name not in hosts:
        known = ", ".join(sorted(hosts)) or "none defined"
        raise RouteError(
            f"{where}: smart host '{name}' is not in relay_smarthosts ({known}); "
            "define it there or route via 'direct'"
        )
    return hosts[name]


def default_transport(route: str, smarthosts: Iterable[Mapping[str, Any]]) -> str:
    """main.cf default_transport for the relay's own route."""
    return transport(_lookup(_by_name(smarthosts), route, "relay_route"))


def postfix_maps(
    tenants: Iterable[Mapping[str, Any]],
    smarthosts: Iterable[Mapping[str, Any]],
    route: str = DIRECT,
) -> dict[str, list[str]]:
    """Every per-tenant table, as lines (without comments), keyed by table name.

    - sender_logins: `@domain login,...` - who may use a domain as envelope sender.
    - networks: `cidr OK` - who may relay without a login (a cidr: table).
    - sender_transport: `@domain transport:nexthop` for tenants routed unlike the relay.
    - sasl_passwd: credentials at smart hosts that take a login (`auth: login`), by sender
      domain and by next hop.
    - tls_policy: every smart host is reached over verified (or at least encrypted) TLS.
    """
    hosts = _by_name(smarthosts)
    default_host = _lookup(hosts, route, "relay_route")
    maps: dict[str, list[str]] = {
        "sender_logins": [],
        "networks": [],
        "sender_transport": [],
        "sasl_passwd": [],
        "tls_policy": [],
    }
    for tenant in sorted(tenants, key=lambda t: str(t["name"])):
        logins = [str(u["login"]) for u in tenant.get("users") or []]
        domains = [str(d) for d in tenant.get("domains") or []]
        if logins:
            maps["sender_logins"] += [f"@{d} {','.join(logins)}" for d in domains]
        maps["networks"] += [f"{net} OK" for net in tenant.get("networks") or []]
        name = _route_of(tenant, route)
        host = _lookup(hosts, name, f"tenant {tenant['name']}: relay.via")
        if host is not default_host:
            maps["sender_transport"] += [f"@{d} {transport(host)}" for d in domains]
        if host is not None and _logs_in(host):
            maps["sasl_passwd"] += [f"@{d} {_credentials(host)}" for d in domains]
    for host in sorted(hosts.values(), key=lambda h: str(h["name"])):
        if _logs_in(host):
            maps["sasl_passwd"].append(f"{nexthop(host)} {_credentials(host)}")
        level = "secure match=hostname" if host.get("tls_verify", True) else "encrypt"
        maps["tls_policy"].append(f"{nexthop(host)} {level}")
    maps["tls_policy"] = sorted(set(maps["tls_policy"]))
    return maps


def _logs_in(host: Mapping[str, Any]) -> bool:
    """A login at the smart host: `auth: login` (or no auth given) and a username."""
    return host.get("auth", "login") == "login" and bool(host.get("username"))


def _credentials(host: Mapping[str, Any]) -> str:
    return f"{host['username']}:{host.get('password') or ''}"
