"""``smtpgw tenants new``: a tenant file from a template, its password in the user's vault file.

Everything is checked before anything is written: the name (not taken by a file or a tenant),
the domains (no other tenant has them), the preset (one of the inventory's smart hosts uses it),
the rendered file (validated with the inventory's other tenants, as ``smtpgw tenants check``
does), and the vault file (the variable is new; an encrypted file needs the vault password).
Then the password goes into the vault file and the tenant file is written.

The template is ``templates/tenant.yml.j2`` of the inventory when it has one, else the
project's. The vault file is ``group_vars/all/vault.yml`` of the inventory unless told
otherwise; a file encrypted with ansible-vault is decrypted, extended and encrypted again with
the same password (through Ansible's own vault code); a plain file is extended as text, its
comments kept; a new file is encrypted when a vault password is given, else written plain with
mode 0600 (and the command says to encrypt it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .presets import default_presets_dirs, load_presets, presets_dirs
from .tenant_files import (
    check_inventory,
    inventory_smarthost_hosts,
    inventory_smarthosts,
    is_vaulted,
    load_tenant_dir,
    load_tenant_file,
)

__all__ = ["NewTenant", "NewTenantError", "create_tenant", "plan_tenant"]

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_VAR_RE = re.compile(r"[^a-z0-9_]")


class NewTenantError(Exception):
    """The tenant cannot be made as asked; ``errors`` says why, one line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


@dataclass
class NewTenant:
    """What ``create_tenant`` will write (or wrote)."""

    name: str
    tenant_file: Path
    text: str
    vault_file: Path
    vault_var: str
    login: str
    password: str = field(repr=False)
    vault_note: str = ""


def template_path(inventory: Path) -> Path:
    own = inventory / "templates" / "tenant.yml.j2"
    if own.is_file():
        return own
    for providers in default_presets_dirs():
        project = providers.parent / "tenant.yml.j2"
        if project.is_file():
            return project
    raise NewTenantError(["templates/tenant.yml.j2: not found; reinstall smtpgw or add one"])


def plan_tenant(
    inventory: Path,
    name: str,
    domains: Sequence[str],
    preset: str | None = None,
    networks: Sequence[str] = (),
    login: str | None = None,
    vault_file: Path | None = None,
    password: str | None = None,
    vault_password_file: Path | None = None,
) -> NewTenant:
    """Check everything and render the file; writes nothing. Raises :class:`NewTenantError`."""
    import jinja2

    errors: list[str] = []
    tenants_dir = inventory / "tenants"
    if not tenants_dir.is_dir():
        raise NewTenantError([f"{tenants_dir}: no such directory; pass an inventory (--inventory)"])
    if not _NAME_RE.fullmatch(name):
        errors.append(f"{name}: not a tenant name; use lowercase letters, digits and '-'")
    target = tenants_dir / f"{name}.yml"
    if target.exists() or (tenants_dir / f"{name}.yaml").exists():
        errors.append(f"{target}: exists already; choose another name or edit that file")
    for file, data in load_tenant_dir(tenants_dir).items():
        if isinstance(data, dict) and data.get("name") == name:
            errors.append(f"{file}: tenant '{name}' is defined there; choose another name")
    if not domains:
        errors.append("--domain: at least one domain is needed")

    via = None
    limits: dict[str, Any] = {}
    if preset is not None:
        known = load_presets(presets_dirs(inventory)).by_name
        if preset not in known:
            errors.append(
                f"--preset: unknown preset '{preset}'; presets: {', '.join(sorted(known))}"
            )
        else:
            hosts, host_errors = inventory_smarthost_hosts(inventory)
            errors += host_errors
            using = sorted(n for n, h in hosts.items() if h.get("preset") == preset)
            if len(using) == 1:
                via, limits = using[0], hosts[using[0]]["limits"]
            elif not using:
                errors.append(
                    f"--preset: no smart host of {inventory} uses preset '{preset}'; add one to "
                    f"relay_smarthosts (group_vars/), e.g. {{name: {preset}, preset: {preset}, "
                    "...}, then run this again"
                )
            else:
                errors.append(
                    f"--preset: smart hosts {', '.join(using)} all use preset '{preset}'; "
                    "write relay.via in the new file by hand"
                )
    if errors:
        raise NewTenantError(errors)

    login = login or f"app@{domains[0]}"
    vault_var = "vault_" + _VAR_RE.sub("_", f"{name}_{login.split('@')[0]}".lower())
    vault_file = vault_file or inventory / "group_vars" / "all" / "vault.yml"
    template = template_path(inventory)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template.parent)),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    text = env.get_template(template.name).render(
        name=name,
        domains=list(domains),
        login=login,
        password_var=vault_var,
        networks=list(networks),
        via=via,
        preset=preset,
        limits=limits,
    )

    # The rendered file, checked with the others, as `smtpgw tenants check` would.
    scratch = tenants_dir / f".{name}.yml.new"
    try:
        scratch.write_text(text, encoding="utf-8")
        parsed = load_tenant_file(scratch)
    finally:
        scratch.unlink(missing_ok=True)
    if not isinstance(parsed, dict):
        raise NewTenantError([f"{template}: does not render a tenant mapping ({parsed})"])
    result = _check_with_others(inventory, target, parsed)
    problem = vault_problem(vault_file, vault_var, vault_password_file)
    if result or problem:
        raise NewTenantError(result + ([problem] if problem else []))
    return NewTenant(
        name=name,
        tenant_file=target,
        text=text,
        vault_file=vault_file,
        vault_var=vault_var,
        login=login,
        password=password or secrets.token_urlsafe(18),
    )


def _check_with_others(inventory: Path, target: Path, parsed: dict) -> list[str]:
    """Errors of the inventory's tenants with the new one among them, the new file's first."""
    from .tenant_schema import validate_tenants

    before = check_inventory(inventory)
    raw = load_tenant_dir(inventory / "tenants")
    raw[str(target)] = parsed
    hosts, _ = inventory_smarthost_hosts(inventory)
    names = inventory_smarthosts(inventory).names
    known = None if names is None else {n: hosts.get(n) for n in names}
    after = validate_tenants(raw, smarthosts=known, templated=False)
    old = set(before.errors)
    return [e for e in after.errors if e not in old] or [
        f"{e} (fix this first: the inventory's tenants must check clean)" for e in before.errors
    ]


def create_tenant(plan: NewTenant, vault_password_file: Path | None = None) -> NewTenant:
    """Put the password into the vault file, then write the tenant file (never over one)."""
    plan.vault_note = _add_to_vault(
        plan.vault_file, plan.vault_var, plan.password, vault_password_file
    )
    with plan.tenant_file.open("x", encoding="utf-8") as handle:
        handle.write(plan.text)
    return plan


def vault_problem(vault_file: Path, var: str, vault_password_file: Path | None) -> str | None:
    """Why the variable cannot be added to ``vault_file`` (``what; fix``), or None."""
    try:
        text = _read_vault(vault_file, vault_password_file)
    except NewTenantError as exc:
        return exc.errors[0]
    if text is None:
        return None
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        return f"{vault_file}: not a mapping of variables; fix the file or pass --vault-file"
    if var in data:
        return f"{vault_file}: {var} is defined already; remove it or choose another --login"
    return None


def _secret(vault_password_file: Path | None) -> Any:
    from ansible.parsing.dataloader import DataLoader
    from ansible.parsing.vault import get_file_vault_secret

    path = vault_password_file or os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE")
    if not path:
        return None
    secret = get_file_vault_secret(filename=str(path), loader=DataLoader())
    secret.load()
    return secret


def _read_vault(vault_file: Path, vault_password_file: Path | None) -> str | None:
    """The vault file's text (decrypted), or None when it does not exist."""
    if not vault_file.exists():
        return None
    if not is_vaulted(vault_file):
        return vault_file.read_text(encoding="utf-8")
    from ansible.parsing.vault import AnsibleVaultError, VaultLib

    secret = _secret(vault_password_file)
    if secret is None:
        raise NewTenantError(
            [
                f"{vault_file}: encrypted with ansible-vault; pass --vault-password-file FILE "
                "(or set ANSIBLE_VAULT_PASSWORD_FILE)"
            ]
        )
    try:
        return VaultLib([("default", secret)]).decrypt(vault_file.read_bytes()).decode()
    except AnsibleVaultError as exc:
        raise NewTenantError(
            [f"{vault_file}: cannot decrypt it ({exc}); check the vault password"]
        ) from None


def _add_to_vault(
    vault_file: Path, var: str, password: str, vault_password_file: Path | None
) -> str:
    """Add ``var: password`` to the vault file; returns a note for the user ("" if none)."""
    from ansible.parsing.vault import VaultLib

    text = _read_vault(vault_file, vault_password_file)
    line = f"{var}: {json.dumps(password)}\n"
    encrypted = vault_file.exists() and is_vaulted(vault_file)
    secret = _secret(vault_password_file)
    if text is None:
        text = "---\n# Secrets of the inventory (smtpgw tenants new adds tenant passwords here).\n"
        encrypted = secret is not None
    elif not text.endswith("\n"):
        text += "\n"
    text += line
    vault_file.parent.mkdir(parents=True, exist_ok=True)
    fresh = not vault_file.exists()
    if encrypted:
        data = VaultLib([("default", secret)]).encrypt(text, secret)
        _write(vault_file, data, fresh)
        return ""
    _write(vault_file, text.encode(), fresh)
    return (
        f"{vault_file} is not encrypted; encrypt it: ansible-vault encrypt {vault_file}"
        if fresh
        else ""
    )


def _write(path: Path, data: bytes, fresh: bool) -> None:
    """Replace ``path`` whole (a new file is 0600), through a file beside it."""
    mode = 0o600 if fresh else path.stat().st_mode & 0o777
    tmp = path.with_name(f".{path.name}.smtpgw-new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
