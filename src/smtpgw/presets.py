"""Provider presets for smart hosts, and the one resolution of ``relay_smarthosts``.

A preset is a YAML file in ``templates/providers/`` (the project's, then an inventory's own
``templates/providers/``, whose files win by name): host, port, TLS mode, authentication, SPF
include, documented limits and what to set up at the provider (see that directory's README).
A smart host in ``relay_smarthosts`` may name one with ``preset: NAME`` and override any field
(a smart host that sets its own ``port`` but no ``tls`` gets the TLS mode of that port: implicit
on 465, else STARTTLS).

:func:`resolve_smarthosts` is pure: it takes the raw smart-host entries and the loaded presets
and returns every smart host with all its fields filled in, or every error, each naming where
(``<file>: relay_smarthosts[i] (name): field``), what is wrong and what to do. The relay role
(through the ``smtpgw_smarthosts`` action) and ``smtpgw tenants check`` both use it.
:func:`load_presets` does the reading.

A resolved smart host::

    {name, preset, host, port, tls: starttls|implicit, tls_verify, auth: login|none|certificate,
     username, password, spf_include, limits: {messages_per_day?, recipients_per_message?}}
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AUTH_MODES",
    "PRESET_FIELDS",
    "SMARTHOST_FIELDS",
    "TLS_MODES",
    "Presets",
    "Resolved",
    "default_presets_dirs",
    "load_presets",
    "presets_dirs",
    "resolve_smarthosts",
    "spf_mechanisms",
]

TLS_MODES = ("starttls", "implicit")
AUTH_MODES = ("login", "none", "certificate", "oauth2")
#: What a smart host in relay_smarthosts may set.
SMARTHOST_FIELDS = (
    "name",
    "preset",
    "host",
    "port",
    "tls",
    "tls_verify",
    "auth",
    "username",
    "password",
    "region",
    "spf_include",
    "limits",
)
#: What a preset file may hold.
PRESET_FIELDS = (
    "description",
    "host",
    "host_example",
    "port",
    "tls",
    "tls_verify",
    "auth",
    "auth_options",
    "username",
    "region",
    "spf_include",
    "limits",
    "limits_note",
    "provider_setup",
)
LIMIT_FIELDS = ("messages_per_day", "recipients_per_message")

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_HOST_RE = re.compile(
    r"(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*"
)
_SPF_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})+")
_REGION_RE = re.compile(r"[a-z]{2}(-gov)?-[a-z]+-\d{1,2}")
_NO_AUTH_FIELDS = ("username", "password")
_OAUTH2 = "the relay cannot speak XOAUTH2 yet; use auth: {others} (this provider offers: {offered})"


@dataclass
class Presets:
    """Loaded presets by name, with the file each came from, and the problems found."""

    by_name: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


@dataclass
class Resolved:
    """Resolved smart hosts in their order, or (never both) every error."""

    smarthosts: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Reading


def default_presets_dirs() -> list[Path]:
    """The project's ``templates/providers``: beside ``src/`` in a checkout, or at the root of
    the installed collection (``plugins/module_utils/smtpgw`` is this package)."""
    here = Path(__file__).parent
    found = []
    for root in (here.parent.parent, here.parent.parent.parent):
        candidate = root / "templates" / "providers"
        if candidate.is_dir():
            found.append(candidate)
            break
    return found


def presets_dirs(inventory: Path | None) -> list[Path]:
    """The project's presets, then the inventory's own ``templates/providers`` (wins by name)."""
    dirs = default_presets_dirs()
    if inventory is not None and (inventory / "templates" / "providers").is_dir():
        dirs.append(inventory / "templates" / "providers")
    return dirs


def load_presets(dirs: Iterable[Path]) -> Presets:
    """Read every ``*.yml`` preset in ``dirs``; a later directory's file wins by name."""
    import yaml

    presets = Presets()
    for directory in dirs:
        for file in sorted(Path(directory).glob("*.yml")):
            name = file.stem
            try:
                data = yaml.safe_load(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                presets.errors.append(f"{file}: cannot read the preset ({exc}); fix the file")
                continue
            problems = preset_problems(name, data)
            presets.errors += [f"{file}: {p}" for p in problems]
            if not problems:
                presets.by_name[name] = dict(data)
                presets.files[name] = str(file)
    return presets


def preset_problems(name: str, data: object) -> list[str]:
    """What is wrong with one preset (``<field>: what; fix``), or nothing."""
    if not _NAME_RE.fullmatch(name):
        return [f"'{name}' is not a preset name; name the file [a-z0-9-].yml"]
    if not isinstance(data, Mapping):
        return ["a preset is a mapping of fields; see templates/providers/README.md"]
    problems = []
    for key in data:
        if key not in PRESET_FIELDS:
            problems.append(f"{key}: not a preset field; use one of: {', '.join(PRESET_FIELDS)}")
    if not isinstance(data.get("description"), str):
        problems.append("description: missing; say in one line what the preset is")
    options = data.get("auth_options") or [data.get("auth") or "login"]
    if not isinstance(options, list) or any(o not in AUTH_MODES for o in options):
        problems.append(f"auth_options: must be a list of {', '.join(AUTH_MODES)}")
    elif (data.get("auth") or "login") not in options:
        problems.append("auth: must be one of auth_options")
    # The rest is checked as any smart host's fields are, with the preset's own defaults.
    entry = {k: v for k, v in data.items() if k in SMARTHOST_FIELDS}
    check = _Check("", "")
    _check_fields(check, entry, {"auth_options": list(AUTH_MODES)}, partial=True)
    problems += [e.lstrip(": ") for e in check.errors]
    return problems


# --------------------------------------------------------------------------------------
# Resolution


class _Check:
    def __init__(self, prefix: str, label: str) -> None:
        self.prefix = prefix
        self.label = label
        self.errors: list[str] = []

    def error(self, path: str, what: str, fix: str) -> None:
        where = f"{self.prefix}{self.label}: {path}" if path else f"{self.prefix}{self.label}"
        self.errors.append(f"{where}: {what}; {fix}")


def resolve_smarthosts(
    raw: object, presets: Mapping[str, Mapping[str, Any]], where: str = ""
) -> Resolved:
    """Every smart host of ``raw`` (the value of ``relay_smarthosts``) with its preset applied.

    ``where`` is the file the list comes from, for messages (empty when unknown: the relay
    role sees the merged variables only).
    """
    prefix = f"{where}: " if where else ""
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        return Resolved(
            errors=[
                f"{prefix}relay_smarthosts: must be a list of smart hosts; "
                "write relay_smarthosts: [{name: m365, preset: m365, username: ..., password: ...}]"
            ]
        )
    resolved: list[dict[str, Any]] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(raw):
        label = f"relay_smarthosts[{index}]"
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            label += f" ({entry['name']})"
        check = _Check(prefix, label)
        host = _resolve_one(check, entry, presets)
        if host is not None and host["name"] in seen:
            check.error(
                "name",
                f"'{host['name']}' is also relay_smarthosts[{seen[host['name']]}]",
                "give each smart host its own name",
            )
        if host is not None:
            seen.setdefault(host["name"], index)
        errors += check.errors
        if host is not None and not check.errors:
            resolved.append(host)
    return Resolved(errors=errors) if errors else Resolved(smarthosts=resolved)


def _resolve_one(
    check: _Check, entry: object, presets: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any] | None:
    if not isinstance(entry, Mapping):
        check.error("", "is not a mapping", "write {name: NAME, preset: m365, ...} or {name, host}")
        return None
    known = sorted(presets)
    for key in entry:
        if key not in SMARTHOST_FIELDS:
            close = difflib.get_close_matches(str(key), SMARTHOST_FIELDS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            check.error(
                str(key),
                "not a smart-host field",
                f"{hint}fields: {', '.join(SMARTHOST_FIELDS)}"
                + (f" (presets: {', '.join(known)})" if known else ""),
            )
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        check.error(
            "name", "missing or not a single word", "write name: m365 (what relay.via names)"
        )
        return None
    preset_name = entry.get("preset")
    preset: Mapping[str, Any] = {}
    if preset_name is not None:
        if not isinstance(preset_name, str) or preset_name not in presets:
            close = difflib.get_close_matches(str(preset_name), known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            check.error(
                "preset",
                f"unknown preset '{preset_name}'",
                f"{hint}presets: {', '.join(known) or 'none found'} "
                "(templates/providers/*.yml, an inventory's own templates/providers/ too)",
            )
            return None
        preset = presets[preset_name]
    merged = {k: v for k, v in preset.items() if k in SMARTHOST_FIELDS}
    if "port" in entry and "tls" not in entry:
        merged.pop("tls", None)  # a port of its own: the TLS mode follows it (465: implicit)
    merged.update({k: v for k, v in entry.items() if k in SMARTHOST_FIELDS})
    merged["preset"] = preset_name
    options = list(preset.get("auth_options") or AUTH_MODES)
    host = _check_fields(check, merged, {**preset, "auth_options": options}, partial=False)
    return host


def _check_fields(
    check: _Check, merged: Mapping[str, Any], preset: Mapping[str, Any], partial: bool
) -> dict[str, Any] | None:
    """Check the merged fields; with ``partial`` (a preset file) missing values are fine."""
    out: dict[str, Any] = {"name": merged.get("name"), "preset": merged.get("preset")}

    region = merged.get("region")
    bad_region = region is not None and (
        not isinstance(region, str) or not _REGION_RE.fullmatch(region)
    )
    if bad_region:
        check.error(
            "region", f"'{region}' is not an AWS region name", "write e.g. region: eu-west-1"
        )
    host = merged.get("host")
    if isinstance(host, str) and "{region}" in host:
        if bad_region:
            host = ""
        elif region is None:
            if not partial:
                check.error(
                    "region",
                    f"the preset's host is {host} and needs a region",
                    "set region: (e.g. eu-west-1), where the provider holds your domains",
                )
            host = ""
        else:
            host = host.replace("{region}", region)
    if host == "":  # needs a region, reported above
        host = None
    elif host is None:
        if not partial:
            example = preset.get("host_example")
            check.error(
                "host",
                "missing" + (" (the preset leaves it to you)" if merged.get("preset") else ""),
                f"set host: {example or 'the smart host name'}",
            )
    elif not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        check.error(
            "host", f"'{host}' is not a host name", "write a DNS name, e.g. smtp.example.com"
        )
    out["host"] = host

    port = merged.get("port")
    if port is None:
        port = 465 if merged.get("tls") == "implicit" else 587
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        check.error("port", f"'{port}' is not a port number", "write e.g. port: 587")
    out["port"] = port

    tls = merged.get("tls")
    if tls is None:
        tls = "implicit" if port == 465 else "starttls"
    if tls not in TLS_MODES:
        check.error("tls", f"unknown TLS mode '{tls}'", f"use one of: {', '.join(TLS_MODES)}")
    out["tls"] = tls

    verify = merged.get("tls_verify", True)
    if not isinstance(verify, bool):
        check.error(
            "tls_verify", f"must be true or false, not '{verify}'", "write tls_verify: true"
        )
    out["tls_verify"] = verify

    auth = merged.get("auth")
    if auth is None:
        auth = "login" if merged.get("username") or partial else "none"
    options = list(preset.get("auth_options") or AUTH_MODES)
    errors_before = len(check.errors)
    if auth not in AUTH_MODES:
        check.error("auth", f"unknown mode '{auth}'", f"use one of: {', '.join(options)}")
    elif auth == "oauth2" and not partial:
        others = [o for o in options if o != "oauth2"] or ["login", "none", "certificate"]
        check.error(
            "auth",
            "oauth2 is chosen",
            _OAUTH2.format(others=" or ".join(others), offered=", ".join(options)),
        )
    elif auth not in options:
        check.error(
            "auth",
            f"the preset '{merged.get('preset')}' does not offer '{auth}'",
            f"use one of: {', '.join(options)}",
        )
    out["auth"] = auth
    auth_ok = len(check.errors) == errors_before

    for key in _NO_AUTH_FIELDS:
        value = merged.get(key)
        if value is not None and not isinstance(value, str):
            check.error(
                key, f"must be a string, not {type(value).__name__}", f"quote it: {key}: '...'"
            )
        out[key] = value
    missing = [key for key in _NO_AUTH_FIELDS if not out[key]]
    given = [key for key in _NO_AUTH_FIELDS if out[key]]
    if partial or not auth_ok:
        pass
    elif auth == "login" and missing:
        check.error(
            " and ".join(missing),
            "missing, and auth is login",
            f"set {' and '.join(missing)} (the password from the vault, e.g. "
            '"{{ vault_smarthost_password }}"), or choose another auth',
        )
    elif auth in ("none", "certificate") and given:
        check.error(
            " and ".join(given),
            f"given, but auth is {auth} (no login at the smart host)",
            f"remove {' and '.join(given)}, or set auth: login",
        )
    if auth in ("none", "certificate"):
        out["username"] = out["password"] = None

    spf = merged.get("spf_include")
    if spf is not None and (not isinstance(spf, str) or not _SPF_RE.fullmatch(spf)):
        check.error("spf_include", f"'{spf}' is not a DNS name", "write e.g. spf.example.com")
    out["spf_include"] = spf

    out["limits"] = _check_limits(check, merged.get("limits"))
    return out


def _check_limits(check: _Check, value: object) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        check.error("limits", "must be a mapping", "write limits: {messages_per_day: 1000}")
        return {}
    limits = {}
    for key, item in value.items():
        if key not in LIMIT_FIELDS:
            check.error(f"limits.{key}", "not a limit", f"use: {', '.join(LIMIT_FIELDS)}")
        elif isinstance(item, bool) or not isinstance(item, int) or item < 1:
            check.error(f"limits.{key}", f"'{item}' is not a positive number", f"write {key}: 100")
        else:
            limits[key] = item
    return limits


def spf_mechanisms(
    smarthosts: Iterable[Mapping[str, Any]], overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Smart host name -> the SPF mechanism of the servers it sends from.

    From each resolved smart host's ``spf_include`` (``include:<it>``), then ``overrides`` (the
    inventory's ``smtpgw_dns_smarthost_spf``: any mechanism, e.g. ``a:upstream1.lab.test``),
    which win. A smart host with neither is left out: the DNS records refuse a tenant routed
    through it, saying what to add.
    """
    mechanisms = {
        str(h["name"]): f"include:{h['spf_include']}"
        for h in smarthosts
        if isinstance(h, Mapping) and h.get("spf_include")
    }
    mechanisms.update({str(k): str(v) for k, v in (overrides or {}).items()})
    return mechanisms
