"""Ansible action plugin: load, template, validate and normalise smtpgw tenant files."""

# Ansible's plugin contract puts DOCUMENTATION, EXAMPLES and RETURN before the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: smtpgw_tenants
short_description: Load and validate smtpgw tenant files
description:
  - Reads every C(*.yml) and C(*.yaml) file in O(path) (sorted by name; hidden files are
    skipped). Each file holds one tenant of the SMTP gateway.
  - A tenant file may be at most 1 MiB on disk, a regular file or a symbolic link to a file
    inside O(path), at most 50 levels deep and 200,000 values once YAML aliases are expanded,
    without self-references. Size and links are checked before the file is parsed, depth and
    aliases before anything in it is templated.
  - Files are loaded with Ansible's loader, so files encrypted with ansible-vault and inline
    C(!vault) values are decrypted. Then the values of C(users[].password),
    C(users[].password_hash) and C(networks[]) are templated with the task variables, so a
    C(password) of C("{{ vault_acme_scanner }}") resolves to the secret. Jinja anywhere else is
    an error (those fields must be written literally).
  - The data is then validated by C(smtpgw.tenant_schema) and returned normalised. Passwords
    are returned only as Dovecot C({SHA512-CRYPT}) hashes with a salt derived from the login and
    O(salt_key), so reruns give the same hash and the plaintext never appears in the result.
  - A C(password_hash) given in a file must be C({SHA512-CRYPT}), C({SHA256-CRYPT}) or
    C({BLF-CRYPT}) in the exact shape C(doveadm pw) writes (salt of 8-16 characters, rounds
    5000-1000000; bcrypt cost 05-16); C({PLAIN}), C({MD5}), C({CRYPT}), C({SHA}) and other
    schemes are refused.
  - Hashing costs a few milliseconds per user, so hashes are kept in a cache on the
    controller (see O(password_cache)) and a rerun hashes only new or changed passwords.
  - Every problem in every file is reported at once, one per line, each naming the file, the
    field, what is wrong and what to do. On any problem the task fails and returns no tenants.
  - Runs on the controller only; it never connects to the target host.
version_added: "0.1.0"
author:
  - smtpgw maintainers
options:
  path:
    description:
      - Directory holding the tenant files, usually C({{ inventory_dir }}/tenants).
      - A relative path is relative to the playbook directory.
      - An empty directory is fine and gives no tenants.
    type: path
    required: true
  smarthosts:
    description:
      - The known smart hosts, by name, or as the C(smtpgw_smarthosts) action returns them
        (resolved with their presets). A tenant's C(relay.via) must be C(direct) or one of these.
      - A resolved smart host's C(limits) fill the limits that a tenant routed through it
        (C(relay.via)) does not set.
    type: list
    elements: raw
    default: []
  salt_key:
    description:
      - Key for the HMAC that derives each user's password salt from the login.
      - Changing it changes every hash (and so rewrites the Dovecot password file once).
    type: str
    default: smtpgw
  password_cache:
    description:
      - Keep a cache of the hashes on the controller, so unchanged passwords are not hashed
        again on every run.
      - The cache maps an HMAC-SHA256 (under a random key kept beside it) of the login,
        password, O(salt_key) and scheme to the hash; only entries in use are kept, and the file
        is rewritten only when they change. Files are mode 0600 in a directory of mode 0700.
        It holds nothing the controller user (who has the vault password) cannot make, and
        nothing more than the relays' Dovecot password files.
    type: bool
    default: true
  password_cache_dir:
    description:
      - Directory of the cache. Default C($SMTPGW_PASSWORD_CACHE) if set (C(off) there turns
        the cache off), else C($XDG_CACHE_HOME/smtpgw), else C(~/.cache/smtpgw).
    type: path
notes:
  - Uses the collection's own copy of the C(smtpgw) Python package
    (C(plugins/module_utils/smtpgw)); nothing needs to be installed with pip.
  - Supports check mode; it never changes anything.
  - The tenant file format is described in the README (Tenants) and in the docstring of the
    C(smtpgw.tenant_schema) module.
"""

EXAMPLES = r"""
- name: Tenants | Load and validate the tenant files
  smtpgw.gateway.smtpgw_tenants:
    path: "{{ inventory_dir }}/tenants"
    smarthosts: "{{ relay_smarthosts | map(attribute='name') | list }}"
    salt_key: "{{ vault_smtpgw_salt_key }}"
  register: __relay_tenants

- name: Tenants | Write the Dovecot password file
  ansible.builtin.template:
    src: passwd.j2
    dest: /etc/dovecot/passwd
    owner: root
    group: dovecot
    mode: "0640"
  vars:
    relay_tenants: "{{ __relay_tenants.tenants }}"

# A tenant file, inventories/lab/tenants/acme.yml:
#
#   domains: [acme.test]
#   users:
#     - login: scanner@acme.test
#       password: "{{ vault_acme_scanner }}"
#   networks: [192.0.2.0/28]
#   limits: {messages_per_day: 100}
#   relay: {via: direct}
"""

RETURN = r"""
tenants:
  description:
    - The present tenants, sorted by name, with defaults filled in.
    - Domains are lowercase ASCII (IDNA) without a trailing dot; domains and networks are
      de-duplicated in their original order; networks are canonical CIDR strings.
  returned: success
  type: list
  elements: dict
  sample:
    - name: acme
      domains: [acme.test]
      users:
        - login: scanner@acme.test
          password_hash: "{SHA512-CRYPT}$6$PFpct6u4RthnqNl4$W3h/XeYEhNNGbH9t..."
      networks: [192.0.2.0/28]
      limits:
        messages_per_day: 100
        recipients_per_message: 50
      relay:
        via: direct
  contains:
    name:
      description: Tenant name (the file stem).
      type: str
    domains:
      description: Mail domains of the tenant.
      type: list
      elements: str
    users:
      description: SMTP AUTH users; C(login) is lowercased, C(password_hash) has a Dovecot scheme.
      type: list
      elements: dict
    networks:
      description: Client networks allowed to relay without authentication.
      type: list
      elements: str
    limits:
      description:
        - C(messages_per_day) (null means unlimited) and C(recipients_per_message) (default 50).
      type: dict
    relay:
      description: C(via) is C(direct) or the name of a smart host.
      type: dict
removed:
  description: Names of the tenants whose file sets C(state) to C(absent), sorted.
  returned: success
  type: list
  elements: str
  sample: [oldcorp]
msg:
  description: A summary, or every error found, one per line.
  returned: always
  type: str
  sample: "inventories/lab/tenants/acme.yml: users[0].password: variable 'vault_acme_scanner'
    is undefined; define it (for example in group_vars/all/vault.yml with ansible-vault)"
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleError, AnsibleParserError, AnsibleUndefinedVariable
from ansible.plugins.action import ActionBase

# The project's Python package, through this collection: plugins/module_utils/smtpgw is the
# package src/smtpgw itself (a link in the checkout, kept as a link by ansible-galaxy).
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import (
    password_cache,
    tenant_files,
    tenant_schema,
)

ARGUMENT_SPEC = {
    "path": {"type": "path", "required": True},
    "smarthosts": {"type": "list", "elements": "raw", "default": []},
    "salt_key": {"type": "str", "default": "smtpgw"},
    "password_cache": {"type": "bool", "default": True},
    "password_cache_dir": {"type": "path", "default": None},
}

_UNDEFINED_RE = re.compile(r"^'([^']+)' is undefined")
_VAULT_FIX = "run ansible-playbook with --ask-vault-pass or --vault-password-file"


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        del tmp  # unused since Ansible 2.5
        result["changed"] = False

        _, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        shown_dir = args["path"]
        directory = Path(self._loader.path_dwim(shown_dir))
        if not directory.is_dir():
            result.update(
                failed=True,
                msg=f"{shown_dir}: is not a directory; create it (tenant files go in "
                "inventories/<name>/tenants/) or fix the path argument",
            )
            return result

        templar = self._templar.copy_with_new_env(available_variables=task_vars)
        raw: dict[str, object] = {}
        for file in tenant_files.list_tenant_files(directory):
            shown = os.path.join(shown_dir, file.name)
            raw[shown] = self._load(file, directory, templar)

        outcome = tenant_schema.validate_tenants(raw, smarthosts=_smarthosts(args["smarthosts"]))
        if outcome.errors:
            result.update(failed=True, msg="\n".join(outcome.errors))
            return result
        tenants = password_cache.hash_passwords(
            outcome.tenants, args["salt_key"], cache=_cache(args)
        )
        result.update(
            tenants=tenants,
            removed=outcome.removed,
            msg=f"{len(outcome.tenants)} tenant(s), {len(outcome.removed)} removed",
        )
        return result

    def _load(self, file: Path, directory: Path, templar: Any) -> object:
        """Check the file's limits, parse (and decrypt) it, then template the fields that may."""
        problem = tenant_files.file_problem(file, directory)
        if problem:
            return tenant_schema.Unresolved(problem)
        try:
            data = self._loader.load_from_file(str(file), cache="none", trusted_as_template=True)
        except AnsibleParserError as exc:
            return tenant_schema.Unresolved(_parse_problem(exc))
        except AnsibleError as exc:
            return tenant_schema.Unresolved(_problem(exc, "cannot read the file"))
        except RecursionError:
            return tenant_schema.Unresolved(tenant_files.TOO_DEEP)
        problem = tenant_files.structure_problem(data)
        if problem:
            return tenant_schema.Unresolved(problem)
        return _render(templar, data, "")


def _smarthosts(given: list[Any]) -> dict[str, Any]:
    """Smart hosts by name: a resolved one (a dict) as it is, a bare name with nothing known."""
    return {
        str(h["name"]) if isinstance(h, dict) else str(h): h if isinstance(h, dict) else None
        for h in given
    }


def _cache(args: dict[str, Any]) -> Any:
    """The password cache the options ask for, or None."""
    if not args["password_cache"]:
        return None
    directory = args["password_cache_dir"] or password_cache.default_cache_dir()
    return None if directory is None else password_cache.PasswordCache(Path(directory))


def _render(templar: Any, value: object, path: str) -> object:
    """Template each leaf that may hold Jinja on its own, so a failure is reported at its field.

    Other leaves are left as written: validation refuses Jinja there.
    """
    if isinstance(value, Mapping):
        return {
            name: _render(templar, item, tenant_schema.join_path(path, str(name)))
            for name, item in value.items()
        }
    if isinstance(value, list):
        return [
            _render(templar, item, tenant_schema.join_path(path, index))
            for index, item in enumerate(value)
        ]
    if not tenant_schema.may_be_templated(path):
        return value
    try:
        return templar.template(value)
    except AnsibleError as exc:
        secret = path.endswith(("password", "password_hash"))
        return tenant_schema.Unresolved(_problem(exc, "cannot template the value", secret))


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


def _problem(exc: AnsibleError, what: str, secret: bool = False) -> str:
    message = _one_line(getattr(exc, "message", "") or str(exc))
    if isinstance(exc, AnsibleUndefinedVariable):
        where = "group_vars/all/vault.yml with ansible-vault" if secret else "group_vars/all/"
        match = _UNDEFINED_RE.match(message)
        if match:
            return f"variable '{match.group(1)}' is undefined; define it (for example in {where})"
        return f"{message}; define the missing variable (for example in {where})"
    if "vault" in message.lower() and ("secret" in message.lower() or "decrypt" in message):
        return f"{what}: {message}; {_VAULT_FIX}"
    return f"{what}: {message}; fix the Jinja expression"


def _parse_problem(exc: AnsibleParserError) -> str:
    message = _one_line(getattr(exc, "message", "") or str(exc))
    message = message.removeprefix("YAML parsing failed: ")
    origin = getattr(exc, "obj", None)
    line = getattr(origin, "line_num", None)
    column = getattr(origin, "col_num", None)
    where = ""
    if line:
        where = f" at line {line}" + (f", column {column}" if column else "")
    if "vault" in message.lower():
        return f"cannot decrypt the file: {message}; {_VAULT_FIX}"
    return f"YAML syntax error{where}: {message}; fix the YAML (indentation, quotes, brackets)"
