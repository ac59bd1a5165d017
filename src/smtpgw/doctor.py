"""`smtpgw doctor`: walk a gateway's layers in order, stop at the first that fails, say what to do.

The layers, in order (:data:`LAYERS`):

1. ``names``: the gateway's name (each relay's Postfix ``myhostname``) resolves, at the
   inventory's resolver (``smtpgw_dns_resolver``, else this machine's), to the relay's address;
   each smart host in use resolves on the relay, to what it resolved to when the relay was
   deployed (``/etc/smtpgw/deployed.json``, written by the relay role);
2. ``relay-dns``: forward-confirmed reverse DNS of each relay's public address
   (``smtpgw_public_addresses``: PTR -> name -> the same address) and a HELO name that is that name;
3. ``reach``: TCP to 25, 465 and 587 of each relay from here, and to each smart host from the relay;
4. ``tls``: the TLS handshake on each port (protocol, the certificate's name, days to expiry);
5. ``auth``: AUTH on 587 with ``--login`` (skipped without one);
6. ``smarthost-auth``: each smart host in use accepts the relay's deployed credentials (a login
   from the relay, no mail sent);
7. ``queue``: size, oldest message, the top deferral reasons of the last hour;
8. ``tenant-dns``: every tenant domain's records (:func:`smtpgw.dns_publish.check`).

With ``--host`` only the layers a client sees are walked (names, reach, tls, auth) for that host
and port. The evaluation of what was seen (:func:`fcrdns`, :func:`smarthost_moved`,
:func:`queue_checks`, :func:`cert_check`...) is pure; gathering (DNS, TCP, TLS, SMTP, the relay
probe through Ansible) is apart, in :class:`InventoryDoctor` and :class:`HostDoctor`.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import json
import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LAYERS",
    "Check",
    "Report",
    "cert_check",
    "deferral_reasons",
    "fcrdns",
    "queue_checks",
    "render",
    "smarthost_moved",
    "walk",
]

#: (key, what it is), in the order they are walked.
LAYERS = (
    ("names", "name resolution"),
    ("relay-dns", "the relays' names in DNS: PTR and HELO"),
    ("reach", "TCP reachability"),
    ("tls", "TLS handshake"),
    ("auth", "AUTH with a login"),
    ("smarthost-auth", "the smart hosts accept the relay's login"),
    ("queue", "the queue"),
    ("tenant-dns", "tenant domains' DNS records"),
)
TIMEOUT = 5.0
# A login's answer may wait: the relay delays logins from an address that failed recently.
AUTH_TIMEOUT = 30.0
EXPIRY_WARN_DAYS = 14
DEFAULT_MAX_QUEUE_AGE = 1800  # seconds
PORTS = {25: "starttls", 465: "implicit", 587: "starttls"}
PROBE = Path(__file__).with_name("doctor_probe.py")


class DoctorError(Exception):
    """Doctor cannot start (bad inventory, no password): the message says what to do."""


@dataclass
class Check:
    layer: str
    subject: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    failed_layer: str | None = None
    not_checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed_layer is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed_layer": self.failed_layer,
            "checks": [asdict(c) for c in self.checks],
            "not_checked": self.not_checked,
        }


def walk(layers: Iterable[tuple[str, Callable[[], list[Check]]]]) -> Report:
    """Run each layer's checks in order; stop after the first layer with a failed check."""
    report = Report()
    layers = list(layers)
    for i, (key, run) in enumerate(layers):
        try:
            checks = run()
        except DoctorError as exc:
            checks = [Check(key, "doctor", "fail", str(exc), "")]
        report.checks += checks
        if any(c.status == "fail" for c in checks):
            report.failed_layer = key
            report.not_checked = [k for k, _ in layers[i + 1 :]]
            break
    return report


def render(report: Report) -> str:
    """One line per check (ok/FAIL + detail), the fix under a failure, then a summary."""
    titles = dict(LAYERS)
    lines = []
    for c in report.checks:
        word = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}[c.status]
        lines.append(f"{word:<5} {c.layer:<15} {c.subject}: {c.detail}")
        if c.fix and c.status in ("fail", "warn"):
            lines.append(f"{'':<5} {'':<15} fix: {c.fix}")
    if report.ok:
        done = [k for k, _ in LAYERS if any(c.layer == k for c in report.checks)]
        passed = sum(c.status == "ok" for c in report.checks)
        lines.append(f"all layers passed ({passed} checks): {', '.join(done)}")
    else:
        lines.append(
            f"FAILED at {report.failed_layer} ({titles.get(report.failed_layer or '', '')}); "
            f"not checked: {', '.join(report.not_checked) or 'nothing'}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Pure verdicts


def _fqdn(name: str) -> str:
    return name.rstrip(".").lower()


def fcrdns(
    relay: str,
    address: str,
    ptr_names: list[str],
    forward: Mapping[str, list[str]],
    helo: str,
    ptr_error: str = "",
) -> Check:
    """Forward-confirmed reverse DNS of `address` and a HELO name that matches it.

    `ptr_names`: the PTR records of the address; `forward`: name -> its A/AAAA addresses.
    """
    subject = f"{relay} {address}"
    if not ptr_names:
        return Check(
            "relay-dns",
            subject,
            "fail",
            f"no PTR record for {address}{f' ({ptr_error})' if ptr_error else ''}",
            f"publish a PTR record for {address} naming {helo or 'the relay'} (whoever holds the "
            "address block does); Gmail and Microsoft refuse or junk mail from an address "
            "without one",
        )
    confirmed = [n for n in ptr_names if address in forward.get(n, [])]
    if not confirmed:
        seen = "; ".join(f"{n} -> {', '.join(forward.get(n) or ['nothing'])}" for n in ptr_names)
        return Check(
            "relay-dns",
            subject,
            "fail",
            f"PTR of {address} names {', '.join(_fqdn(n) for n in ptr_names)}, which does not "
            f"resolve back to {address} ({seen})",
            f"point the PTR of {address} at {helo or 'the relay'}, and that name's A record at "
            f"{address}",
        )
    if helo and _fqdn(helo) not in {_fqdn(n) for n in confirmed}:
        return Check(
            "relay-dns",
            subject,
            "fail",
            f"PTR of {address} names {', '.join(_fqdn(n) for n in confirmed)}, but the relay "
            f"says HELO {helo}",
            f"point the PTR of {address} at {helo} (or set relay_hostname to "
            f"{_fqdn(confirmed[0])} and redeploy); receivers check that the two agree",
        )
    return Check(
        "relay-dns",
        subject,
        "ok",
        f"PTR {_fqdn(confirmed[0])} -> {address}; HELO {helo or '-'}",
    )


def smarthost_moved(
    relay: str, name: str, host: str, now: list[str], deployed: list[str] | None, error: str = ""
) -> Check:
    """The smart host's name resolves on the relay, to what it resolved to at deploy time."""
    subject = f"{relay} -> {name} ({host})"
    if not now:
        return Check(
            "names",
            subject,
            "fail",
            f"{host} does not resolve on {relay}{f' ({error})' if error else ''}",
            f"check the relay's resolver (/etc/resolv.conf on {relay}) and the smart host's "
            "name in relay_smarthosts (or its preset)",
        )
    if deployed is None:
        return Check(
            "names",
            subject,
            "warn",
            f"{host} -> {', '.join(now)}; no address recorded at deploy time",
            "redeploy (playbooks/site.yml) so the relay records its smart hosts' addresses",
        )
    if set(now) != set(deployed):
        return Check(
            "names",
            subject,
            "fail",
            f"{host} now resolves to {', '.join(now)}; when {relay} was deployed it resolved "
            f"to {', '.join(deployed) or 'nothing'}",
            "the smart host's address changed: if the provider moved it, allow the new address "
            "wherever outgoing mail is filtered and redeploy (playbooks/site.yml) to record it; "
            f"if not, someone changed the DNS records of {host}: check them",
        )
    return Check("names", subject, "ok", f"{host} -> {', '.join(now)} (as deployed)")


_DEFERRED = re.compile(r"status=deferred \((.*)\)\s*$")
_NUMBERS = re.compile(r"\b\d+(\.\d+)+\b|\[[0-9a-f.:]+\]")


def deferral_reasons(lines: Iterable[str], top: int = 3) -> list[tuple[str, int]]:
    """The most frequent reasons of `status=deferred (...)` log lines, most frequent first.

    Addresses in the reasons are blanked, so that one cause reads as one reason.
    """
    counts: collections.Counter[str] = collections.Counter()
    for line in lines:
        m = _DEFERRED.search(line)
        if m:
            counts[_NUMBERS.sub("*", m.group(1))] += 1
    return counts.most_common(top)


def queue_checks(
    relay: str,
    entries: list[Mapping[str, Any]],
    deferred_log: list[str],
    now: float,
    max_age: float = DEFAULT_MAX_QUEUE_AGE,
) -> Check:
    """The queue: size, oldest message (failing when older than `max_age` s), top reasons."""
    if not entries:
        return Check("queue", relay, "ok", "empty")
    oldest = min(float(e.get("arrival_time") or now) for e in entries)
    age = max(0.0, now - oldest)
    reasons = collections.Counter(r for e in entries for r in e.get("reasons") or [] if r)
    top = reasons.most_common(3) or deferral_reasons(deferred_log)
    why = "; ".join(f"{n}x {text}" for text, n in top) or "no reason recorded yet"
    detail = f"{len(entries)} message(s), oldest {_duration(age)} old; {why}"
    if age > max_age:
        return Check(
            "queue",
            relay,
            "fail",
            detail,
            f"mail has waited over {_duration(max_age)}: fix what the reasons name, then "
            f"`postqueue -f` on {relay} to retry now",
        )
    return Check("queue", relay, "ok", detail)


def _short(text: str, width: int = 72) -> str:
    """A record's text cut for people (a DKIM key is hundreds of characters)."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@dataclass
class CertInfo:
    protocol: str
    names: list[str]
    not_after: dt.datetime
    verify_error: str = ""  # empty: the chain and the name verified


def cert_check(subject: str, info: CertInfo, server_name: str, now: dt.datetime) -> Check:
    days = (info.not_after - now).total_seconds() / 86400
    names = ", ".join(info.names) or "no DNS name"
    detail = f"{info.protocol}, certificate for {names}, expires in {int(days)} days"
    if days < 0:
        return Check(
            "tls",
            subject,
            "fail",
            f"{info.protocol}, certificate for {names} expired {int(-days)} day(s) ago "
            f"({info.not_after:%Y-%m-%d})",
            "install a renewed certificate (relay_tls_certificate, relay_tls_private_key) and "
            "redeploy (playbooks/site.yml)",
        )
    if info.verify_error:
        if not _name_matches(server_name, info.names):
            fix = (
                f"the certificate must carry {server_name}: install one that does "
                "(relay_tls_certificate) and redeploy, or have clients use a name it carries"
            )
        else:
            fix = (
                "install a certificate from a CA the clients trust, with its chain "
                "(relay_tls_certificate), or give doctor the CA (--ca, smtpgw_doctor_ca)"
            )
        return Check("tls", subject, "fail", f"{detail}; not verified: {info.verify_error}", fix)
    if days < EXPIRY_WARN_DAYS:
        return Check("tls", subject, "warn", detail, "renew the certificate before it expires")
    return Check("tls", subject, "ok", detail)


def _name_matches(name: str, names: list[str]) -> bool:
    name = _fqdn(name)
    for pattern in names:
        pattern = _fqdn(pattern)
        if pattern == name:
            return True
        if pattern.startswith("*.") and name.split(".", 1)[-1] == pattern[2:]:
            return True
    return False


def tcp_fix(where: str, port: int, reason: str, postfix_state: str | None = None) -> str:
    if "refused" in reason.lower():
        state = f" (Postfix on {where} is {postfix_state})" if postfix_state else ""
        return (
            f"nothing listens on {port}{state}: start Postfix (`systemctl start postfix` on "
            f"{where}) and read why it stopped (`journalctl -u postfix@-`)"
        )
    return (
        f"no answer on {port} within {TIMEOUT:.0f} s: a firewall drops it, between here and "
        f"{where} or on it (`nft list ruleset`); open {port}/tcp for the clients"
    )


# --------------------------------------------------------------------------------------------
# Gathering: network-visible layers


class Resolver:
    """Lookups at one server (the inventory's resolver), else this machine's resolver."""

    def __init__(self, server: str | None) -> None:
        import dns.resolver

        self.server = server
        if server:
            self._r = dns.resolver.Resolver(configure=False)
            self._r.nameservers = [server]
        else:
            self._r = dns.resolver.Resolver()
        self._r.lifetime = TIMEOUT

    @property
    def label(self) -> str:
        return self.server or "this machine's resolver"

    def addresses(self, name: str) -> tuple[list[str], str]:
        import dns.exception
        import dns.resolver

        found: list[str] = []
        error = ""
        for rdtype in ("A", "AAAA"):
            try:
                found += [r.to_text() for r in self._r.resolve(name, rdtype)]
            except dns.resolver.NXDOMAIN:
                return [], "NXDOMAIN: no such name"
            except dns.resolver.NoAnswer:
                continue
            except dns.exception.DNSException as exc:
                error = str(exc)
        return found, ("" if found else error or "no A or AAAA record")

    def ptr(self, address: str) -> tuple[list[str], str]:
        import dns.exception
        import dns.resolver
        import dns.reversename

        try:
            answer = self._r.resolve(dns.reversename.from_address(address), "PTR")
        except dns.resolver.NXDOMAIN:
            return [], "NXDOMAIN"
        except dns.resolver.NoAnswer:
            return [], "no PTR record"
        except dns.exception.DNSException as exc:
            return [], str(exc)
        return [_fqdn(r.to_text()) for r in answer], ""


def tcp(address: str, port: int) -> str:
    """Empty when a TCP connection succeeds, else why not."""
    try:
        with socket.create_connection((address, port), timeout=TIMEOUT):
            return ""
    except TimeoutError:
        return f"timed out after {TIMEOUT:.0f} s"
    except OSError as exc:
        return exc.strerror or str(exc)


def _smtp(
    address: str,
    port: int,
    mode: str,
    server_name: str,
    ctx: ssl.SSLContext,
    timeout: float = TIMEOUT,
):
    if mode == "implicit":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            timeout=timeout, context=ctx, local_hostname="smtpgw-doctor.invalid"
        )
        smtp._host = server_name  # type: ignore[attr-defined]
        smtp.connect(address, port)
    else:
        smtp = smtplib.SMTP(timeout=timeout, local_hostname="smtpgw-doctor.invalid")
        smtp.connect(address, port)
        smtp._host = server_name  # type: ignore[attr-defined]
        smtp.starttls(context=ctx)
    return smtp


def handshake(
    address: str, port: int, mode: str, server_name: str, cafile: str | None
) -> CertInfo | str:
    """The certificate and protocol a client sees (CertInfo), or why there was no handshake."""
    from cryptography import x509

    loose = ssl.create_default_context()
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    try:
        smtp = _smtp(address, port, mode, server_name, loose)
        sock = smtp.sock
        der = sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        protocol = sock.version() or "?"  # type: ignore[union-attr]
        smtp.close()
    except (OSError, smtplib.SMTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    info = CertInfo(protocol, list(names), cert.not_valid_after_utc)
    strict = ssl.create_default_context(cafile=cafile)
    try:
        _smtp(address, port, mode, server_name, strict).close()
    except ssl.SSLCertVerificationError as exc:
        info.verify_error = exc.verify_message or str(exc)
    except (OSError, smtplib.SMTPException) as exc:
        info.verify_error = f"{type(exc).__name__}: {exc}"
    return info


def auth_check(
    subject: str,
    address: str,
    server_name: str,
    cafile: str | None,
    login: str,
    password: str,
    port: int = 587,
    where: str = "",
) -> Check:
    mode = PORTS.get(port, "starttls")
    try:
        ctx = ssl.create_default_context(cafile=cafile)
        smtp = _smtp(address, port, mode, server_name, ctx, AUTH_TIMEOUT)
        try:
            smtp.ehlo()
            smtp.login(login, password)
        finally:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()
    except smtplib.SMTPAuthenticationError as exc:
        text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else ""
        return Check(
            "auth",
            subject,
            "fail",
            f"{login} refused: {exc.smtp_code} {text}",
            f"the password is not the one the relay has for {login}: check it in the tenant "
            f"file{where} (or its vault) and redeploy; the relay delays further logins from an "
            "address that failed for up to 30 s",
        )
    except (OSError, smtplib.SMTPException) as exc:
        return Check(
            "auth",
            subject,
            "fail",
            f"{login}: {type(exc).__name__}: {exc}",
            "the login did not get as far as the password; see the error",
        )
    return Check("auth", subject, "ok", f"{login} logged in on {port}")


# --------------------------------------------------------------------------------------------
# One host and port, from anywhere


@dataclass
class HostDoctor:
    host: str
    port: int = 587
    server_name: str | None = None
    cafile: str | None = None
    login: str | None = None
    password: str | None = None
    resolver: str | None = None

    def run(self) -> Report:
        state: dict[str, str] = {}
        name = self.server_name or self.host

        def names() -> list[Check]:
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in self.host else socket.AF_INET, self.host)
                state["address"] = self.host
                return [Check("names", self.host, "skip", "an address: nothing to resolve")]
            except OSError:
                pass
            found, error = Resolver(self.resolver).addresses(self.host)
            if not found:
                return [
                    Check(
                        "names",
                        self.host,
                        "fail",
                        f"does not resolve ({error})",
                        f"publish the A record of {self.host}, or check the name",
                    )
                ]
            state["address"] = found[0]
            return [Check("names", self.host, "ok", f"-> {', '.join(found)}")]

        def reach() -> list[Check]:
            why = tcp(state["address"], self.port)
            subject = f"{self.host}:{self.port}"
            if why:
                return [Check("reach", subject, "fail", why, tcp_fix(self.host, self.port, why))]
            return [Check("reach", subject, "ok", f"connected to {state['address']}")]

        def tls() -> list[Check]:
            mode = PORTS.get(self.port, "starttls")
            got = handshake(state["address"], self.port, mode, name, self.cafile)
            subject = f"{self.host}:{self.port}"
            if isinstance(got, str):
                return [Check("tls", subject, "fail", got, "see the error")]
            return [cert_check(subject, got, name, dt.datetime.now(dt.UTC))]

        def auth() -> list[Check]:
            if not self.login:
                return [Check("auth", self.host, "skip", "no --login given")]
            return [
                auth_check(
                    f"{self.host}:{self.port}",
                    state["address"],
                    name,
                    self.cafile,
                    self.login,
                    self.password or "",
                    self.port,
                )
            ]

        return walk([("names", names), ("reach", reach), ("tls", tls), ("auth", auth)])


# --------------------------------------------------------------------------------------------
# The inventory's relays, from the controller


@dataclass
class Relay:
    name: str  # inventory host
    addresses: list[str]  # smtpgw_public_addresses
    probe: dict[str, Any] | None = None
    probe_error: str = ""
    address: str = ""  # where its name resolves (what clients reach)

    @property
    def gateway_name(self) -> str:
        return str((self.probe or {}).get("myhostname") or "")


class InventoryDoctor:
    """Every relay of an inventory (the group ``relays``), as the inventory describes it."""

    def __init__(
        self,
        inventory: Path,
        login: str | None = None,
        password: str | None = None,
        cafile: str | None = None,
        max_queue_age: float = DEFAULT_MAX_QUEUE_AGE,
        ports: Iterable[int] = tuple(PORTS),
    ) -> None:
        self.inventory = inventory
        self.login = login
        self.password = password
        self.max_queue_age = max_queue_age
        self.ports = list(ports)
        self._load()
        self.cafile = cafile or self.setting("smtpgw_doctor_ca")
        if self.cafile and not Path(self.cafile).is_file():
            where = "--ca" if cafile else f"smtpgw_doctor_ca in {inventory}"
            raise DoctorError(
                f"{where}: no such file {self.cafile}; "
                "give the CA that signed the relays' certificates"
            )
        self.resolver = Resolver(self.setting("smtpgw_dns_resolver"))

    # -- the inventory ---------------------------------------------------------------------

    def _load(self) -> None:
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.plugins.loader import init_plugin_loader
        from ansible.vars.hostvars import HostVars
        from ansible.vars.manager import VariableManager

        from . import dns_inputs
        from .presets import load_presets, presets_dirs, resolve_smarthosts

        init_plugin_loader()
        self._loader = DataLoader()
        dns_inputs._vault_secrets(self._loader)
        inv = self.inventory
        source = inv
        if inv.is_dir():
            hosts = [inv / n for n in ("hosts.yml", "hosts.yaml", "hosts", "hosts.ini")]
            source = next((h for h in hosts if h.is_file()), inv)
        self._manager = InventoryManager(loader=self._loader, sources=[str(source)])
        self._vars = VariableManager(loader=self._loader, inventory=self._manager)
        HostVars(inventory=self._manager, variable_manager=self._vars, loader=self._loader)
        hosts = self._manager.get_hosts("relays")
        if not hosts:
            raise DoctorError(f"{inv}: has no host in the group relays; name the relays there")
        self._first = hosts[0]
        self.inventory_dir = inv if inv.is_dir() else inv.parent
        self.relays = []
        for host in hosts:
            value = self.resolved(host, "smtpgw_public_addresses")
            if value is None:
                raise DoctorError(
                    f"{host.name}: smtpgw_public_addresses is not set; list the addresses this "
                    "relay sends from, as the recipients' MX hosts see them"
                )
            addrs = [str(a) for a in (value if isinstance(value, list) else [value])]
            self.relays.append(Relay(host.name, addrs))
        presets = load_presets(presets_dirs(self.inventory_dir))
        smarthosts = resolve_smarthosts(
            self.resolved(self._first, "relay_smarthosts", []) or [], presets.by_name
        )
        if presets.errors or smarthosts.errors:
            raise DoctorError("; ".join(presets.errors + smarthosts.errors))
        self.smarthosts = smarthosts.smarthosts
        self.tenants_dir = Path(
            self.resolved(self._first, "relay_tenants_dir") or self.inventory_dir / "tenants"
        )
        self.route = str(self.resolved(self._first, "relay_route") or "direct")

    def resolved(self, host: Any, name: str, default: Any = None) -> Any:
        from ansible.errors import AnsibleError
        from ansible.template import Templar

        hostvars = self._vars.get_vars(host=host)
        if name not in hostvars:
            return default
        try:
            return Templar(loader=self._loader, variables=hostvars).template(hostvars[name])
        except AnsibleError as exc:
            reason = " ".join(str(getattr(exc, "message", "") or exc).split())
            raise DoctorError(
                f"{host.name}: {name}: cannot be resolved ({reason}); set what it refers to in "
                "the inventory (doctor gathers no facts), or write the value"
            ) from None

    def setting(self, name: str) -> Any:
        """An inventory-wide setting, as the first relay sees it."""
        return self.resolved(self._first, name)

    def _tenant_data(self) -> dict[str, object]:
        from .tenant_files import load_tenant_dir
        from .tenant_schema import TenantError

        try:
            return load_tenant_dir(self.tenants_dir)
        except TenantError as exc:
            raise DoctorError("; ".join(exc.errors)) from None

    def in_use(self) -> list[dict[str, Any]]:
        """The smart hosts some mail goes through: relay_route and the tenants' relay.via."""
        names = {self.route}
        try:
            tenants = self._tenant_data()
        except (OSError, ValueError) as exc:
            raise DoctorError(f"{self.tenants_dir}: cannot read the tenant files: {exc}") from None
        for data in tenants.values():
            if isinstance(data, dict) and data.get("state", "present") != "absent":
                via = (
                    (data.get("relay") or {}).get("via")
                    if isinstance(data.get("relay"), dict)
                    else None
                )
                if via:
                    names.add(str(via))
        return [h for h in self.smarthosts if h["name"] in names]

    def login_password(self) -> str:
        """SMTPGW_DOCTOR_PASSWORD, else the login's password in its tenant file (templated
        with the inventory's variables), else asked for on a terminal."""
        if self.password is not None:
            return self.password
        for file, data in self._tenant_data().items():
            for user in (data.get("users") or []) if isinstance(data, dict) else []:
                if isinstance(user, dict) and str(user.get("login")) == self.login:
                    if user.get("password") is not None:
                        from ansible.template import Templar, trust_as_template

                        variables = self._vars.get_vars(host=self._first)
                        templar = Templar(loader=self._loader, variables=variables)
                        # Read from the file, not through Ansible: trusted as a template here,
                        # as the relay role's run trusts it, or Ansible returns it as written.
                        return str(templar.template(trust_as_template(str(user["password"]))))
                    raise DoctorError(
                        f"{file}: {self.login} has only a password_hash; give the password in "
                        "SMTPGW_DOCTOR_PASSWORD"
                    )
        if sys.stdin.isatty():
            import getpass

            return getpass.getpass(f"password of {self.login}: ")
        raise DoctorError(
            f"{self.login} is no login of the tenant files in {self.tenants_dir}; give its "
            "password in SMTPGW_DOCTOR_PASSWORD"
        )

    # -- the relays' own view (one Ansible run) -----------------------------------------------

    def probe(self) -> None:
        """Run doctor_probe.py on every relay at once (ansible.builtin.script)."""
        spec = [
            {k: h.get(k) for k in ("name", "host", "port", "tls", "auth", "username")}
            for h in self.in_use()
        ]
        arg = base64.b64encode(json.dumps(spec).encode()).decode()
        beside = Path(sys.executable).with_name("ansible")
        env = dict(
            os.environ,
            ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
            ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
            ANSIBLE_FORCE_COLOR="0",
        )
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "smtpgw-doctor-probe.py"
            script.write_text(PROBE.read_text())
            script.chmod(0o755)
            cmd = [
                str(beside) if beside.is_file() else "ansible",
                ",".join(r.name for r in self.relays),
                "-i",
                str(self.inventory),
                "-m",
                "ansible.builtin.script",
                "-a",
                f"{script} {arg}",
            ]
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, env=env, timeout=180, check=False
                )
            except subprocess.TimeoutExpired:
                for r in self.relays:
                    r.probe_error = "Ansible did not finish within 180 s"
                return
        try:
            hosts = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]
        except (ValueError, KeyError, IndexError):
            for r in self.relays:
                r.probe_error = f"ansible failed: {(proc.stderr or proc.stdout).strip()[-400:]}"
            return
        for r in self.relays:
            res = hosts.get(r.name) or {}
            try:
                r.probe = json.loads(res.get("stdout") or "")
            except ValueError:
                r.probe_error = str(res.get("msg") or res.get("stderr") or "no output").strip()

    # -- the layers ----------------------------------------------------------------------------

    def run(self) -> Report:
        self.probe()
        return walk(
            [
                ("names", self.names),
                ("relay-dns", self.relay_dns),
                ("reach", self.reach),
                ("tls", self.tls),
                ("auth", self.auth),
                ("smarthost-auth", self.smarthost_auth),
                ("queue", self.queue),
                ("tenant-dns", self.tenant_dns),
            ]
        )

    def _unreached(self, layer: str, relay: Relay) -> Check:
        return Check(
            layer,
            relay.name,
            "fail",
            f"cannot run the checks on {relay.name} through Ansible: {relay.probe_error}",
            f"make `ansible {relay.name} -i {self.inventory} -m ping` work (connection, become)",
        )

    def names(self) -> list[Check]:
        checks = []
        for r in self.relays:
            if r.probe is None:
                checks.append(self._unreached("names", r))
                continue
            name = r.gateway_name
            found, error = self.resolver.addresses(name)
            if not found:
                checks.append(
                    Check(
                        "names",
                        name,
                        "fail",
                        f"does not resolve at {self.resolver.label} ({error})",
                        f"publish the A record of {name} ({', '.join(r.addresses)}): clients "
                        "reach the gateway by this name, and its certificate carries it",
                    )
                )
                continue
            r.address = next((a for a in found if a in r.addresses), found[0])
            if not set(found) & set(r.addresses):
                checks.append(
                    Check(
                        "names",
                        name,
                        "fail",
                        f"resolves to {', '.join(found)}, not to {r.name}'s address "
                        f"({', '.join(r.addresses)})",
                        f"point the A record of {name} at {', '.join(r.addresses)}, or correct "
                        "smtpgw_public_addresses",
                    )
                )
                continue
            checks.append(Check("names", name, "ok", f"-> {', '.join(found)}"))
            deployed = ((r.probe.get("deployed") or {}).get("smarthost_addresses")) or {}
            for sh in r.probe.get("smarthosts") or []:
                checks.append(
                    smarthost_moved(
                        r.name,
                        sh["name"],
                        sh["host"],
                        sh.get("addresses") or [],
                        deployed.get(sh["host"]) if r.probe.get("deployed") else None,
                        sh.get("resolve_error") or "",
                    )
                )
        return checks

    def relay_dns(self) -> list[Check]:
        checks = []
        for r in self.relays:
            helo = str((r.probe or {}).get("helo") or "")
            for address in r.addresses:
                names, error = self.resolver.ptr(address)
                forward = {n: self.resolver.addresses(n)[0] for n in names}
                checks.append(fcrdns(r.name, address, names, forward, helo, error))
        return checks

    def reach(self) -> list[Check]:
        checks = []
        for r in self.relays:
            state = str((r.probe or {}).get("postfix") or "")
            for port in self.ports:
                subject = f"{r.gateway_name}:{port}"
                why = tcp(r.address, port)
                if why:
                    detail = why + (f"; Postfix on {r.name} is {state}" if state else "")
                    checks.append(
                        Check("reach", subject, "fail", detail, tcp_fix(r.name, port, why, state))
                    )
                else:
                    checks.append(Check("reach", subject, "ok", f"connected to {r.address}"))
            queue = (r.probe or {}).get("queue") or []
            for sh in (r.probe or {}).get("smarthosts") or []:
                subject = f"{r.name} -> {sh['name']} ({sh['host']}:{sh['port']})"
                got = sh.get("tcp") or {}
                if got.get("ok"):
                    checks.append(Check("reach", subject, "ok", f"connected to {got['address']}"))
                    continue
                waiting = len(queue)
                checks.append(
                    Check(
                        "reach",
                        subject,
                        "fail",
                        f"{got.get('detail') or 'not tried'} (from {r.name}, to "
                        f"{got.get('address', '-')}); {waiting} message(s) in {r.name}'s queue",
                        f"the smart host is down or does not let {r.name} in: check the "
                        "provider's status and that outgoing connections to it are allowed; "
                        "queued mail goes out by itself once it answers (`postqueue -f` to retry "
                        "now)",
                    )
                )
        return checks

    def tls(self) -> list[Check]:
        checks = []
        now = dt.datetime.now(dt.UTC)
        for r in self.relays:
            for port in self.ports:
                subject = f"{r.gateway_name}:{port}"
                got = handshake(r.address, port, PORTS[port], r.gateway_name, self.cafile)
                if isinstance(got, str):
                    checks.append(Check("tls", subject, "fail", got, "see the error"))
                else:
                    checks.append(cert_check(subject, got, r.gateway_name, now))
        return checks

    def auth(self) -> list[Check]:
        if not self.login:
            return [Check("auth", "-", "skip", "no --login given")]
        password = self.login_password()
        return [
            auth_check(
                f"{r.gateway_name}:587",
                r.address,
                r.gateway_name,
                self.cafile,
                self.login,
                password,
                where=f" in {self.tenants_dir}",
            )
            for r in self.relays
        ]

    def smarthost_auth(self) -> list[Check]:
        checks = []
        for r in self.relays:
            for sh in (r.probe or {}).get("smarthosts") or []:
                subject = f"{r.name} -> {sh['name']} ({sh['host']}:{sh['port']})"
                got = sh.get("auth")
                if got is None:
                    checks.append(Check("smarthost-auth", subject, "skip", "no login to test"))
                elif got.get("ok"):
                    checks.append(
                        Check("smarthost-auth", subject, "ok", f"accepts {got.get('user')}")
                    )
                elif got.get("refused"):
                    checks.append(
                        Check(
                            "smarthost-auth",
                            subject,
                            "fail",
                            f"refuses {got.get('user')}: {got.get('code')} {got.get('detail')}",
                            f"the password of {got.get('user')} at {sh['name']} is not the one "
                            "the relay has: set the current one in relay_smarthosts (vault) and "
                            "redeploy, or reset it at the provider; mail through it waits in "
                            "the queue meanwhile",
                        )
                    )
                else:
                    checks.append(
                        Check(
                            "smarthost-auth",
                            subject,
                            "fail",
                            f"login as {got.get('user')} failed: {got.get('detail')}",
                            "see the error (TLS: the smart host's certificate must carry "
                            f"{sh['host']} and come from a CA the relay trusts)",
                        )
                    )
        return checks

    def queue(self) -> list[Check]:
        import time

        return [
            queue_checks(
                r.name,
                (r.probe or {}).get("queue") or [],
                (r.probe or {}).get("deferred_log") or [],
                time.time(),
                self.max_queue_age,
            )
            for r in self.relays
        ]

    def tenant_dns(self) -> list[Check]:
        from . import dns_inputs, dns_publish, dns_records, tenant_schema

        try:
            with warnings.catch_warnings():  # Ansible's plugin loader, set up again for it
                warnings.simplefilter("ignore", UserWarning)
                inputs = dns_inputs.from_inventory(self.inventory)
            desired = inputs.desired()
        except (
            dns_inputs.InventoryProblem,
            dns_records.DnsProblem,
            tenant_schema.TenantError,
            ValueError,
        ) as exc:
            raise DoctorError(f"the records cannot be computed: {exc}") from None
        if not inputs.server:
            return [Check("tenant-dns", "-", "skip", "smtpgw_dns_server is not set")]
        server = dns_publish.Server(str(inputs.server).strip(), inputs.port)
        try:
            findings = dns_publish.check(desired, server, inputs.resolver)
        except dns_publish.DnsError as exc:
            raise DoctorError(str(exc)) from None
        finally:
            server.close()
        checks = []
        for f in findings:
            if f.status != "ok":
                checks.append(
                    Check(
                        "tenant-dns",
                        f"{f.name} {f.kind} at {f.server}",
                        "fail",
                        f"{f.status}: seen {'; '.join(_short(t) for t in f.seen) or 'nothing'}; "
                        f"expected {_short(f.expected)}",
                        f"publish the records: `smtpgw dns apply {self.inventory}` (or "
                        "playbooks/dns.yml); `smtpgw dns plan` shows the change first",
                    )
                )
        domains = sorted({f.domain for f in findings})
        if not checks:
            checks.append(
                Check(
                    "tenant-dns",
                    f"{len(domains)} domain(s)",
                    "ok",
                    f"{len(findings)} records as wanted ({', '.join(domains)})",
                )
            )
        return checks


# --------------------------------------------------------------------------------------------
# The command


def add_arguments(p: Any) -> None:
    """The options of `smtpgw doctor` (an argparse parser)."""
    p.add_argument(
        "inventory", nargs="?", default="inventories/lab", help="the inventory (default the lab's)"
    )
    p.add_argument("--host", help="check one gateway by name or address instead, from here")
    p.add_argument("--port", type=int, default=587, help="with --host: the port (default 587)")
    p.add_argument("--server-name", help="with --host: the name its certificate must carry")
    p.add_argument("--resolver", help="with --host: the DNS server to resolve it at")
    p.add_argument(
        "--login",
        help="log in as this login (password: SMTPGW_DOCTOR_PASSWORD, "
        "else the tenant file, else asked)",
    )
    p.add_argument(
        "--ca",
        help="CA file the gateway's certificate must verify against "
        "(default: the inventory's smtpgw_doctor_ca, else the system's)",
    )
    p.add_argument(
        "--max-queue-age",
        type=float,
        default=DEFAULT_MAX_QUEUE_AGE,
        metavar="S",
        help=f"fail when the oldest queued message is older (default {DEFAULT_MAX_QUEUE_AGE} s)",
    )
    p.add_argument("--json", action="store_true", help="the checks as JSON")


def main(args: Any) -> int:
    """Exit status: 0 every layer passed, 2 a layer failed, 1 doctor could not start."""
    password = os.environ.get("SMTPGW_DOCTOR_PASSWORD")
    try:
        if args.host:
            if args.login and password is None:
                import getpass

                if not sys.stdin.isatty():
                    raise DoctorError("--login needs the password in SMTPGW_DOCTOR_PASSWORD")
                password = getpass.getpass(f"password of {args.login}: ")
            report = HostDoctor(
                args.host,
                args.port,
                args.server_name,
                args.ca,
                args.login,
                password,
                args.resolver,
            ).run()
        else:
            report = InventoryDoctor(
                Path(args.inventory),
                login=args.login,
                password=password,
                cafile=args.ca,
                max_queue_age=args.max_queue_age,
            ).run()
    except DoctorError as exc:
        print(f"smtpgw doctor: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    return 0 if report.ok else 2
