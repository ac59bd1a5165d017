"""Ansible action plugin: the DKIM rotations of the tenant domains, on the controller."""

# Ansible's plugin contract puts DOCUMENTATION, EXAMPLES and RETURN before the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: smtpgw_dkim_rotation
short_description: Read and move on the DKIM key rotations of the tenant domains
description:
  - A domain is in a rotation when the key store O(path) holds C(<domain>.rotation.json), written
    by C(smtpgw dkim rotate DOMAIN). Its phase follows from that file, the time and O(relays)
    (README, "DKIM key rotation").
  - O(mode=plan) changes nothing and returns, for each domain in a rotation, the selectors its
    relays sign with (R(signing)) and the selectors whose records are wanted (R(publish)).
  - O(mode=switched) records that O(host) now signs with the new keys of every domain whose
    phase lets relays switch (the relay role runs it once the host's rspamd has its new
    configuration).
  - O(mode=observe) asks every authoritative server of each rotating domain's zone for what its
    phase waits for (the new records there; the old ones gone) and records what it sees; the old
    key files leave the store once their records are gone.
  - Files are written atomically; a rerun changes nothing. Runs on the controller only.
version_added: "0.1.0"
author:
  - smtpgw maintainers
options:
  path:
    description: The key store, usually C({{ inventory_dir }}/dkim).
    type: path
    required: true
  domains:
    description: The tenant domains.
    type: list
    elements: str
    required: true
  relays:
    description: Every relay of the inventory (C(groups['relays'])).
    type: list
    elements: str
    required: true
  mode:
    description: What to do.
    type: str
    choices: [plan, switched, observe]
    default: plan
  host:
    description: The relay that switched (O(mode=switched)).
    type: str
  server:
    description: The primary DNS server (O(mode=observe)).
    type: str
  port:
    description: Its port.
    type: int
    default: 53
  zones:
    description: Zones the server serves (as M(smtpgw.gateway.smtpgw_dns)).
    type: list
    elements: str
    default: []
notes:
  - Supports check mode: it then records nothing.
"""

EXAMPLES = r"""
- name: dkim | Selectors of the domains in a rotation
  smtpgw.gateway.smtpgw_dkim_rotation:
    path: "{{ relay_dkim_keys_dir }}"
    domains: [acme.test]
    relays: "{{ groups['relays'] }}"
  register: __relay_dkim_rotation
"""

RETURN = r"""
rotations:
  description: Where each domain in a rotation is (phase, signing, publish, waits_for, not_before).
  returned: success
  type: list
  elements: dict
signing:
  description: Domain to a one-element list of the selector pair its relays sign with.
  returned: success
  type: dict
publish:
  description: Domain to the selector pairs whose DNS records are wanted.
  returned: success
  type: dict
recorded:
  description: Domain to what this run recorded (C(switched), C(published), C(retired)).
  returned: success
  type: dict
"""

from pathlib import Path
from typing import Any

from ansible.plugins.action import ActionBase
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import (
    dkim_rotation,
    dkim_rotation_ops,
    dns_publish,
)

ARGUMENT_SPEC = {
    "path": {"type": "path", "required": True},
    "domains": {"type": "list", "elements": "str", "required": True},
    "relays": {"type": "list", "elements": "str", "required": True},
    "mode": {"type": "str", "choices": ["plan", "switched", "observe"], "default": "plan"},
    "host": {"type": "str"},
    "server": {"type": "str"},
    "port": {"type": "int", "default": 53},
    "zones": {"type": "list", "elements": "str", "default": []},
}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars or {})
        del tmp
        _, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        store, domains, relays = Path(args["path"]), args["domains"], args["relays"]
        check = bool(self._task.check_mode)
        recorded: dict[str, str] = {}
        try:
            if args["mode"] == "switched":
                if not args["host"]:
                    raise dkim_rotation.RotationProblem("mode=switched: name the relay (host)")
                for domain in dkim_rotation_ops.record_switch(
                    store, domains, relays, args["host"], check=check
                ):
                    recorded[domain] = "switched"
            elif args["mode"] == "observe":
                if not args["server"]:
                    raise dkim_rotation.RotationProblem(
                        "mode=observe: name the primary DNS server (smtpgw_dns_server)"
                    )
                server = dns_publish.Server(args["server"].strip(), args["port"])
                try:
                    recorded = dkim_rotation_ops.observe(
                        store, domains, relays, server, args["zones"], check=check
                    )
                finally:
                    server.close()
            states = dkim_rotation_ops.statuses(dkim_rotation_ops.load_all(store, domains), relays)
        except (dkim_rotation.RotationProblem, dns_publish.DnsError) as exc:
            result.update(failed=True, changed=False, msg=str(exc))
            return result
        result.update(
            changed=bool(recorded),
            recorded=recorded,
            rotations=[dkim_rotation_ops.describe(s) for s in states.values()],
            signing=dkim_rotation_ops.signing_selectors(states),
            publish=dkim_rotation_ops.publish_selectors(states),
            msg="; ".join(f"{s.domain}: {s.phase}" for s in states.values()) or "no rotation",
        )
        return result
