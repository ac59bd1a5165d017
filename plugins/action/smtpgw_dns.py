"""Ansible action plugin: plan and publish the tenant domains' DNS records, on the controller."""

# Ansible's plugin contract puts DOCUMENTATION, EXAMPLES and RETURN before the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: smtpgw_dns
short_description: Plan and publish the DNS records of the tenant domains (SPF, DKIM, DMARC...)
description:
  - Computes the records of every tenant domain with C(smtpgw.dns_records) (SPF naming
    O(relay_addresses) and the smart hosts' mechanisms, the DKIM keys, DMARC, MTA-STS and
    TLS-RPT as the tenant files say), compares them with what the primary server O(server)
    holds (one TCP query per name smtpgw owns), and publishes the difference as one RFC 2136
    update per zone, signed with O(tsig), with prerequisites so that records someone changed
    since the comparison make the update fail rather than be overwritten.
  - Only TXT records whose text starts with the tag of their kind (C(v=spf1), C(v=DKIM1),
    C(v=DMARC1), C(v=STSv1), C(v=TLSRPTv1)) at the names smtpgw manages, and its register
    C(_smtpgw.<zone>), are ever changed or removed; a CNAME there is left alone and reported.
  - In check mode it only compares; with diff it shows the owned records before and after.
  - Runs on the controller only; it never connects to the target host.
version_added: "0.1.0"
author:
  - smtpgw maintainers
options:
  tenants:
    description:
      - The normalised tenants (the C(tenants) that M(smtpgw.gateway.smtpgw_tenants) returns).
    type: list
    elements: dict
    required: true
  dkim_keys:
    description:
      - The keys M(smtpgw.gateway.smtpgw_dkim_keys) returns (C(domain), C(selector), C(txt)).
    type: list
    elements: dict
    required: true
  relay_addresses:
    description: The relays' public addresses (SPF C(ip4)/C(ip6)).
    type: list
    elements: str
    required: true
  smarthost_spf:
    description: Smart-host name to the SPF mechanism of its senders.
    type: dict
    default: {}
  route:
    description: The relays' route for tenants that name none (C(direct) or a smart host).
    type: str
    default: direct
  zones:
    description: Zones the server serves; a domain below none of them is its own zone.
    type: list
    elements: str
    default: []
  ttl:
    description: TTL of the records, in seconds.
    type: int
    default: 3600
  server:
    description: Address of the primary server that takes the updates.
    type: str
    required: true
  port:
    description: Its port.
    type: int
    default: 53
  tsig:
    description: The key updates are signed with, C(name), C(algorithm) and C(secret).
    type: dict
    required: true
"""

EXAMPLES = r"""
- name: DNS | Publish the records
  smtpgw.gateway.smtpgw_dns:
    tenants: "{{ __dns_tenants.tenants }}"
    dkim_keys: "{{ __dns_keys.dkim_keys }}"
    relay_addresses: [192.0.2.25]
    server: 192.0.2.53
    tsig: {name: smtpgw, algorithm: hmac-sha256, secret: "{{ vault_tsig_secret }}"}
"""

RETURN = r"""
changes:
  description: Each name the run changes (or in check mode would change).
  returned: always
  type: list
  elements: dict
  contains:
    zone: {description: The zone., type: str}
    name: {description: The owner name., type: str}
    action: {description: C(add), C(change) or C(remove)., type: str}
    before: {description: The owned TXT texts before., type: list}
    after: {description: The owned TXT texts after., type: list}
conflicts:
  description: Names left alone (a CNAME someone else made), with the reason.
  returned: always
  type: list
  elements: dict
queries:
  description: DNS queries the comparison sent.
  returned: always
  type: int
updates:
  description: Update messages sent (one per zone with changes; none in check mode).
  returned: always
  type: int
policies:
  description: Domain to the MTA-STS policy file's text, for the user's web server.
  returned: always
  type: dict
"""

from dataclasses import asdict
from typing import Any

from ansible.plugins.action import ActionBase
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import (
    dns_publish,
    dns_records,
)

ARGUMENT_SPEC = {
    "tenants": {"type": "list", "elements": "dict", "required": True},
    "dkim_keys": {"type": "list", "elements": "dict", "required": True, "no_log": False},
    "relay_addresses": {"type": "list", "elements": "str", "required": True},
    "smarthost_spf": {"type": "dict", "default": {}},
    "route": {"type": "str", "default": "direct"},
    "zones": {"type": "list", "elements": "str", "default": []},
    "ttl": {"type": "int", "default": 3600},
    "server": {"type": "str", "required": True},
    "port": {"type": "int", "default": 53},
    "tsig": {"type": "dict", "required": True, "no_log": True},
}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars or {})
        del tmp
        _, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        keys = {(k["domain"], k["selector"]): k["txt"] for k in args["dkim_keys"]}
        selectors = sorted({k["selector"] for k in args["dkim_keys"]})
        # Each domain's own selectors: in a DKIM rotation a domain has others, or more.
        domain_selectors: dict[str, list[str]] = {}
        for k in args["dkim_keys"]:
            domain_selectors.setdefault(k["domain"], []).append(k["selector"])
        server = dns_publish.Server(args["server"].strip(), args["port"])
        try:
            desired = dns_records.desired_records(
                args["tenants"],
                args["relay_addresses"],
                keys,
                selectors,
                smarthost_spf=args["smarthost_spf"],
                route=args["route"],
                zones=args["zones"],
                ttl=args["ttl"],
                domain_selectors=domain_selectors,
            )
            key = dns_publish.tsig_key(args["tsig"])
            plan = dns_publish.plan(desired, server)
            updates = 0
            if plan.changes and not self._task.check_mode:
                updates = dns_publish.apply(plan, server, key).updates
        except (dns_records.DnsProblem, dns_publish.DnsError) as exc:
            result.update(failed=True, changed=False, msg=str(exc))
            return result
        finally:
            server.close()
        result.update(
            changed=bool(plan.changes),
            changes=[c.as_dict() for c in plan.changes],
            conflicts=[asdict(c) for c in plan.conflicts],
            queries=plan.queries,
            updates=updates,
            policies=desired.policies,
            msg="\n".join(plan.lines()) or "no changes",
        )
        if self._task.diff and plan.changes:
            result["diff"] = [
                {
                    "before_header": f"{c.name} TXT",
                    "after_header": f"{c.name} TXT",
                    "before": "".join(f"{t}\n" for t in c.before),
                    "after": "".join(f"{t}\n" for t in c.after),
                }
                for c in plan.changes
            ]
        return result
