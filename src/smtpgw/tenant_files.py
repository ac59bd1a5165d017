"""Tenant files on disk: listing, safe YAML loading, limits, and checks without Ansible.

What a tenant file may be, for this loader and for the ``smtpgw_tenants`` action plugin alike:
at most :data:`MAX_FILE_BYTES` on disk, a regular file or a symbolic link to one inside the
tenants directory, at most :data:`MAX_DEPTH` levels deep and :data:`MAX_VALUES` values once
YAML aliases are expanded (which stops "billion laughs" files), and without self-references.
YAML is read with libyaml where PyYAML has it, refusing duplicate keys (merge keys ``<<:``
are fine) and reading Ansible's ``!vault`` and ``!unsafe`` tags.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .tenant_schema import (
    Result,
    TenantError,
    Unresolved,
    VaultedValue,
    drop_passwords,
    is_template,
    validate_tenants,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_VALUES",
    "TENANT_SUFFIXES",
    "TOO_DEEP",
    "SmarthostNames",
    "check_dir",
    "check_inventory",
    "file_problem",
    "inventory_smarthost_hosts",
    "inventory_smarthosts",
    "is_vaulted",
    "list_tenant_files",
    "load_tenant_dir",
    "load_tenant_file",
    "structure_problem",
]

TENANT_SUFFIXES = (".yml", ".yaml")
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 50  # a tenant file needs 4 (users[0].login)
MAX_VALUES = 200_000  # far more than 1 MiB of tenant can hold without aliases

TOO_DEEP = (
    f"the file nests deeper than {MAX_DEPTH} levels; "
    "a tenant needs 4 (users, a user, its fields): remove the extra nesting"
)

_VARS_SUFFIXES = ("", ".yml", ".yaml", ".json")
_MERGE_TAG = "tag:yaml.org,2002:merge"


def list_tenant_files(directory: Path) -> list[Path]:
    """Tenant files in ``directory``: ``*.yml`` and ``*.yaml``, no hidden files, sorted."""
    return sorted(
        entry
        for entry in directory.iterdir()
        if entry.suffix in TENANT_SUFFIXES and not entry.name.startswith(".") and entry.is_file()
    )


def is_vaulted(file: Path) -> bool:
    """True for a file encrypted as a whole with ansible-vault."""
    with file.open("rb") as handle:
        return handle.read(15) == b"$ANSIBLE_VAULT;"


def file_problem(file: Path, directory: Path) -> str | None:
    """Why ``file`` may not be read as a tenant file of ``directory`` (``what; fix``), or None.

    Refuses a symbolic link that leads out of ``directory`` and a file over the size cap.
    """
    if file.is_symlink():
        target = file.resolve()
        if not target.is_relative_to(directory.resolve()):
            return (
                f"is a symbolic link to {target}, outside {directory}; "
                "copy the file into the tenants directory (links may point only inside it)"
            )
    try:
        size = file.stat().st_size
    except OSError as exc:
        return f"cannot read the file ({exc.strerror}); check its permissions"
    if size > MAX_FILE_BYTES:
        return (
            f"the file is {size:,} bytes, more than the {MAX_FILE_BYTES:,} (1 MiB) a tenant file "
            "may hold; keep one tenant per file (a tenant this large is more than one)"
        )
    return None


def structure_problem(data: object) -> str | None:
    """Why parsed ``data`` is too deep, too large or self-referencing (``what; fix``), or None.

    Shared values (YAML aliases) are measured once and counted at every use, so the cost is
    linear in the file, not in its expansion.
    """
    measured: dict[int, tuple[int, int]] = {}  # id -> (values once expanded, height)
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(data, 1, False)]
    while stack:
        value, depth, done = stack.pop()
        if not isinstance(value, dict | list):
            continue
        key = id(value)
        children = list(value.values()) if isinstance(value, dict) else value
        if done:
            on_path.discard(key)
            count, height = 1, 1
            for child in children:
                child_count, child_height = measured.get(id(child), (1, 0))
                if not isinstance(child, dict | list):
                    child_count, child_height = 1, 0
                count += child_count
                height = max(height, child_height + 1)
            measured[key] = (count, height)
            if count > MAX_VALUES:
                return (
                    f"the file expands to more than {MAX_VALUES:,} values (YAML aliases?); "
                    "write the tenant out plainly, without repeated anchors"
                )
            continue
        if key in measured:
            if depth + measured[key][1] - 1 > MAX_DEPTH:
                return TOO_DEEP
            continue
        if key in on_path:
            return "the file refers to itself (a YAML alias inside its own anchor); remove it"
        if depth > MAX_DEPTH:
            return TOO_DEEP
        on_path.add(key)
        stack.append((value, depth, True))
        stack.extend((child, depth + 1, False) for child in children)
    return None


class TenantLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader (libyaml where present) that refuses duplicate keys and reads ``!vault``.

    Merge keys (``<<: *base``) are allowed and may be overridden by the mapping's own keys.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the constructor below says so
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}'", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


TenantLoader.add_constructor(
    "!vault", lambda loader, node: VaultedValue(loader.construct_scalar(node))
)
TenantLoader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))


def load_tenant_file(file: Path, directory: Path | None = None) -> object:
    """Parse one tenant file with plain YAML, within the limits above.

    Returns the data, or an :class:`Unresolved` saying what is wrong with the file.
    """
    problem = file_problem(file, directory or file.parent)
    if problem:
        return Unresolved(problem)
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return Unresolved(f"cannot read the file ({exc.strerror}); check its permissions")
    if len(raw) > MAX_FILE_BYTES:
        return Unresolved(
            f"the file is more than {MAX_FILE_BYTES:,} bytes; keep one tenant per file"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Unresolved("the file is not UTF-8 text; save it as UTF-8")
    try:
        data = yaml.load(text, Loader=TenantLoader)  # a SafeLoader
    except RecursionError:
        return Unresolved(TOO_DEEP)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        if "nesting depth" in problem:
            return Unresolved(TOO_DEEP)
        return Unresolved(
            f"YAML syntax error{where}: {problem}; fix the YAML (indentation, quotes, brackets)"
        )
    except yaml.YAMLError as exc:
        return Unresolved(f"YAML error: {exc}; fix the YAML")
    problem = structure_problem(data)
    return Unresolved(problem) if problem else data


def load_tenant_dir(path: Path) -> dict[str, object]:
    """Parse every tenant file in ``path`` with plain YAML.

    Returns display file name -> data; a file that cannot be read maps to an
    :class:`Unresolved` so :func:`~smtpgw.tenant_schema.validate_tenants` reports it with the
    other errors. Files encrypted as a whole with ansible-vault are left out (see
    :func:`check_dir`). Raises :class:`TenantError` when ``path`` is not a directory.
    """
    if not path.is_dir():
        raise TenantError(
            [
                f"{path}: is not a directory; create it (tenant files go in "
                "inventories/<name>/tenants/) or pass the right path"
            ]
        )
    loaded: dict[str, object] = {}
    for file in list_tenant_files(path):
        problem = file_problem(file, path)
        if problem:
            loaded[str(file)] = Unresolved(problem)
        elif not is_vaulted(file):
            loaded[str(file)] = load_tenant_file(file, path)
    return loaded


def check_dir(path: Path, smarthosts: Collection[str] | None = None) -> Result:
    """Load and validate a tenant directory without Ansible (secrets stay unresolved).

    The returned users carry ``login`` and ``password_hash`` only (``None`` unless given).
    """
    try:
        raw = load_tenant_dir(path)
    except TenantError as exc:
        return Result(errors=exc.errors)
    result = validate_tenants(raw, smarthosts=smarthosts, templated=False)
    result.tenants = drop_passwords(result.tenants)
    result.notes.extend(
        f"{file}: encrypted with ansible-vault, not checked here; "
        "run the playbook (with the vault password) to check it"
        for file in list_tenant_files(path)
        if str(file) not in raw
    )
    return result


# --------------------------------------------------------------------------------------
# Inventories


@dataclass
class SmarthostNames:
    """Smart-host names an inventory defines; ``names`` is None when they cannot be known."""

    names: list[str] | None = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def inventory_smarthosts(inventory: Path) -> SmarthostNames:
    """The ``relay_smarthosts`` names in ``group_vars/`` and ``host_vars/`` of ``inventory``.

    Read as plain YAML, without templating: a name (or the whole list) written as Jinja makes
    the names unknowable here (``names=None``, with a note). No definition at all gives ``[]``,
    as the relay role's default. Vault-encrypted files are skipped with a note.
    """
    found = SmarthostNames()
    names: set[str] = set()
    for file in _vars_files(inventory):
        if is_vaulted(file):
            found.notes.append(f"{file}: encrypted with ansible-vault, relay_smarthosts not read")
            continue
        data = load_tenant_file(file)
        if isinstance(data, Unresolved):
            found.notes.append(f"{file}: not read for relay_smarthosts ({data.problem})")
            continue
        if not isinstance(data, dict) or "relay_smarthosts" not in data:
            continue
        value = data["relay_smarthosts"]
        hosts = value if isinstance(value, list) else None
        host_names = [h.get("name") if isinstance(h, dict) else None for h in hosts or [None]]
        if hosts is not None and not hosts:
            continue
        if any(not isinstance(n, str) or is_template(n) for n in host_names):
            found.notes.append(
                f"{file}: relay_smarthosts is not a literal list of {{name: ...}}; "
                "relay.via is checked when the playbook runs"
            )
            found.names = None
            continue
        names.update(host_names)  # type: ignore[arg-type]
    if found.names is not None:
        found.names = sorted(names)
    return found


def _vars_files(inventory: Path) -> Iterable[Path]:
    for kind in ("group_vars", "host_vars"):
        top = inventory / kind
        if not top.is_dir():
            continue
        for file in sorted(top.rglob("*")):
            hidden = any(part.startswith(".") for part in file.relative_to(top).parts)
            if file.is_file() and not hidden and file.suffix in _VARS_SUFFIXES:
                yield file


def check_inventory(inventory: Path, smarthosts: Collection[str] = ()) -> Result:
    """:func:`check_dir` on ``inventory/tenants``, with the inventory's own smart hosts.

    ``smarthosts`` are extra names (e.g. defined outside the inventory's vars files). The
    inventory's literal ``relay_smarthosts`` are resolved with the presets
    (:func:`inventory_smarthost_hosts`): their errors are the result's too, and their
    documented limits fill the limits of the tenants routed through them.
    """
    found = inventory_smarthosts(inventory)
    hosts, host_errors = inventory_smarthost_hosts(inventory)
    known: Collection[str] | None = None
    if found.names is not None:
        known = {name: hosts.get(name) for name in sorted({*found.names, *smarthosts})}
    result = check_dir(inventory / "tenants", smarthosts=known)
    result.notes[:0] = found.notes
    if host_errors:
        result.errors[:0] = host_errors
        result.tenants, result.removed = [], []
    return result


def inventory_smarthost_hosts(inventory: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The inventory's literal ``relay_smarthosts``, resolved with its presets, by name.

    Lists that cannot be read literally (Jinja in a name, vault) are left out, as in
    :func:`inventory_smarthosts`; values written as Jinja (a vaulted password) stay as written.
    """
    from .presets import load_presets, presets_dirs, resolve_smarthosts

    presets = load_presets(presets_dirs(inventory))
    hosts: dict[str, dict[str, Any]] = {}
    errors = list(presets.errors)
    for file in _vars_files(inventory):
        if is_vaulted(file):
            continue
        data = load_tenant_file(file)
        if not isinstance(data, dict) or not isinstance(data.get("relay_smarthosts"), list):
            continue
        entries = data["relay_smarthosts"]
        if any(not isinstance(e, dict) or is_template(e.get("name")) for e in entries):
            continue
        resolved = resolve_smarthosts(entries, presets.by_name, where=str(file))
        errors += resolved.errors
        hosts.update({h["name"]: h for h in resolved.smarthosts})
    return hosts, errors
