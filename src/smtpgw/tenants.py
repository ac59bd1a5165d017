"""The tenant model: load tenant files, validate them, and normalise them.

A tenant file (``inventories/NAME/tenants/<name>.yml``) holds one YAML mapping::

    name: acme                  # optional, defaults to the file stem
    state: present              # present | absent
    domains: [acme.test]
    users:
      - login: scanner@acme.test
        password: "{{ vault_acme_scanner }}"   # or password_hash: "{SHA512-CRYPT}$6$..."
    networks: [192.0.2.0/28]
    limits: {messages_per_day: 100, recipients_per_message: 50}
    relay: {via: direct}        # or a smart host's name; default: the relay's route

:func:`validate_tenants` is pure: it takes already parsed (and, under Ansible, already
templated) data keyed by the file name to show in messages, and returns a :class:`Result`.
Every message reads ``<file>: <field path>: <what is wrong>; <what to do>``.
:func:`check_dir` loads a directory with plain YAML for the ``smtpgw tenants check`` command.
"""

from __future__ import annotations

import difflib
import encodings.idna
import ipaddress
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .passwords import dovecot_hash

__all__ = [
    "DEFAULT_RECIPIENTS_PER_MESSAGE",
    "Result",
    "TenantError",
    "Unresolved",
    "VaultedValue",
    "check_dir",
    "is_secret_reference",
    "join_path",
    "list_tenant_files",
    "load_tenant_dir",
    "normalise_domain",
    "validate_tenants",
]

DEFAULT_RECIPIENTS_PER_MESSAGE = 50
MIN_PASSWORD_LENGTH = 12
TENANT_SUFFIXES = (".yml", ".yaml")

TENANT_FIELDS = ("name", "state", "domains", "users", "networks", "limits", "relay")
USER_FIELDS = ("login", "password", "password_hash")
LIMIT_FIELDS = ("messages_per_day", "recipients_per_message")
RELAY_FIELDS = ("via",)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCAL_PART_RE = re.compile(r"^[A-Za-z0-9._%+-]{1,64}$")
_SCHEME_RE = re.compile(r"^\{[A-Za-z0-9._-]+\}")
_MIN_PREFIX = {4: 8, 6: 32}

_EXAMPLE_TENANT = "name: acme, domains: [acme.test]"
_VAULT_FIX = "define it (for example in group_vars/all/vault.yml with ansible-vault)"


class TenantError(Exception):
    """Tenant data is invalid; ``errors`` holds one message per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class Unresolved:
    """A value (or a whole file) that could not be loaded or templated.

    ``problem`` reads ``<what is wrong>; <what to do>``; validation reports it at the
    value's field path and stays quiet about that field otherwise.
    """

    problem: str


@dataclass(frozen=True)
class VaultedValue:
    """An inline ``!vault`` value read without Ansible (so without the vault password)."""

    ciphertext: str


@dataclass
class Result:
    """Outcome of a validation: normalised tenants, removed names, and errors.

    Nothing partial: when ``errors`` is not empty, ``tenants`` and ``removed`` are empty.
    ``notes`` are things that were not checked (for example vault-encrypted files
    read without Ansible); they are not errors.
    """

    tenants: list[dict[str, Any]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise :class:`TenantError` listing every error, if there are any."""
        if self.errors:
            raise TenantError(self.errors)


# --------------------------------------------------------------------------------------
# Small public helpers


def join_path(parent: str, key: str | int) -> str:
    """Field path in messages: ``users`` + 1 -> ``users[1]``, ``users[1]`` + ``login``."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def is_secret_reference(value: object) -> bool:
    """True for a value that names a secret instead of holding it (Jinja or ``!vault``)."""
    if isinstance(value, VaultedValue):
        return True
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def normalise_domain(value: str) -> str:
    """Return the lowercase ASCII (IDNA) form of a DNS name, without a trailing dot.

    Raises ``ValueError`` with a ``<what is wrong>; <what to do>`` message.
    """
    name = value.strip()
    if name.endswith("."):
        name = name[:-1]
    fix = "write a domain name such as acme.test"
    if not name:
        raise ValueError(f"domain name is empty; {fix}")
    labels = name.lower().split(".")
    if len(labels) < 2:
        raise ValueError(f"'{value}' has only one label; {fix} (at least two labels)")
    ascii_labels = []
    for label in labels:
        if not label:
            raise ValueError(f"'{value}' has an empty label (two dots in a row?); {fix}")
        ascii_label = label if label.isascii() else _to_ascii(value, label)
        if len(ascii_label) > 63:
            raise ValueError(
                f"'{value}' has a label longer than 63 characters; shorten '{label[:20]}...'"
            )
        if not _LABEL_RE.match(ascii_label):
            raise ValueError(
                f"'{value}' has an invalid label '{label}'; use letters, digits and '-' "
                "(not at the start or end of a label)"
            )
        ascii_labels.append(ascii_label)
    if ascii_labels[-1].isdigit():
        raise ValueError(f"'{value}' ends in a numeric label (an IP address?); {fix}")
    result = ".".join(ascii_labels)
    if len(result) > 253:
        raise ValueError(f"'{value}' is longer than 253 characters; use a shorter domain name")
    return result


def _to_ascii(value: str, label: str) -> str:
    try:
        return encodings.idna.ToASCII(label).decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError(
            f"'{value}' has a label '{label}' that is not valid IDNA ({exc}); "
            "write the domain in its xn-- (punycode) form"
        ) from None


# --------------------------------------------------------------------------------------
# Validation


class _FileCheck:
    """Collects the messages for one tenant file."""

    def __init__(
        self, file: str, quiet_paths: Collection[str] = (), templates_resolved: bool = True
    ) -> None:
        self.file = file
        self.quiet_paths = set(quiet_paths)
        self.errors: list[str] = []
        # False without Ansible: a Jinja expression is left for the deploy-time check.
        self.templates_resolved = templates_resolved

    def error(self, path: str, what: str, fix: str) -> None:
        if path in self.quiet_paths:
            return
        where = f"{self.file}: {path}" if path else self.file
        self.errors.append(f"{where}: {what}; {fix}")


@dataclass
class _Tenant:
    file: str
    name: str
    data: dict[str, Any]
    domain_paths: dict[str, str]  # normalised domain -> field path
    login_paths: dict[str, str]  # normalised login -> field path


def validate_tenants(
    raw: Mapping[str, object],
    smarthosts: Collection[str] | None = None,
    salt_key: str = "smtpgw",
    resolve_secrets: bool = True,
) -> Result:
    """Validate and normalise tenant data.

    ``raw`` maps the file name to show in messages to the parsed content of that file
    (or an :class:`Unresolved` when it could not be read). ``smarthosts`` lists the known
    smart hosts for ``relay.via``; ``None`` skips that check. With ``resolve_secrets``
    false, a password that is a Jinja expression or ``!vault`` value is accepted without
    being hashed (``password_hash: None``), for checks run without Ansible.
    """
    errors: list[str] = []
    present: list[_Tenant] = []
    removed: list[tuple[str, str]] = []  # (name, file)
    seen_names: dict[str, str] = {}
    for file in sorted(raw):
        check, tenant, absent_name = _check_file(
            file, raw[file], smarthosts, salt_key, resolve_secrets
        )
        name = tenant.name if tenant else absent_name
        if name is not None:
            if name in seen_names:
                check.error(
                    "name",
                    f"tenant '{name}' is also defined in {seen_names[name]}",
                    "keep one file per tenant",
                )
            else:
                seen_names[name] = file
        errors.extend(check.errors)
        if tenant is not None:
            present.append(tenant)
        elif absent_name is not None:
            removed.append((absent_name, file))

    errors.extend(_cross_tenant_errors(present))
    if errors:
        return Result(errors=errors)
    return Result(
        tenants=[t.data for t in sorted(present, key=lambda t: t.name)],
        removed=sorted(name for name, _ in removed),
    )


def _check_file(
    file: str,
    data: object,
    smarthosts: Collection[str] | None,
    salt_key: str,
    resolve_secrets: bool,
) -> tuple[_FileCheck, _Tenant | None, str | None]:
    """Check one file; returns the messages, the present tenant, or the absent name."""
    if isinstance(data, Unresolved):
        check = _FileCheck(file)
        check.error("", *_split_problem(data.problem))
        return check, None, None

    unresolved = dict(_find_unresolved(data, ""))
    check = _FileCheck(file, quiet_paths=unresolved, templates_resolved=resolve_secrets)

    if data is None:
        check.error(
            "", "the file is empty", f"write a tenant mapping, for example {{{_EXAMPLE_TENANT}}}"
        )
        return check, None, None
    if not isinstance(data, Mapping):
        check.error(
            "",
            f"the file holds a {_type_name(data)}, not a mapping",
            f"write one tenant mapping per file, for example {{{_EXAMPLE_TENANT}}}",
        )
        return check, None, None

    state = _check_state(check, data.get("state"))
    # An absent tenant is checked lightly: its other fields may refer to deleted secrets.
    for path, value in unresolved.items():
        if state == "present" or path in ("name", "state"):
            check.errors.append(f"{file}: {path}: {value.problem}")
    name = _check_name(check, file, data.get("name"))
    if state == "absent":
        return check, None, name

    _check_keys(check, "", data, TENANT_FIELDS)
    errors_before = len(check.errors)
    domains, domain_paths = _check_domains(check, data.get("domains"))
    # When domains are wrong or could not be templated, that is reported already:
    # do not also call every login wrong.
    domains_known = len(check.errors) == errors_before and not any(
        p.split("[")[0] == "domains" for p in check.quiet_paths
    )
    users, login_paths = _check_users(
        check, data.get("users"), domains if domains_known else None, salt_key, resolve_secrets
    )
    tenant = {
        "name": name,
        "domains": domains,
        "users": users,
        "networks": _check_networks(check, data.get("networks")),
        "limits": _check_limits(check, data.get("limits")),
        "relay": _check_relay(check, data.get("relay"), smarthosts),
    }
    if name is None:
        return check, None, None
    return check, _Tenant(file, name, tenant, domain_paths, login_paths), None


def _split_problem(problem: str) -> tuple[str, str]:
    what, _, fix = problem.partition("; ")
    return what, fix or "fix the file"


def _find_unresolved(value: object, path: str) -> Iterator[tuple[str, Unresolved]]:
    if isinstance(value, Unresolved):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _find_unresolved(item, join_path(path, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _find_unresolved(item, join_path(path, index))


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "number"
    if isinstance(value, float):
        return "decimal number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def _check_keys(check: _FileCheck, path: str, mapping: Mapping[Any, Any], known: tuple) -> None:
    for key in mapping:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"known fields are {', '.join(known)}"
        check.error(path, f"unknown field '{key}'", fix)


def _check_name(check: _FileCheck, file: str, value: object) -> str | None:
    stem = Path(file).stem
    if value is None:
        if _NAME_RE.match(stem):
            return stem
        check.error(
            "name",
            f"the file name '{Path(file).name}' is not a valid tenant name",
            "rename the file to <name>.yml using lowercase letters, digits and '-'",
        )
        return None
    if not isinstance(value, str):
        check.error("name", f"must be a string, not a {_type_name(value)}", f"write name: {stem}")
        return None
    if not _NAME_RE.match(value):
        check.error(
            "name",
            f"'{value}' is not a valid tenant name",
            "use 1-63 lowercase letters, digits and '-', starting with a letter or digit",
        )
        return None
    if value != stem:
        check.error(
            "name",
            f"'{value}' does not match the file name '{Path(file).name}'",
            f"rename the file to {value}{Path(file).suffix} or set name: {stem}",
        )
        return None
    return value


def _check_state(check: _FileCheck, value: object) -> str:
    if value is None or value == "present":
        return "present"
    if value == "absent":
        return "absent"
    shown = f"'{value}'" if isinstance(value, str) else f"a {_type_name(value)}"
    check.error("state", f"must be 'present' or 'absent', not {shown}", "use state: absent")
    return "present"


def _expect_list(check: _FileCheck, path: str, value: object, example: str) -> list | None:
    if isinstance(value, list):
        return value
    check.error(path, f"must be a list, not a {_type_name(value)}", f"write it as {example}")
    return None


def _expect_mapping(
    check: _FileCheck, path: str, value: object, example: str
) -> Mapping[Any, Any] | None:
    if isinstance(value, Mapping):
        return value
    check.error(path, f"must be a mapping, not a {_type_name(value)}", f"write it as {example}")
    return None


def _check_domains(check: _FileCheck, value: object) -> tuple[list[str], dict[str, str]]:
    example = "domains: [acme.test]"
    if value is None:
        check.error("domains", "is required for a present tenant", f"add {example}")
        return [], {}
    items = _expect_list(check, "domains", value, example)
    if items is None:
        return [], {}
    if not items:
        check.error("domains", "is empty", f"list at least one domain, {example}")
    paths: dict[str, str] = {}
    for index, item in enumerate(items):
        path = join_path("domains", index)
        if not isinstance(item, str):
            check.error(path, f"must be a string, not a {_type_name(item)}", "write a domain name")
            continue
        try:
            domain = normalise_domain(item)
        except ValueError as exc:
            check.error(path, *_split_problem(str(exc)))
            continue
        paths.setdefault(domain, path)
    return list(paths), paths


def _check_users(
    check: _FileCheck,
    value: object,
    domains: list[str] | None,
    salt_key: str,
    resolve_secrets: bool,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    if value is None:
        return [], {}
    items = _expect_list(
        check, "users", value, "users: [{login: scanner@acme.test, password: ...}]"
    )
    if items is None:
        return [], {}
    users: list[dict[str, Any]] = []
    login_paths: dict[str, str] = {}
    for index, item in enumerate(items):
        path = join_path("users", index)
        user = _expect_mapping(
            check, path, item, "- {login: scanner@acme.test, password: ...} under users"
        )
        if user is None:
            continue
        _check_keys(check, path, user, USER_FIELDS)
        login = _check_login(check, path, user.get("login"), domains)
        password_hash = _check_secret(check, path, user, login, salt_key, resolve_secrets)
        if login is None:
            continue
        login_path = join_path(path, "login")
        if login in login_paths:
            check.error(
                login_path,
                f"login '{login}' is already used by {login_paths[login]}",
                "remove the duplicate user",
            )
            continue
        login_paths[login] = login_path
        users.append({"login": login, "password_hash": password_hash})
    return users, login_paths


def _check_login(
    check: _FileCheck, path: str, value: object, domains: list[str] | None
) -> str | None:
    """Return the lowercased login; ``domains=None`` skips the domain membership check."""
    path = join_path(path, "login")
    if value is None:
        check.error(path, "is required", "add login: <user>@<one of this tenant's domains>")
        return None
    if not isinstance(value, str):
        check.error(path, f"must be a string, not a {_type_name(value)}", "write user@domain")
        return None
    local, at, domain = value.strip().rpartition("@")
    if not at or not _LOCAL_PART_RE.match(local):
        check.error(
            path,
            f"'{value}' is not a valid login",
            "write user@domain using letters, digits and . _ % + - before the @",
        )
        return None
    try:
        domain = normalise_domain(domain)
    except ValueError as exc:
        check.error(path, *_split_problem(str(exc)))
        return None
    if domains is not None and domain not in domains:
        known = ", ".join(domains) or "none"
        check.error(
            path,
            f"'{value}' is not in one of this tenant's domains ({known})",
            f"use one of them or add {domain} to domains",
        )
        return None
    return f"{local}@{domain}".lower()


def _check_secret(
    check: _FileCheck,
    path: str,
    user: Mapping[Any, Any],
    login: str | None,
    salt_key: str,
    resolve_secrets: bool,
) -> str | None:
    """Return the Dovecot hash for a user (``None`` when not resolvable here)."""
    has_password = user.get("password") is not None
    has_hash = user.get("password_hash") is not None
    if has_password and has_hash:
        check.error(path, "has both password and password_hash", "keep only one of the two fields")
        return None
    if not has_password and not has_hash:
        check.error(
            path,
            "one of password or password_hash is required",
            'add password: "{{ vault_<tenant>_<user> }}" with the secret in an ansible-vault file',
        )
        return None
    if has_hash:
        return _check_password_hash(check, join_path(path, "password_hash"), user["password_hash"])

    password = user["password"]
    field_path = join_path(path, "password")
    if not resolve_secrets and is_secret_reference(password):
        return None
    if isinstance(password, VaultedValue):
        check.error(field_path, "is still vault-encrypted", "run with the vault password available")
        return None
    if not isinstance(password, str):
        check.error(
            field_path,
            f"must be a string, not a {_type_name(password)}",
            "quote the value or refer to a vault variable",
        )
        return None
    if len(password) < MIN_PASSWORD_LENGTH:
        check.error(
            field_path,
            f"is too short ({len(password)} characters)",
            f"use at least {MIN_PASSWORD_LENGTH} characters",
        )
        return None
    if login is None:
        return None
    return dovecot_hash(login, password, salt_key)


def _check_password_hash(check: _FileCheck, path: str, value: object) -> str | None:
    fix = (
        "start it with the Dovecot scheme, e.g. {SHA512-CRYPT}$6$...; "
        "generate one with: doveadm pw -s SHA512-CRYPT"
    )
    if not isinstance(value, str):
        check.error(path, f"must be a string, not a {_type_name(value)}", fix)
        return None
    scheme = _SCHEME_RE.match(value)
    if scheme is None or scheme.end() == len(value):
        check.error(path, "does not start with a {SCHEME} prefix followed by the hash", fix)
        return None
    if ":" in value or any(ch.isspace() for ch in value):
        check.error(
            path,
            "contains ':' or whitespace, which would break the Dovecot password file",
            "copy the hash exactly as doveadm pw prints it",
        )
        return None
    return value


def _check_networks(check: _FileCheck, value: object) -> list[str]:
    if value is None:
        return []
    items = _expect_list(check, "networks", value, "networks: [192.0.2.0/28]")
    if items is None:
        return []
    networks: list[str] = []
    for index, item in enumerate(items):
        path = join_path("networks", index)
        if not isinstance(item, str):
            check.error(
                path, f"must be a string, not a {_type_name(item)}", "write e.g. 192.0.2.0/28"
            )
            continue
        if not check.templates_resolved and is_secret_reference(item):
            networks.append(item)  # e.g. a host fact; Ansible renders it before the real check
            continue
        network = _parse_network(check, path, item.strip())
        if network is not None and network not in networks:
            networks.append(network)
    return networks


def _parse_network(check: _FileCheck, path: str, text: str) -> str | None:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(text, strict=False)
            check.error(path, f"{text} has host bits set", f"did you mean {fixed}?")
        else:
            check.error(
                path,
                f"'{text}' is not an IP network or address",
                "write e.g. 192.0.2.0/28, 192.0.2.10 or 2001:db8::/48",
            )
        return None
    if network.prefixlen < _MIN_PREFIX[network.version]:
        check.error(
            path,
            f"{network} would make the gateway an open relay",
            f"list only the client networks, /{_MIN_PREFIX[network.version]} "
            f"or narrower for IPv{network.version}",
        )
        return None
    return str(network)


def _check_limits(check: _FileCheck, value: object) -> dict[str, int | None]:
    limits: dict[str, int | None] = {
        "messages_per_day": None,
        "recipients_per_message": DEFAULT_RECIPIENTS_PER_MESSAGE,
    }
    if value is None:
        return limits
    mapping = _expect_mapping(
        check, "limits", value, "limits: {messages_per_day: 100, recipients_per_message: 50}"
    )
    if mapping is None:
        return limits
    _check_keys(check, "limits", mapping, LIMIT_FIELDS)
    for key in LIMIT_FIELDS:
        item = mapping.get(key)
        if item is None:
            continue
        path = join_path("limits", key)
        if isinstance(item, bool) or not isinstance(item, int):
            check.error(
                path, f"must be a whole number, not a {_type_name(item)}", f"write {key}: 100"
            )
        elif item < 1:
            check.error(
                path,
                f"must be positive, not {item}",
                f"use a number of 1 or more, or leave {key} out",
            )
        else:
            limits[key] = int(item)
    return limits


def _check_relay(
    check: _FileCheck, value: object, smarthosts: Collection[str] | None
) -> dict[str, str]:
    # No `via`: the relay's own route (relay_route) applies, so the key stays out.
    relay: dict[str, str] = {}
    if value is None:
        return relay
    mapping = _expect_mapping(check, "relay", value, "relay: {via: direct}")
    if mapping is None:
        return relay
    _check_keys(check, "relay", mapping, RELAY_FIELDS)
    via = mapping.get("via")
    if via is None:
        return relay
    if not isinstance(via, str) or not via:
        shown = "an empty string" if via == "" else f"a {_type_name(via)}"
        check.error("relay.via", f"must be a smart host name, not {shown}", "write via: direct")
        return relay
    if via != "direct" and smarthosts is not None and via not in smarthosts:
        known = sorted(smarthosts)
        close = difflib.get_close_matches(via, [*known, "direct"], n=1)
        if close:
            fix = f"did you mean '{close[0]}'?"
        elif known:
            fix = f"use 'direct' or one of: {', '.join(known)}"
        else:
            fix = "use 'direct' or define the smart host first (no smart hosts are defined)"
        check.error("relay.via", f"unknown smart host '{via}'", fix)
        return relay
    return {"via": str(via)}


def _cross_tenant_errors(tenants: list[_Tenant]) -> list[str]:
    """Domains and logins claimed by more than one tenant."""
    errors: list[str] = []
    domain_owner: dict[str, _Tenant] = {}
    login_owner: dict[str, _Tenant] = {}
    for tenant in sorted(tenants, key=lambda t: t.file):
        check = _FileCheck(tenant.file)
        for domain, path in tenant.domain_paths.items():
            owner = domain_owner.setdefault(domain, tenant)
            if owner is not tenant:
                check.error(
                    path,
                    f"domain '{domain}' is already claimed by tenant '{owner.name}' ({owner.file})",
                    "remove it from one of the two tenants",
                )
        for login, path in tenant.login_paths.items():
            owner = login_owner.setdefault(login, tenant)
            if owner is not tenant:
                check.error(
                    path,
                    f"login '{login}' is already used by tenant '{owner.name}' ({owner.file})",
                    "give each user a login of its own",
                )
        errors.extend(check.errors)
    return errors


# --------------------------------------------------------------------------------------
# Loading without Ansible (for the CLI)


def list_tenant_files(directory: Path) -> list[Path]:
    """Tenant files in ``directory``: ``*.yml`` and ``*.yaml``, no hidden files, sorted."""
    return sorted(
        entry
        for entry in directory.iterdir()
        if entry.suffix in TENANT_SUFFIXES and not entry.name.startswith(".") and entry.is_file()
    )


class _TenantLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads Ansible's ``!vault``/``!unsafe``."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_TenantLoader.add_constructor(
    "!vault", lambda loader, node: VaultedValue(loader.construct_scalar(node))
)
_TenantLoader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))


def load_tenant_dir(path: Path) -> dict[str, object]:
    """Parse every tenant file in ``path`` with plain YAML.

    Returns display file name -> data; a file that cannot be read maps to an
    :class:`Unresolved` so :func:`validate_tenants` reports it with the other errors.
    Files encrypted as a whole with ansible-vault are left out (see :func:`check_dir`).
    Raises :class:`TenantError` when ``path`` is not a directory.
    """
    if not path.is_dir():
        raise TenantError(
            [
                f"{path}: is not a directory; create it (tenant files go in "
                "inventories/<name>/tenants/) or pass the right path"
            ]
        )
    return {
        str(file): _load_file(file) for file in list_tenant_files(path) if not _is_vaulted(file)
    }


def _is_vaulted(file: Path) -> bool:
    with file.open("rb") as handle:
        return handle.read(15) == b"$ANSIBLE_VAULT;"


def _load_file(file: Path) -> object:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return Unresolved("the file is not UTF-8 text; save it as UTF-8")
    except OSError as exc:
        return Unresolved(f"cannot read the file ({exc.strerror}); check its permissions")
    try:
        return yaml.load(text, Loader=_TenantLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        return Unresolved(
            f"YAML syntax error{where}: {problem}; fix the YAML (indentation, quotes, brackets)"
        )
    except yaml.YAMLError as exc:
        return Unresolved(f"YAML error: {exc}; fix the YAML")


def check_dir(path: Path, smarthosts: Collection[str] | None = None) -> Result:
    """Load and validate a tenant directory without Ansible (secrets stay unresolved)."""
    try:
        raw = load_tenant_dir(path)
    except TenantError as exc:
        return Result(errors=exc.errors)
    result = validate_tenants(raw, smarthosts=smarthosts, resolve_secrets=False)
    result.notes.extend(
        f"{file}: encrypted with ansible-vault, not checked here; "
        "run the playbook (with the vault password) to check it"
        for file in list_tenant_files(path)
        if _is_vaulted(file)
    )
    return result
