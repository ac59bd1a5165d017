"""Ansible action plugin: resolve smtpgw smart hosts with their provider presets."""

# Ansible's plugin contract puts DOCUMENTATION, EXAMPLES and RETURN before the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: smtpgw_smarthosts
short_description: Resolve smart hosts with their provider presets
description:
  - Takes the smart hosts (the relay role's C(relay_smarthosts)) and fills in, for each one
    that names a C(preset), the preset's host, port, TLS mode, authentication, SPF include and
    documented limits; the smart host's own fields win, field by field.
  - Presets are the YAML files in the collection's C(templates/providers/), then in each of
    O(presets_dirs) (a later file of the same name wins).
  - Refuses an unknown preset, a field neither a smart host nor a preset has, a missing host,
    region, username or password, and an C(auth) of C(oauth2) (the relay cannot speak XOAUTH2 yet),
    each error naming the smart host, the field and what to do, and the presets that exist.
  - Runs on the controller only; it never connects to the target host. A successful result
    holds the smart hosts' passwords and is hidden as with C(no_log); a failure is shown in
    full (it never holds a password).
version_added: "0.1.0"
author:
  - smtpgw maintainers
options:
  smarthosts:
    description: The smart hosts, as C(relay_smarthosts).
    type: list
    elements: raw
    required: true
  presets_dirs:
    description:
      - Further directories of presets, e.g. C({{ inventory_dir }}/templates/providers).
      - A directory that does not exist is skipped.
    type: list
    elements: path
    default: []
notes:
  - The logic is C(smtpgw.presets.resolve_smarthosts), shared with C(smtpgw tenants check).
"""

EXAMPLES = r"""
- name: Resolve the smart hosts
  smtpgw.gateway.smtpgw_smarthosts:
    smarthosts:
      - name: m365
        preset: m365
        username: relay@example.com
        password: "{{ vault_m365_password }}"
    presets_dirs: ["{{ inventory_dir }}/templates/providers"]
  register: __relay_smarthosts_resolved
"""

RETURN = r"""
smarthosts:
  description:
    - Each smart host with C(name), C(preset), C(host), C(port), C(tls) (starttls or implicit),
      C(tls_verify), C(auth) (login, none or certificate), C(username), C(password),
      C(spf_include) and C(limits).
  returned: success
  type: list
  elements: dict
"""

from pathlib import Path
from typing import Any

from ansible.plugins.action import ActionBase
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import presets

ARGUMENT_SPEC = {
    "smarthosts": {"type": "list", "elements": "raw", "required": True},
    "presets_dirs": {"type": "list", "elements": "path", "default": []},
}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars or {})
        del tmp  # unused since Ansible 2.5
        result["changed"] = False
        _, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        dirs = presets.default_presets_dirs()
        dirs += [Path(d) for d in args["presets_dirs"] if Path(d).is_dir()]
        loaded = presets.load_presets(dirs)
        outcome = presets.resolve_smarthosts(args["smarthosts"], loaded.by_name)
        errors = loaded.errors + outcome.errors
        if errors:
            result.update(failed=True, msg="\n".join(errors))
            return result
        result.update(
            smarthosts=outcome.smarthosts,
            msg=f"{len(outcome.smarthosts)} smart host(s)",
            _ansible_no_log=True,  # the passwords; a failure (above) is shown in full
        )
        return result
