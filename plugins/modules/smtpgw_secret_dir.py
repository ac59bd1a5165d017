#!/usr/bin/python
"""Ansible module: a directory of secret files made to hold exactly the given files, in one task."""

# Ansible's module contract puts DOCUMENTATION, EXAMPLES and RETURN before the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: smtpgw_secret_dir
short_description: Make a directory hold exactly a set of secret files (the relay's DKIM keys)
description:
  - Writes every file of O(files) whose content differs (atomically, through a temporary file
    in the same directory), puts back the owner and mode of a file or of the directory that
    someone changed, and removes every file of O(path) that is not in O(files).
  - One task for any number of files, where a C(copy) loop costs a round trip per file.
  - File contents are never shown; the result and the diff name files only.
  - Refuses a O(path) that is not a directory, a subdirectory inside it, and a file name that
    is not a plain name.
version_added: "0.2.0"
author:
  - smtpgw maintainers
options:
  path:
    description: The directory. Made when missing.
    type: path
    required: true
  files:
    description: Every file the directory must hold.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: A plain file name (no C(/)).
        type: str
        required: true
      content:
        description: The file's text.
        type: str
        required: true
        no_log: true
  owner:
    description: Owner of the directory and the files.
    type: str
    required: true
  group:
    description: Group of the directory and the files.
    type: str
    required: true
  mode:
    description: Mode of each file, in octal.
    type: str
    default: "0600"
  dir_mode:
    description: Mode of the directory, in octal.
    type: str
    default: "0700"
notes:
  - Supports check mode and diff mode (file names only).
"""

EXAMPLES = r"""
- name: dkim | Install the private keys
  smtpgw.gateway.smtpgw_secret_dir:
    path: /var/lib/rspamd/smtpgw-dkim
    files:
      - name: acme.test.smtpgw-rsa.key
        content: "{{ vault_acme_dkim_rsa }}"
    owner: _rspamd
    group: _rspamd
  no_log: true
"""

RETURN = r"""
written:
  description: Files written because they were missing or their content differed.
  returned: always
  type: list
  elements: str
fixed:
  description: Files whose owner or mode was put back.
  returned: always
  type: list
  elements: str
removed:
  description: Files removed because they are not in O(files).
  returned: always
  type: list
  elements: str
"""

import grp
import pwd

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw.secret_dir import (
    SyncError,
    sync_dir,
)


def _octal(module: AnsibleModule, name: str) -> int:
    try:
        return int(module.params[name], 8)
    except ValueError:
        module.fail_json(msg=f"{name}: {module.params[name]!r} is not an octal mode such as 0600")
        raise


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "files": {
                "type": "list",
                "elements": "dict",
                "required": True,
                "options": {
                    "name": {"type": "str", "required": True},
                    "content": {"type": "str", "required": True, "no_log": True},
                },
            },
            "owner": {"type": "str", "required": True},
            "group": {"type": "str", "required": True},
            "mode": {"type": "str", "default": "0600"},
            "dir_mode": {"type": "str", "default": "0700"},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        uid = pwd.getpwnam(p["owner"]).pw_uid
        gid = grp.getgrnam(p["group"]).gr_gid
    except KeyError as exc:
        module.fail_json(msg=f"no such user or group on {module._name} target: {exc}")
    files: dict[str, bytes] = {}
    for entry in p["files"]:
        if entry["name"] in files:
            module.fail_json(msg=f"files: {entry['name']} is named twice")
        files[entry["name"]] = entry["content"].encode()
    try:
        result = sync_dir(
            p["path"],
            files,
            uid,
            gid,
            file_mode=_octal(module, "mode"),
            dir_mode=_octal(module, "dir_mode"),
            check=module.check_mode,
        )
    except (SyncError, OSError) as exc:
        module.fail_json(msg=f"{p['path']}: {exc}")
    lines = [f"{n}: written" for n in result.written]
    lines += [f"{n}: owner or mode put back" for n in result.fixed]
    module.exit_json(
        changed=result.changed,
        written=result.written,
        fixed=result.fixed,
        removed=result.removed,
        diff={
            "before": "".join(f"{n}\n" for n in result.before),
            "after": "".join(f"{n}\n" for n in sorted(files)),
            "after_header": f"{p['path']} ({'; '.join(lines) or 'names only'})",
        },
    )


if __name__ == "__main__":
    main()
