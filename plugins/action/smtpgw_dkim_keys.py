"""Ansible action plugin: the DKIM key store on the controller (make missing keys, read others)."""

# Ansible's plugin contract puts DOCUMENTATION, EXAMPLES and RETURN before the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: smtpgw_dkim_keys
short_description: Make and read the DKIM keys of the tenant domains, on the controller
description:
  - Keeps one RSA-2048 and one Ed25519 private key per domain in O(path), each under its own
    selector, as C(<domain>.<selector>.key) (PKCS#8 PEM, mode 0600), with the public key as the
    value of its DNS TXT record in C(<domain>.<selector>.txt).
  - A key is made only when its file is missing; an existing key is never replaced. O(path) is
    made with mode 0700 when missing.
  - Refuses a store whose directory or key files others may read (any group or other
    permission), a key file it cannot read or parse, or a key of the wrong kind, naming the
    file and the fix. A key file encrypted with ansible-vault is decrypted.
  - Returns each key in the form rspamd reads (PEM for RSA; base64 of seed and public key for
    Ed25519); a successful result is hidden as with C(no_log), a failure is shown in full.
  - Runs on the controller only; it never connects to the target host.
version_added: "0.1.0"
author:
  - smtpgw maintainers
options:
  path:
    description: The key store, usually C({{ inventory_dir }}/dkim).
    type: path
    required: true
  domains:
    description: The domains to sign for.
    type: list
    elements: str
    required: true
  selectors:
    description: Selector of each key, C(rsa) and C(ed25519).
    type: dict
    default: {rsa: smtpgw-rsa, ed25519: smtpgw-ed25519}
  domain_selectors:
    description:
      - Domain to the selector pairs (each a dict like O(selectors)) it uses instead of
        O(selectors): a domain in a DKIM rotation (M(smtpgw.gateway.smtpgw_dkim_rotation)).
    type: dict
    default: {}
notes:
  - Supports check mode: it then makes nothing and reports the keys it would make.
"""

EXAMPLES = r"""
- name: dkim | Make and read the keys
  smtpgw.gateway.smtpgw_dkim_keys:
    path: "{{ inventory_dir }}/dkim"
    domains: [acme.test, globex.test]
  register: __relay_dkim
"""

RETURN = r"""
dkim_keys:
  description: One entry per domain and algorithm, sorted by domain.
  returned: success
  type: list
  elements: dict
  contains:
    domain: {description: The signing domain., type: str}
    selector: {description: The selector., type: str}
    algorithm: {description: C(rsa) or C(ed25519)., type: str}
    file: {description: The key file's name (in the store and on the relay)., type: str}
    private: {description: The private key as rspamd reads it (secret)., type: str}
    txt: {description: The DNS TXT value C(v=DKIM1; k=...; p=...)., type: str}
created:
  description: The key files made by this run.
  returned: success
  type: list
  elements: str
"""

import os
import tempfile
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import dkim_keys

ARGUMENT_SPEC = {
    "path": {"type": "path", "required": True},
    "domains": {"type": "list", "elements": "str", "required": True},
    "selectors": {"type": "dict", "default": dict(dkim_keys.DEFAULT_SELECTORS)},
    "domain_selectors": {"type": "dict", "default": {}},
}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars or {})
        del tmp
        result["changed"] = False
        _, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        store = Path(args["path"])
        try:
            specs = dkim_keys.key_specs(
                args["domains"], args["selectors"], args["domain_selectors"]
            )
            created = self._ensure_store(store)
            keys = []
            for spec in specs:
                keys.append(self._key(store, spec, created))
        except dkim_keys.KeyProblem as exc:
            result.update(failed=True, msg=str(exc))
            return result
        result.update(
            changed=bool(created),
            dkim_keys=keys,
            _ansible_no_log=True,  # the private keys; a failure (above) is shown in full
            created=created,
            msg=f"{len(keys)} key(s), {len(created)} made",
        )
        return result

    def _ensure_store(self, store: Path) -> list[str]:
        if not store.exists():
            if self._task.check_mode:
                return [str(store)]
            try:
                store.mkdir(mode=0o700, parents=True)
            except OSError as exc:
                raise dkim_keys.KeyProblem(
                    f"{store}: cannot create the DKIM key store ({exc.strerror}); "
                    "create it (mode 0700) or set relay_dkim_keys_dir to a writable directory"
                ) from None
            store.chmod(0o700)
            return [str(store)]
        problem = dkim_keys.mode_problem(str(store), store.stat().st_mode, directory=True)
        if problem:
            raise dkim_keys.KeyProblem(problem)
        return []

    def _key(self, store: Path, spec: dkim_keys.KeySpec, created: list[str]) -> dict[str, str]:
        path = store / spec.key_file
        if not path.exists() and not path.is_symlink():
            pem = dkim_keys.generate(spec.algorithm)
            if not self._task.check_mode:
                _create(path, pem, 0o600)
                pem = self._read(path)  # another run may have made it first
            created.append(str(path))
        else:
            problem = dkim_keys.mode_problem(str(path), path.stat().st_mode, directory=False)
            if problem:
                raise dkim_keys.KeyProblem(problem)
            pem = self._read(path)
        key = dkim_keys.load_private(pem, spec.algorithm, str(path))
        txt = dkim_keys.txt_value(key)
        txt_path = store / spec.txt_file
        if not self._task.check_mode and _read_or_none(txt_path) != txt + "\n":
            _replace(txt_path, (txt + "\n").encode(), 0o644)
        return {
            "domain": spec.domain,
            "selector": spec.selector,
            "algorithm": spec.algorithm,
            "file": spec.key_file,
            "private": dkim_keys.rspamd_private(key),
            "txt": txt,
        }

    def _read(self, path: Path) -> bytes:
        """The file's bytes, decrypted when ansible-vault encrypted it."""
        try:
            with path.open("rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise dkim_keys.KeyProblem(
                f"{path}: cannot read the private key ({exc.strerror}); give the user running "
                "Ansible read access (chmod 0600, owned by that user), or restore the file"
            ) from None
        if data.startswith(b"$ANSIBLE_VAULT"):
            try:
                real = self._loader.get_real_file(str(path), decrypt=True)
            except AnsibleError as exc:
                raise dkim_keys.KeyProblem(
                    f"{path}: cannot decrypt the private key ({_one_line(exc)}); run "
                    "ansible-playbook with --ask-vault-pass or --vault-password-file"
                ) from None
            try:
                data = Path(real).read_bytes()
            finally:
                self._loader.cleanup_tmp_file(real)
        return data


def _one_line(exc: AnsibleError) -> str:
    return " ".join(str(getattr(exc, "message", "") or exc).split()).rstrip(".")


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file, never over an existing one (two runs at once: the first key wins)."""
    tmp = _temp(path, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _replace(path: Path, data: bytes, mode: int) -> None:
    os.replace(_temp(path, data, mode), path)


def _temp(path: Path, data: bytes, mode: int) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp
