"""Every tenant-derived file of a relay, from one pure function.

``relay_files`` turns the validated tenants (and the smart hosts) into the list of files the
relay role renders in one loop: the Postfix lookup tables, Dovecot's logins, and rspamd's maps
and DKIM signing table. Each entry says where the file goes and how:

- ``name``: absolute path on the relay;
- ``lines``: its content, one string a line (the role adds the ``ansible_managed`` header);
- ``mode``, ``owner``, ``group``: as installed;
- ``secret``: holds passwords or hashes (the task is ``no_log`` for it);
- ``postmap``: a Postfix ``hash:`` table, whose database is rebuilt when it changes;
- ``notify``: the service that must reread it when it changes (``rspamd``, ``postfix`` for the
  cidr: table, or ``None``: Dovecot rereads its file; the hash: tables reload Postfix after their
  postmap);
- ``check``: the service whose configuration checker must accept it before it replaces the live
  file (``rspamd`` for its configuration; ``None`` for data files).

rspamd's maps:

- ``logins.map``: ``login tenant`` - the tenant of each SASL login;
- ``networks.map``: ``cidr tenant`` - the tenant of each client network (a radix map);
- ``domains.map``: ``tenant domain,domain`` - the domains a tenant may use in the envelope
  sender (devices) and the header From (everyone);
- ``limits.map``: ``tenant:NAME DAY,HOUR`` and ``login:LOGIN DAY,HOUR`` - the message limits
  (0: none) of every tenant with one, and of every login with limits of its own: what rspamd's
  count at the end of DATA holds each message to (``SMTPGW_LIMITS``);
- ``dkim_signing.conf``: the signing table, both keys of every tenant domain.

The policy service's limits (``limits.json``, read by src/smtpgw/policyd.py on the relay): the
limits of every tenant, the tenant (and limits of its own, if any) of every login, and the
tenant of every network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from .dkim_keys import DEFAULT_SELECTORS, key_specs
from .postfix_maps import DIRECT, postfix_maps

__all__ = ["RelayPaths", "relay_files"]


class RelayPaths:
    """Where the role keeps what it owns on the relay (roles/relay/vars/main.yml passes these)."""

    def __init__(self, paths: Mapping[str, str] | None = None) -> None:
        paths = paths or {}
        self.postfix = paths.get("postfix", "/etc/postfix/smtpgw")
        self.dovecot_users = paths.get("dovecot_users", "/etc/dovecot/smtpgw-users")
        self.rspamd_maps = paths.get("rspamd_maps", "/etc/rspamd/smtpgw")
        self.rspamd_local = paths.get("rspamd_local", "/etc/rspamd/local.d")
        self.dkim_keys = paths.get("dkim_keys", "/var/lib/rspamd/smtpgw-dkim")
        self.limits = paths.get("limits", "/etc/smtpgw/limits.json")


# Postfix's hash: tables; `secret` ones hold passwords.
_HASH_TABLES = (
    ("sender_logins", False),
    ("sender_transport", False),
    ("tls_policy", False),
    ("sasl_passwd", True),
)


def _file(name: str, lines: list[str], **kw: Any) -> dict[str, Any]:
    entry = {
        "name": name,
        "lines": lines,
        "mode": "0644",
        "owner": "root",
        "group": "root",
        "secret": False,
        "postmap": False,
        "notify": None,
        "check": None,
    }
    entry.update(kw)
    return entry


def relay_files(
    tenants: Iterable[Mapping[str, Any]],
    smarthosts: Iterable[Mapping[str, Any]],
    route: str = DIRECT,
    selectors: Mapping[str, str] | None = None,
    paths: Mapping[str, str] | None = None,
    domain_selectors: Mapping[str, Iterable[Mapping[str, str]]] | None = None,
) -> list[dict[str, Any]]:
    """Every tenant-derived file of the relay, in the order the role writes them.

    ``domain_selectors``: domain -> the selector pair it signs with instead of ``selectors``
    (as a one-element list; a domain in a DKIM rotation)."""
    tenants = sorted(tenants, key=lambda t: str(t["name"]))
    where = RelayPaths(paths)
    maps = postfix_maps(tenants, smarthosts, route)
    files = [
        _file(
            f"{where.postfix}/{name}",
            maps[name],
            mode="0600" if secret else "0644",
            secret=secret,
            postmap=True,
        )
        for name, secret in _HASH_TABLES
    ]
    # A cidr: table is read when a process starts: only a reload of Postfix makes a new one count.
    files.append(_file(f"{where.postfix}/networks.cidr", maps["networks"], notify="postfix"))
    files.append(
        _file(
            where.dovecot_users,
            [
                f"{user['login']}:{user['password_hash']}"
                for tenant in tenants
                for user in tenant.get("users") or []
            ],
            mode="0640",
            group="dovecot",
            secret=True,
        )
    )
    rspamd = {"notify": "rspamd"}
    limits = limits_document(tenants)  # the policy service's limits.json and rspamd's limits.map
    files += [
        _file(
            f"{where.rspamd_maps}/logins.map",
            [
                f"{user['login']} {tenant['name']}"
                for tenant in tenants
                for user in tenant.get("users") or []
            ],
            **rspamd,
        ),
        _file(
            f"{where.rspamd_maps}/networks.map",
            [f"{net} {t['name']}" for t in tenants for net in t.get("networks") or []],
            **rspamd,
        ),
        _file(
            f"{where.rspamd_maps}/domains.map",
            [f"{tenant['name']} {','.join(tenant['domains'])}" for tenant in tenants],
            **rspamd,
        ),
        _file(f"{where.rspamd_maps}/limits.map", rspamd_limits_lines(limits), **rspamd),
        _file(
            f"{where.rspamd_local}/dkim_signing.conf",
            dkim_signing_lines(tenants, selectors or DEFAULT_SELECTORS, where, domain_selectors),
            check="rspamd",
            **rspamd,
        ),
    ]
    files.append(_file(where.limits, limits_lines(limits), notify="policy"))
    return files


_LIMIT_KEYS = ("messages_per_day", "messages_per_hour", "recipients_per_message")


def limits_document(tenants: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What the policy service needs: tenants' limits, logins' tenants, networks' tenants."""
    doc: dict[str, Any] = {"tenants": {}, "logins": {}, "networks": []}
    for tenant in tenants:
        name = str(tenant["name"])
        limits = tenant.get("limits") or {}
        doc["tenants"][name] = {k: limits.get(k) for k in _LIMIT_KEYS}
        own = limits.get("logins") or {}
        for user in tenant.get("users") or []:
            entry: dict[str, Any] = {"tenant": name}
            if user["login"] in own:
                entry["limits"] = {k: own[user["login"]].get(k) for k in _LIMIT_KEYS}
            doc["logins"][user["login"]] = entry
        doc["networks"] += [[str(net), name] for net in tenant.get("networks") or []]
    return doc


def rspamd_limits_lines(doc: Mapping[str, Any]) -> list[str]:
    """limits.map, from ``limits_document``: the message limits of each counter that has one, as
    rspamd's count reads them (the keys name the Redis counters the policy service looks at)."""
    subjects = [(f"tenant:{name}", lim) for name, lim in sorted(doc["tenants"].items())]
    subjects += [
        (f"login:{login.lower()}", entry["limits"])
        for login, entry in sorted(doc["logins"].items())
        if entry.get("limits")
    ]
    lines = []
    for key, lim in subjects:
        day, hour = lim.get("messages_per_day") or 0, lim.get("messages_per_hour") or 0
        if day or hour:
            lines.append(f"{key} {day},{hour}")
    return lines


def limits_lines(doc: Mapping[str, Any]) -> list[str]:
    """limits.json, from ``limits_document``: one line per tenant, login and network (so a diff
    reads well)."""
    lines = ["{", '"tenants": {']
    for part, closing in (("tenants", "},"), ("logins", "},")):
        items = sorted(doc[part].items())
        lines += [
            f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
            + ("," if i < len(items) - 1 else "")
            for i, (k, v) in enumerate(items)
        ]
        lines.append(closing)
        if part == "tenants":
            lines.append('"logins": {')
    lines.append('"networks": [')
    nets = doc["networks"]
    lines += [f"  {json.dumps(n)}" + ("," if i < len(nets) - 1 else "") for i, n in enumerate(nets)]
    lines += ["]", "}"]
    return lines


def signing_domains(tenants: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every domain the relay signs for (each tenant domain), sorted."""
    return sorted({str(d) for tenant in tenants for d in tenant.get("domains") or []})


def dkim_signing_lines(
    tenants: Iterable[Mapping[str, Any]],
    selectors: Mapping[str, str],
    where: RelayPaths,
    domain_selectors: Mapping[str, Iterable[Mapping[str, str]]] | None = None,
) -> list[str]:
    """rspamd's dkim_signing module: sign mail from logins and tenant networks with both keys
    of the header From's domain. The SMTPGW_FROM_CHECK prefilter has already held the header
    From (and for devices the envelope sender; Postfix does it for logins) to the tenant's
    domains, so the login's domain and the envelope's need not equal the header's
    (allow_username_mismatch, allow_hdrfrom_mismatch)."""
    lines = [
        "enabled = true;",
        'use_domain = "header";',
        "use_esld = false;",
        "allow_username_mismatch = true;",
        "allow_hdrfrom_mismatch = true;",
        "allow_hdrfrom_multiple = false;",
        "allow_envfrom_empty = true;",
        "sign_authenticated = true;",
        "sign_local = false;",
        "sign_inbound = false;",
        f'sign_networks = "{where.rspamd_maps}/networks.map";',
        "try_fallback = false;",
        "use_redis = false;",
        "check_pubkey = false;",
        "domain {",
    ]
    for domain in signing_domains(tenants):
        lines.append(f'  "{domain}" {{')
        lines.append("    selectors = [")
        for spec in key_specs([domain], selectors, domain_selectors):
            lines.append(
                f'      {{ path = "{where.dkim_keys}/{spec.key_file}"; '
                f'selector = "{spec.selector}"; }},'
            )
        lines += ["    ];", "  }"]
    lines.append("}")
    return lines
