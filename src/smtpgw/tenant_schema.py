"""The tenant schema: pure checks and normalisation of parsed tenant data (no I/O, no hashing).

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
    dns: {dmarc: {policy: none, reports: [dmarc@acme.test]}}   # optional: see _check_dns

Jinja is allowed only in the fields of :data:`TEMPLATED_FIELDS` (secrets and networks); every
other value must be written literally. :func:`validate_tenants` takes data keyed by the file
name to show in messages, either as written (``templated=False``: Jinja is only parsed, not
rendered) or after Ansible templated it (``templated=True``), and returns a :class:`Result`.
Users keep their password in a :class:`Password` (hidden from ``repr``, not serialisable);
:func:`smtpgw.password_cache.hash_passwords` turns it into ``password_hash``.
Every message reads ``<file>: <field path>: <what is wrong>; <what to do>``.
"""

from __future__ import annotations

import difflib
import encodings.idna
import ipaddress
import re
import unicodedata
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_RECIPIENTS_PER_MESSAGE",
    "DNS_DEFAULTS",
    "HASH_SCHEMES",
    "LIMIT_MAXIMUMS",
    "MAX_IPV4_ADDRESSES",
    "MAX_IPV6_ADDRESSES",
    "TEMPLATED_FIELDS",
    "Password",
    "Result",
    "TenantError",
    "Unresolved",
    "VaultedValue",
    "drop_passwords",
    "is_template",
    "join_path",
    "may_be_templated",
    "normalise_domain",
    "validate_tenants",
]

DEFAULT_RECIPIENTS_PER_MESSAGE = 50
MIN_PASSWORD_LENGTH = 12

TENANT_FIELDS = ("name", "state", "domains", "users", "networks", "limits", "relay", "dns")
USER_FIELDS = ("login", "password", "password_hash")
LIMIT_FIELDS = ("messages_per_day", "messages_per_hour", "recipients_per_message", "logins")
# The limits a login may have of its own (limits.logins.<login>).
LOGIN_LIMIT_FIELDS = ("messages_per_day", "messages_per_hour", "recipients_per_message")
RELAY_FIELDS = ("via",)
# Postfix's own smtpd_recipient_limit default is 1000; ten million a day is ~115 a second.
LIMIT_MAXIMUMS = {
    "messages_per_day": 10_000_000,
    "messages_per_hour": 1_000_000,
    "recipients_per_message": 1000,
}

#: The only fields whose values may be Jinja expressions (``[]`` stands for any list index).
TEMPLATED_FIELDS = ("users[].password", "users[].password_hash", "networks[]")

#: Dovecot schemes accepted in ``password_hash`` (all verified by Dovecot 2.3 through crypt(3)).
HASH_SCHEMES = ("SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT")

# Address budget of one tenant, and of all tenants together: one IPv4 /8, one IPv6 /32.
MAX_IPV4_ADDRESSES = 2**24
MAX_IPV6_ADDRESSES = 2**96

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_LOCAL_PART_RE = re.compile(r"[A-Za-z0-9._%+-]{1,64}")
_SCHEME_RE = re.compile(r"\{([A-Za-z0-9._-]+)\}")
_INDEX_RE = re.compile(r"\[\d+\]")
_TEMPLATE_MARKERS = ("{{", "{%", "{#")
_MIN_PREFIX = {4: 8, 6: 32}

# Crypt strings in the exact shape glibc/libxcrypt write them. SHA-crypt: 8-16 salt characters
# (doveadm and mkpasswd write 16), rounds 5000 (the default, left out) to 1,000,000 (above that
# one login costs the relay seconds); the last character of the digest carries only 2 (SHA-512)
# or 4 (SHA-256) bits. bcrypt: cost 05 (doveadm's default) to 16, 22 salt + 31 hash characters.
_C64 = r"[./0-9A-Za-z]"
_SHA_CRYPT_RE = {
    "SHA512-CRYPT": re.compile(
        rf"\$6\$(?:rounds=(\d{{1,10}})\$)?({_C64}{{8,16}})\${_C64}{{85}}[./01]"
    ),
    "SHA256-CRYPT": re.compile(
        rf"\$5\$(?:rounds=(\d{{1,10}})\$)?({_C64}{{8,16}})\${_C64}{{42}}[./0-9A-D]"
    ),
}
_BCRYPT_RE = re.compile(rf"\$2[by]\$(\d\d)\${_C64}{{53}}")
_SHA_ROUNDS = (5000, 1_000_000)
_BCRYPT_COST = (5, 16)
_HASH_FIX = "generate one with: doveadm pw -s SHA512-CRYPT, and copy it whole"

# IPv6 ranges that carry IPv4 addresses: a client there is an IPv4 client in disguise.
_EMBEDDED_IPV4 = (
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped", True),
    (ipaddress.IPv6Network("::/96"), "IPv4-compatible", True),
    (ipaddress.IPv6Network("64:ff9b::/96"), "NAT64", True),
    (ipaddress.IPv6Network("64:ff9b:1::/48"), "local-use NAT64", False),
    (ipaddress.IPv6Network("2002::/16"), "6to4", False),
    (ipaddress.IPv6Network("2001::/32"), "Teredo", False),
)

_EXAMPLE_TENANT = "name: acme, domains: [acme.test]"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


class Password:
    """A plaintext password between validation and hashing.

    Its ``repr`` and ``str`` hide the value and it is not a ``str``, so it cannot end up in a
    message, a log or a task result by accident (JSON encoders refuse it).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Password(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Password) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass
class Result:
    """Outcome of a validation: normalised tenants, removed names, and errors.

    Nothing partial: when ``errors`` is not empty, ``tenants`` and ``removed`` are empty.
    Each user is ``{login, password_hash, password}``: ``password`` is a :class:`Password` to
    hash (then ``password_hash`` is ``None``) or ``None`` (a given hash, or a secret left for
    Ansible to resolve). ``notes`` are things that were not checked; they are not errors.
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


def is_template(value: object) -> bool:
    """True for a string holding Jinja (``{{``, ``{%`` or ``{#``)."""
    return isinstance(value, str) and any(marker in value for marker in _TEMPLATE_MARKERS)


def may_be_templated(path: str) -> bool:
    """True when the value at field ``path`` (e.g. ``users[3].password``) may hold Jinja."""
    return _INDEX_RE.sub("[]", path) in TEMPLATED_FIELDS


def drop_passwords(tenants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tenants with each user reduced to ``{login, password_hash}`` (no hashing done)."""
    return [
        {
            **tenant,
            "users": [
                {"login": u["login"], "password_hash": u["password_hash"]} for u in tenant["users"]
            ],
        }
        for tenant in tenants
    ]


def normalise_domain(value: str) -> str:
    """Return the lowercase ASCII (IDNA) form of a DNS name, without a trailing dot.

    Surrounding spaces are ignored; control characters are not. Raises ``ValueError`` with a
    ``<what is wrong>; <what to do>`` message.
    """
    fix = "write a domain name such as acme.test"
    control = _control_character(value)
    if control:
        raise ValueError(f"contains the control character {control}; {fix}")
    name = value.strip(" ")
    if name.endswith("."):
        name = name[:-1]
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
        if not _LABEL_RE.fullmatch(ascii_label):
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


def _control_character(value: str) -> str | None:
    """``U+000A``-style name of the first control character (C0, DEL, C1) in ``value``."""
    for char in value:
        if unicodedata.category(char) == "Cc":
            return f"U+{ord(char):04X}"
    return None


def _jinja_problem(text: str) -> str | None:
    """Jinja's syntax error for ``text`` (parsed, never rendered), or ``None`` if it parses."""
    try:
        import jinja2
    except ImportError:  # pragma: no cover - jinja2 comes with Ansible and with smtpgw
        return None
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return _one_line(exc.message or "syntax error")
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


# --------------------------------------------------------------------------------------
# Validation


class _FileCheck:
    """Collects the messages for one tenant file."""

    def __init__(self, file: str, quiet_paths: Collection[str] = (), templated: bool = True):
        self.file = file
        self.quiet_paths = set(quiet_paths)
        self.errors: list[str] = []
        # False without Ansible: a Jinja expression is parsed and left for the deploy-time check.
        self.templated = templated

    def error(self, path: str, what: str, fix: str) -> None:
        if path in self.quiet_paths:
            return
        where = f"{self.file}: {path}" if path else self.file
        self.errors.append(f"{where}: {what}; {fix}")

    def text(self, path: str, value: str, secret: bool = False) -> bool:
        """Check a string for control characters and misplaced or broken Jinja; True if fine.

        The value itself is never shown for a secret.
        """
        control = _control_character(value)
        if control:
            where = "" if secret else f" (in {_show(value)})"
            self.error(
                path,
                f"contains the control character {control}{where}",
                "remove it (a line break, tab or NUL has no place in this field)",
            )
            return False
        if not is_template(value):
            return True
        if not may_be_templated(path):
            self.error(
                path,
                f"is a Jinja expression, but {_INDEX_RE.sub('[]', path)} must be written literally",
                "write the value itself (Jinja is allowed only in "
                + ", ".join(TEMPLATED_FIELDS)
                + ")",
            )
            return False
        if not self.templated:
            problem = _jinja_problem(value)
            if problem:
                self.error(
                    path,
                    f"is not a valid Jinja expression ({problem})",
                    'fix it, e.g. "{{ vault_acme_scanner }}" with both braces closed',
                )
                return False
        return True


@dataclass
class _Tenant:
    file: str
    name: str
    data: dict[str, Any]
    domain_paths: dict[str, str]  # normalised domain -> field path
    login_paths: dict[str, str]  # normalised login -> field path
    networks: dict[str, tuple[_Network, str]]  # canonical network -> (network, field path)
    address_counts: dict[int, int]  # IP version -> addresses covered


def validate_tenants(
    raw: Mapping[str, object],
    smarthosts: Collection[str] | None = None,
    templated: bool = True,
) -> Result:
    """Validate and normalise tenant data.

    ``raw`` maps the file name to show in messages to the parsed content of that file
    (or an :class:`Unresolved` when it could not be read). ``smarthosts`` lists the known
    smart hosts for ``relay.via``; ``None`` skips that check. Given as a mapping of names to
    resolved smart hosts (``smtpgw.presets.resolve_smarthosts``), their documented ``limits``
    fill the limits a tenant routed through one (``relay.via``) does not write. ``templated``
    says whether the values went through Ansible's templating: when false (checks without
    Ansible), a Jinja expression in a field that may hold one, or a ``!vault`` value, is parsed
    but left unchecked (``password_hash: None`` and no password for such a user).
    """
    errors: list[str] = []
    present: list[_Tenant] = []
    removed: list[tuple[str, str]] = []  # (name, file)
    seen_names: dict[str, str] = {}
    for file in sorted(raw):
        check, tenant, absent_name = _check_file(file, raw[file], smarthosts, templated)
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
    file: str, data: object, smarthosts: Collection[str] | None, templated: bool
) -> tuple[_FileCheck, _Tenant | None, str | None]:
    """Check one file; returns the messages, the present tenant, or the absent name."""
    if isinstance(data, Unresolved):
        check = _FileCheck(file)
        check.error("", *_split_problem(data.problem))
        return check, None, None

    unresolved = dict(_find_unresolved(data, ""))
    check = _FileCheck(file, quiet_paths=unresolved, templated=templated)

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
    users, login_paths = _check_users(check, data.get("users"), domains if domains_known else None)
    networks, parsed, counts = _check_networks(check, data.get("networks"))
    tenant = {
        "name": name,
        "domains": domains,
        "users": users,
        "networks": networks,
        "limits": _check_limits(check, data.get("limits"), login_paths),
        "relay": _check_relay(check, data.get("relay"), smarthosts),
    }
    _smarthost_limits(tenant, data.get("limits"), smarthosts)
    if data.get("dns") is not None:  # only when written: the DNS code applies the defaults
        tenant["dns"] = _check_dns(check, data["dns"])
    if name is None:
        return check, None, None
    found = _Tenant(file, name, tenant, domain_paths, login_paths, parsed, counts)
    return check, found, None


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


def _show(value: object) -> str:
    """A value for a message: control characters escaped, long values cut."""
    text = str(value)
    shown = "".join(
        f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" and ord(c) < 256 else c
        for c in text[:80]
    )
    return shown + ("..." if len(text) > 80 else "")


def _check_keys(check: _FileCheck, path: str, mapping: Mapping[Any, Any], known: tuple) -> None:
    for key in mapping:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"known fields are {', '.join(known)}"
        check.error(path, f"unknown field '{_show(key)}'", fix)


def _check_name(check: _FileCheck, file: str, value: object) -> str | None:
    stem = Path(file).stem
    if value is None:
        if _NAME_RE.fullmatch(stem):
            return stem
        check.error(
            "name",
            f"the file name '{_show(Path(file).name)}' is not a valid tenant name",
            "rename the file to <name>.yml using lowercase letters, digits and '-'",
        )
        return None
    if not isinstance(value, str):
        check.error("name", f"must be a string, not a {_type_name(value)}", f"write name: {stem}")
        return None
    if not check.text("name", value):
        return None
    if not _NAME_RE.fullmatch(value):
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
    if isinstance(value, str) and not check.text("state", value):
        return "present"
    shown = f"'{_show(value)}'" if isinstance(value, str) else f"a {_type_name(value)}"
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
        if not check.text(path, item):
            continue
        try:
            domain = normalise_domain(item)
        except ValueError as exc:
            check.error(path, *_split_problem(str(exc)))
            continue
        paths.setdefault(domain, path)
    return list(paths), paths


def _check_users(
    check: _FileCheck, value: object, domains: list[str] | None
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
        password, password_hash = _check_secret(check, path, user)
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
        users.append({"login": login, "password_hash": password_hash, "password": password})
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
    if not check.text(path, value):
        return None
    local, at, domain = value.strip(" ").rpartition("@")
    if not at or not _LOCAL_PART_RE.fullmatch(local):
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
    check: _FileCheck, path: str, user: Mapping[Any, Any]
) -> tuple[Password | None, str | None]:
    """Return ``(password to hash, given hash)``; both ``None`` when not resolvable here."""
    has_password = user.get("password") is not None
    has_hash = user.get("password_hash") is not None
    if has_password and has_hash:
        check.error(path, "has both password and password_hash", "keep only one of the two fields")
        return None, None
    if not has_password and not has_hash:
        check.error(
            path,
            "one of password or password_hash is required",
            'add password: "{{ vault_<tenant>_<user> }}" with the secret in an ansible-vault file',
        )
        return None, None
    if has_hash:
        return None, _check_password_hash(check, join_path(path, "password_hash"), user)

    password = user["password"]
    field_path = join_path(path, "password")
    if isinstance(password, VaultedValue):
        if check.templated:
            check.error(
                field_path, "is still vault-encrypted", "run with the vault password available"
            )
        return None, None
    if not isinstance(password, str):
        check.error(
            field_path,
            f"must be a string, not a {_type_name(password)}",
            "quote the value or refer to a vault variable",
        )
        return None, None
    if not check.text(field_path, password, secret=True):
        return None, None
    if not check.templated and is_template(password):
        return None, None  # parsed above; Ansible renders and checks it at deploy time
    if len(password) < MIN_PASSWORD_LENGTH:
        check.error(
            field_path,
            f"is too short ({len(password)} characters)",
            f"use at least {MIN_PASSWORD_LENGTH} characters",
        )
        return None, None
    return Password(password), None


def _check_password_hash(check: _FileCheck, path: str, user: Mapping[Any, Any]) -> str | None:
    value = user["password_hash"]
    fix = "start it with the Dovecot scheme, e.g. {SHA512-CRYPT}$6$...; " + _HASH_FIX
    if isinstance(value, VaultedValue):
        if check.templated:
            check.error(path, "is still vault-encrypted", "run with the vault password available")
        return None
    if not isinstance(value, str):
        check.error(path, f"must be a string, not a {_type_name(value)}", fix)
        return None
    if not check.text(path, value, secret=True):
        return None
    if not check.templated and is_template(value):
        return None
    if ":" in value or any(ch.isspace() for ch in value):
        check.error(
            path,
            "contains ':' or whitespace, which would break the Dovecot password file",
            "copy the hash exactly as doveadm pw prints it",
        )
        return None
    scheme = _SCHEME_RE.match(value)
    if scheme is None or scheme.end() == len(value):
        check.error(path, "does not start with a {SCHEME} prefix followed by the hash", fix)
        return None
    name = scheme.group(1).upper()
    if name not in HASH_SCHEMES:
        check.error(
            path,
            f"the scheme {{{scheme.group(1)}}} is not accepted (only "
            + ", ".join(f"{{{s}}}" for s in HASH_SCHEMES)
            + ": salted and slow to crack)",
            _HASH_FIX,
        )
        return None
    problem = _crypt_shape_problem(name, value[scheme.end() :])
    if problem:
        check.error(path, f"is not a well-formed {{{name}}} hash ({problem})", _HASH_FIX)
        return None
    return value


def _crypt_shape_problem(scheme: str, crypt: str) -> str | None:
    """What is wrong with the crypt string of a ``{scheme}`` hash, or ``None``."""
    if scheme == "BLF-CRYPT":
        match = _BCRYPT_RE.fullmatch(crypt)
        if not match:
            return "expected $2y$<cost>$ and 53 characters of [./A-Za-z0-9]"
        low, high = _BCRYPT_COST
        if not low <= int(match.group(1)) <= high:
            return f"cost {match.group(1)} is outside {low:02d}-{high:02d}"
        return None
    match = _SHA_CRYPT_RE[scheme].fullmatch(crypt)
    if not match:
        prefix, length = ("$6$", 86) if scheme == "SHA512-CRYPT" else ("$5$", 43)
        return (
            f"expected {prefix}[rounds=N$]<8-16 salt characters>$<{length} hash characters>, "
            "all of [./0-9A-Za-z]"
        )
    if match.group(1) is not None:
        low, high = _SHA_ROUNDS
        if not low <= int(match.group(1)) <= high:
            return f"rounds={match.group(1)} is outside {low}-{high}"
    return None


def _check_networks(
    check: _FileCheck, value: object
) -> tuple[list[str], dict[str, tuple[_Network, str]], dict[int, int]]:
    """The networks as written out, the parsed ones with their paths, and addresses covered."""
    if value is None:
        return [], {}, {4: 0, 6: 0}
    items = _expect_list(check, "networks", value, "networks: [192.0.2.0/28]")
    if items is None:
        return [], {}, {4: 0, 6: 0}
    networks: list[str] = []
    parsed: dict[str, tuple[_Network, str]] = {}
    for index, item in enumerate(items):
        path = join_path("networks", index)
        if not isinstance(item, str):
            check.error(
                path, f"must be a string, not a {_type_name(item)}", "write e.g. 192.0.2.0/28"
            )
            continue
        if not check.text(path, item):
            continue
        if not check.templated and is_template(item):
            if item not in networks:  # e.g. a host fact; Ansible renders it before the check
                networks.append(item)
            continue
        network = _parse_network(check, path, item.strip(" "))
        if network is not None and str(network) not in parsed:
            parsed[str(network)] = (network, path)
            networks.append(str(network))
    counts = _address_count([network for network, _ in parsed.values()])
    _check_budget(check, "networks", counts)
    return networks, parsed, counts


def _parse_network(check: _FileCheck, path: str, text: str) -> _Network | None:
    if "%" in text:
        address = text.split("%", 1)[0]
        check.error(
            path,
            f"'{text}' has an IPv6 zone index ('%...'), which names an interface of one host",
            f"write the address without it, e.g. {address}",
        )
        return None
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
    if isinstance(network, ipaddress.IPv6Network):
        for embedded, kind, low_bits in _EMBEDDED_IPV4:
            if not network.overlaps(embedded):
                continue
            if low_bits and network.prefixlen >= 96:
                ipv4 = ipaddress.IPv4Network(
                    (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
                )
                fix = f"write the IPv4 network instead: {ipv4}"
            else:
                fix = "write the IPv4 network of those clients instead"
            check.error(
                path,
                f"{network} is in the {kind} range {embedded}, which carries IPv4 addresses "
                "(it would bypass the IPv4 rules)",
                fix,
            )
            return None
    return network


def _address_count(networks: list[_Network]) -> dict[int, int]:
    """Addresses covered per IP version, overlapping networks counted once."""
    counts = {4: 0, 6: 0}
    for version in (4, 6):
        same = [n for n in networks if n.version == version]
        if len(same) > 1:
            same = list(ipaddress.collapse_addresses(same))  # type: ignore[arg-type]
        counts[version] = sum(n.num_addresses for n in same)
    return counts


def _check_budget(
    check: _FileCheck, path: str, counts: dict[int, int], scope: str = "this tenant's networks"
) -> None:
    for version, limit, size in ((4, MAX_IPV4_ADDRESSES, "/8"), (6, MAX_IPV6_ADDRESSES, "/32")):
        if counts[version] > limit:
            check.error(
                path,
                f"{scope} cover {counts[version]:,} IPv{version} addresses, more than one "
                f"{size} ({limit:,})",
                "list only the client networks (networks relay without a login)",
            )


def _check_limits(
    check: _FileCheck, value: object, logins: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``limits``: the tenant's, and ``logins``: {login: its own limits} for logins that have
    them (each a login of the tenant; a limit left out there is the tenant's)."""
    limits: dict[str, Any] = {
        "messages_per_day": None,
        "messages_per_hour": None,
        "recipients_per_message": DEFAULT_RECIPIENTS_PER_MESSAGE,
        "logins": {},
    }
    if value is None:
        return limits
    mapping = _expect_mapping(
        check, "limits", value, "limits: {messages_per_day: 100, recipients_per_message: 50}"
    )
    if mapping is None:
        return limits
    _check_keys(check, "limits", mapping, LIMIT_FIELDS)
    limits.update(_check_limit_numbers(check, "limits", mapping, LOGIN_LIMIT_FIELDS))
    limits["logins"] = _check_login_limits(check, mapping.get("logins"), logins)
    return limits


def _check_limit_numbers(
    check: _FileCheck, parent: str, mapping: Mapping[Any, Any], keys: tuple[str, ...]
) -> dict[str, int]:
    found: dict[str, int] = {}
    for key in keys:
        item = mapping.get(key)
        if item is None:
            continue
        path = join_path(parent, key)
        if isinstance(item, str) and is_template(item):
            check.text(path, item)
        elif isinstance(item, bool) or not isinstance(item, int):
            check.error(
                path, f"must be a whole number, not a {_type_name(item)}", f"write {key}: 100"
            )
        elif item < 1:
            check.error(
                path,
                f"must be positive, not {item}",
                f"use a number of 1 or more, or leave {key} out",
            )
        elif item > LIMIT_MAXIMUMS[key]:
            check.error(
                path,
                f"{item:,} is more than the most allowed, {LIMIT_MAXIMUMS[key]:,}",
                f"use at most {LIMIT_MAXIMUMS[key]}, or leave {key} out"
                + (" for no daily limit" if key == "messages_per_day" else ""),
            )
        else:
            found[key] = int(item)
    return found


def _check_login_limits(
    check: _FileCheck, value: object, logins: Mapping[str, str] | None
) -> dict[str, dict[str, int]]:
    if value is None:
        return {}
    mapping = _expect_mapping(
        check, "limits.logins", value, "limits: {logins: {app@acme.test: {messages_per_day: 20}}}"
    )
    if mapping is None:
        return {}
    found: dict[str, dict[str, int]] = {}
    for login, item in mapping.items():
        path = join_path("limits.logins", str(login))
        known_logins = {name.lower(): name for name in logins or {}}
        key = known_logins.get(str(login).strip().lower(), str(login).strip())
        if logins is not None and key not in logins:
            known = ", ".join(sorted(logins)) or "none"
            check.error(
                path,
                f"'{login}' is not a login of this tenant (its logins: {known})",
                "write a login listed under users, or remove this override",
            )
            continue
        own = _expect_mapping(check, path, item, f"{login}: {{messages_per_day: 20}}")
        if own is None:
            continue
        _check_keys(check, path, own, LOGIN_LIMIT_FIELDS)
        numbers = _check_limit_numbers(check, path, own, LOGIN_LIMIT_FIELDS)
        if not own:
            check.error(path, "gives no limit", "write at least one, e.g. messages_per_day: 20")
        if numbers:
            found[key] = numbers
    return found


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
    if not check.text("relay.via", via):
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


def _smarthost_limits(
    tenant: dict[str, Any], written: object, smarthosts: Collection[str] | None
) -> None:
    """A limit the tenant does not write comes from its smart host's documented limits.

    ``smarthosts`` maps names to resolved smart hosts (``smtpgw.presets``) when their limits
    are known; a plain collection of names carries none. Only a tenant that names its smart
    host in ``relay.via`` gets them (the relay's own route is not known here).
    """
    via = tenant["relay"].get("via")
    if not isinstance(smarthosts, Mapping) or via not in smarthosts:
        return
    host = smarthosts[via]
    given = written if isinstance(written, Mapping) else {}
    for key, value in ((host or {}).get("limits") or {}).items():
        if key in LIMIT_FIELDS and given.get(key) is None:
            tenant["limits"][key] = value


# --------------------------------------------------------------------------------------
# DNS records of the tenant's domains (smtpgw.dns_records publishes them)

DNS_FIELDS = ("spf", "spf_all", "dmarc", "mta_sts", "tls_reports")
DMARC_FIELDS = ("policy", "reports")
MTA_STS_FIELDS = ("mode", "mx", "max_age")
DMARC_POLICIES = ("none", "quarantine", "reject")
MTA_STS_MODES = ("testing", "enforce", "none")
SPF_ALL = ("~all", "-all")
#: What a tenant gets without a ``dns`` field, and what a ``dns`` field leaves out.
DNS_DEFAULTS: dict[str, Any] = {
    "spf": [],
    "spf_all": "~all",
    "dmarc": {"policy": "none", "reports": []},
    "mta_sts": None,
    "tls_reports": [],
}
MTA_STS_MAX_AGE = (86400, 31557600)  # RFC 8461: at most a year; a day at least is sensible
_SPF_TERM_RE = re.compile(
    r"(?:[+?~-]?)(?:(?:include|exists):[A-Za-z0-9._%{}-]+"
    r"|(?:a|mx)(?::[A-Za-z0-9._%{}-]+)?(?:/\d{1,3})?(?://\d{1,3})?"
    r"|ip4:[0-9./]+|ip6:[0-9A-Fa-f:./]+)"
)
_MX_PATTERN_RE = re.compile(r"(?:\*\.)?[a-z0-9.-]+")


def _check_dns(check: _FileCheck, value: object) -> dict[str, Any]:
    """The ``dns`` mapping: SPF extras, DMARC, MTA-STS and TLS-RPT of every domain."""
    result: dict[str, Any] = {
        **DNS_DEFAULTS,
        "dmarc": dict(DNS_DEFAULTS["dmarc"]),
    }
    mapping = _expect_mapping(check, "dns", value, "dns: {dmarc: {policy: none}}")
    if mapping is None:
        return result
    _check_keys(check, "dns", mapping, DNS_FIELDS)
    result["spf"] = _check_spf_terms(check, mapping.get("spf"))
    spf_all = mapping.get("spf_all")
    if spf_all is not None:
        if spf_all in SPF_ALL:
            result["spf_all"] = spf_all
        else:
            check.error(
                "dns.spf_all",
                f"must be '~all' (soft fail) or '-all' (fail), not {_shown(spf_all)}",
                'write spf_all: "-all" once every sender of the domains is listed',
            )
    dmarc = mapping.get("dmarc")
    if dmarc is not None:
        found = _expect_mapping(check, "dns.dmarc", dmarc, "dmarc: {policy: none}")
        if found is not None:
            _check_keys(check, "dns.dmarc", found, DMARC_FIELDS)
            policy = found.get("policy", "none")
            if policy not in DMARC_POLICIES:
                check.error(
                    "dns.dmarc.policy",
                    f"must be one of {', '.join(DMARC_POLICIES)}, not {_shown(policy)}",
                    "start with policy: none and tighten it once the reports look right",
                )
            else:
                result["dmarc"]["policy"] = policy
            result["dmarc"]["reports"] = _check_report_addresses(
                check, "dns.dmarc.reports", found.get("reports")
            )
    result["mta_sts"] = _check_mta_sts(check, mapping.get("mta_sts"))
    result["tls_reports"] = _check_report_addresses(
        check, "dns.tls_reports", mapping.get("tls_reports")
    )
    return result


def _shown(value: object) -> str:
    return f"'{_show(value)}'" if isinstance(value, str) else f"a {_type_name(value)}"


def _check_spf_terms(check: _FileCheck, value: object) -> list[str]:
    if value is None:
        return []
    items = _expect_list(check, "dns.spf", value, 'spf: ["include:_spf.google.com"]')
    if items is None:
        return []
    terms: list[str] = []
    for index, item in enumerate(items):
        path = join_path("dns.spf", index)
        if not isinstance(item, str) or not check.text(path, item):
            if not isinstance(item, str):
                check.error(path, f"must be a string, not a {_type_name(item)}", "quote it")
            continue
        term = item.strip(" ")
        if term.lower().startswith(("all", "redirect", "exp", "v=", "-all", "~all", "?all")):
            check.error(
                path,
                f"'{term}' ends or replaces the record smtpgw writes",
                "list only the other senders' mechanisms; set dns.spf_all for the ending",
            )
        elif not _SPF_TERM_RE.fullmatch(term):
            check.error(
                path,
                f"'{_show(term)}' is not an SPF mechanism",
                "write one of include:DOMAIN, a[:DOMAIN], mx[:DOMAIN], ip4:NET, ip6:NET, "
                "exists:DOMAIN",
            )
        elif term not in terms:
            terms.append(term)
    return terms


def _check_report_addresses(check: _FileCheck, path: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    items = _expect_list(check, path, value, "[dmarc-reports@acme.test]")
    if items is None:
        return []
    addresses: list[str] = []
    for index, item in enumerate(items):
        item_path = join_path(path, index)
        if not isinstance(item, str):
            check.error(
                item_path, f"must be a string, not a {_type_name(item)}", "write user@domain"
            )
            continue
        if not check.text(item_path, item):
            continue
        text = item.strip(" ")
        if text.lower().startswith("mailto:"):
            text = text[7:]
        local, at, domain = text.rpartition("@")
        try:
            domain = normalise_domain(domain) if at else ""
        except ValueError:
            domain = ""
        if not at or not _LOCAL_PART_RE.fullmatch(local) or not domain or "!" in text:
            check.error(
                item_path,
                f"'{_show(item)}' is not an e-mail address",
                "write the address reports go to, e.g. dmarc-reports@acme.test",
            )
            continue
        address = f"{local}@{domain}"
        if address not in addresses:
            addresses.append(address)
    return addresses


def _check_mta_sts(check: _FileCheck, value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    mapping = _expect_mapping(
        check, "dns.mta_sts", value, "mta_sts: {mode: testing, mx: [mx1.acme.test]}"
    )
    if mapping is None:
        return None
    _check_keys(check, "dns.mta_sts", mapping, MTA_STS_FIELDS)
    result: dict[str, Any] = {"mode": "testing", "mx": [], "max_age": 604800}
    mode = mapping.get("mode", "testing")
    if mode not in MTA_STS_MODES:
        check.error(
            "dns.mta_sts.mode",
            f"must be one of {', '.join(MTA_STS_MODES)}, not {_shown(mode)}",
            "start with mode: testing",
        )
    else:
        result["mode"] = mode
    mx = mapping.get("mx")
    items = _expect_list(check, "dns.mta_sts.mx", mx, "mx: [mx1.acme.test]") if mx else None
    if not items and result["mode"] != "none":
        check.error(
            "dns.mta_sts.mx",
            "is required: the policy lists the MX hosts that receive the domains' mail",
            "add mx: [mx1.acme.test] (a name or *.suffix per MX)",
        )
    for index, item in enumerate(items or []):
        path = join_path("dns.mta_sts.mx", index)
        text = item.strip(" ").lower().rstrip(".") if isinstance(item, str) else None
        if not text or not check.text(path, text) or not _MX_PATTERN_RE.fullmatch(text):
            check.error(
                path, f"{_shown(item)} is not an MX host name", "write mx1.acme.test or *.acme.test"
            )
        elif text not in result["mx"]:
            result["mx"].append(text)
    max_age = mapping.get("max_age")
    if max_age is not None:
        low, high = MTA_STS_MAX_AGE
        if isinstance(max_age, bool) or not isinstance(max_age, int) or not low <= max_age <= high:
            check.error(
                "dns.mta_sts.max_age",
                f"must be a whole number of seconds from {low} to {high}, not {_show(max_age)}",
                "write max_age: 604800 (a week)",
            )
        else:
            result["max_age"] = max_age
    return result


def _cross_tenant_errors(tenants: list[_Tenant]) -> list[str]:
    """Domains, logins and networks claimed by more than one tenant; the address budget."""
    errors: list[str] = []
    domain_owner: dict[str, _Tenant] = {}
    login_owner: dict[str, _Tenant] = {}
    checks: dict[str, _FileCheck] = {}
    ordered = sorted(tenants, key=lambda t: t.file)
    for tenant in ordered:
        check = checks[tenant.file] = _FileCheck(tenant.file)
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
    _network_overlaps(ordered, checks)
    _total_budget(ordered, checks)
    for tenant in ordered:
        errors.extend(checks[tenant.file].errors)
    return errors


def _network_overlaps(tenants: list[_Tenant], checks: dict[str, _FileCheck]) -> None:
    """Report each network that overlaps another tenant's (one sweep over sorted ranges)."""
    rank = {t.file: i for i, t in enumerate(tenants)}
    spans = []
    for tenant in tenants:
        for network, path in tenant.networks.values():
            first, last = int(network.network_address), int(network.broadcast_address)
            spans.append((network.version, first, -last, rank[tenant.file], tenant, path, network))
    spans.sort(key=lambda s: s[:4])
    widest: dict[int, tuple[int, _Tenant, str, Any]] = {}  # version -> furthest-reaching span
    for version, first, neg_last, _, tenant, path, network in spans:
        last = -neg_last
        reach = widest.get(version)
        if reach is not None and first <= reach[0] and reach[1] is not tenant:
            _, owner, owner_path, owner_network = reach
            a, b = sorted([(tenant, path, network), (owner, owner_path, owner_network)], key=_rank)
            checks[b[0].file].error(
                b[1],
                f"{b[2]} overlaps {a[2]} of tenant '{a[0].name}' ({a[0].file}: {a[1]})",
                "give each client network to one tenant only",
            )
        if reach is None or last > reach[0]:
            widest[version] = (last, tenant, path, network)


def _rank(entry: tuple[_Tenant, str, Any]) -> tuple[str, str]:
    return entry[0].file, entry[1]


def _total_budget(tenants: list[_Tenant], checks: dict[str, _FileCheck]) -> None:
    """All tenants' networks together stay within one IPv4 /8 and one IPv6 /32."""
    totals = {4: 0, 6: 0}
    limits = {4: (MAX_IPV4_ADDRESSES, "/8"), 6: (MAX_IPV6_ADDRESSES, "/32")}
    for tenant in tenants:
        counts = tenant.address_counts
        for version in (4, 6):
            before = totals[version]
            totals[version] += counts[version]
            limit, size = limits[version]
            # A tenant over the budget on its own has been told so already.
            if before <= limit < totals[version] and counts[version] <= limit:
                checks[tenant.file].error(
                    "networks",
                    f"with this tenant, all tenants' networks together cover {totals[version]:,} "
                    f"IPv{version} addresses, more than one {size} ({limit:,})",
                    "list only the client networks (networks relay without a login)",
                )
