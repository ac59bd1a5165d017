"""What the DNS records are made from, gathered on the controller.

Two ways in, one result (:class:`DnsInputs`): the ``smtpgw_dns`` action plugin hands over what
Ansible has templated; the ``smtpgw dns`` command reads an inventory with Ansible's own
inventory and variable code (so ``group_vars``, ``host_vars`` and Jinja in them resolve as in a
playbook run). Either way the DKIM public keys are read from the key store with
:mod:`smtpgw.dkim_keys`, the module that makes them.

Inventory variables (documented in the README, "DNS records"):

- ``smtpgw_public_addresses`` (each relay): the addresses it sends from, as the world sees them;
- ``smtpgw_dns_server`` / ``smtpgw_dns_port``: the primary that takes the updates;
- ``smtpgw_dns_tsig``: ``{name, algorithm, secret}`` of the key updates are signed with;
- ``smtpgw_dns_zones``: zones the server serves (a domain below none is its own zone);
- ``smtpgw_dns_ttl``: TTL of the records (default 3600);
- ``smtpgw_dns_resolver``: a resolver ``dns check`` also asks (default: none);
- ``smtpgw_dns_smarthost_spf``: smart-host name -> SPF mechanism of its senders;
- ``smtpgw_dkim_rotation_grace``: grace period of a DKIM rotation that ``smtpgw dkim rotate``
  starts, in seconds (default 7 days);
- and the relay role's ``relay_tenants_dir``, ``relay_route``, ``relay_dkim_keys_dir``,
  ``relay_dkim_selectors``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dkim_keys
from .dns_records import Desired, desired_records

__all__ = ["DnsInputs", "InventoryProblem", "from_inventory", "read_dkim_public"]

DEFAULT_TTL = 3600


class InventoryProblem(ValueError):
    """The inventory lacks something the records need; the message says what to set."""


@dataclass
class DnsInputs:
    tenants: list[dict[str, Any]]
    relay_addresses: list[str]
    dkim: dict[tuple[str, str], str]
    selectors: list[str]
    smarthost_spf: dict[str, str] = field(default_factory=dict)
    route: str = "direct"
    zones: list[str] = field(default_factory=list)
    ttl: int = DEFAULT_TTL
    server: str | None = None
    port: int = 53
    tsig: Mapping[str, Any] | None = None
    resolver: str | None = None
    rotation_grace: int | None = None
    # DKIM rotation (smtpgw.dkim_rotation): the key store, the base selectors, the relays'
    # names, and the selectors each domain in a cycle publishes now.
    keys_dir: Path | None = None
    base_selectors: dict[str, str] = field(default_factory=dict)
    relays: list[str] = field(default_factory=list)
    domain_selectors: dict[str, list[str]] = field(default_factory=dict)

    def desired(self) -> Desired:
        return desired_records(
            self.tenants,
            self.relay_addresses,
            self.dkim,
            self.selectors,
            smarthost_spf=self.smarthost_spf,
            route=self.route,
            zones=self.zones,
            ttl=self.ttl,
            domain_selectors=self.domain_selectors,
            spf_fetch=_txt_fetcher(self.resolver) if self.resolver else None,
        )


def _txt_fetcher(resolver: str):
    """name -> its TXT texts, asked of ``resolver`` (none on any failure: SPF counts what it
    can see, and a void lookup costs no further lookups)."""
    import dns.exception
    import dns.resolver

    asker = dns.resolver.Resolver(configure=False)
    asker.nameservers = [str(resolver).strip()]
    asker.lifetime = 5

    def fetch(name: str) -> list[str]:
        try:
            answer = asker.resolve(name, "TXT")
        except dns.exception.DNSException:
            return []
        return [b"".join(r.strings).decode(errors="replace") for r in answer]

    return fetch


def read_dkim_public(
    store: Path,
    domains: Iterable[str],
    selectors: Mapping[str, str],
    per_domain: Mapping[str, Iterable[Mapping[str, str]]] | None = None,
) -> dict[tuple[str, str], str]:
    """(domain, selector) -> DKIM TXT value of each key in the store that exists.

    A key file is read and its public key derived (:func:`smtpgw.dkim_keys.txt_value`); a key
    encrypted with ansible-vault is not decrypted here: the ``.txt`` the action plugin wrote
    beside it is used. A missing key is left out (the records then say it is missing).
    """
    found: dict[tuple[str, str], str] = {}
    for spec in dkim_keys.key_specs(domains, selectors, per_domain):
        path = store / spec.key_file
        if not path.is_file():
            continue
        data = path.read_bytes()
        if data.startswith(b"$ANSIBLE_VAULT"):
            txt_path = store / spec.txt_file
            if txt_path.is_file():
                found[(spec.domain, spec.selector)] = txt_path.read_text().strip()
            continue
        key = dkim_keys.load_private(data, spec.algorithm, str(path))
        found[(spec.domain, spec.selector)] = dkim_keys.txt_value(key)
    return found


def from_inventory(inventory: Path) -> DnsInputs:
    """Everything the records need, from an inventory directory (or file), templated by Ansible.

    Raises :class:`InventoryProblem` (or ``smtpgw.tenant_schema.TenantError``) when something
    is missing or wrong.
    """
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import init_plugin_loader
    from ansible.template import Templar
    from ansible.vars.hostvars import HostVars
    from ansible.vars.manager import VariableManager

    from .presets import load_presets, presets_dirs, resolve_smarthosts, spf_mechanisms
    from .tenant_files import check_dir
    from .tenant_schema import TenantError

    init_plugin_loader()
    loader = DataLoader()
    _vault_secrets(loader)
    source = inventory
    if inventory.is_dir():  # its hosts file: Ansible would try every file there as a source
        hosts = [inventory / n for n in ("hosts.yml", "hosts.yaml", "hosts", "hosts.ini")]
        source = next((h for h in hosts if h.is_file()), inventory)
    manager = InventoryManager(loader=loader, sources=[str(source)])
    variables = VariableManager(loader=loader, inventory=manager)
    HostVars(inventory=manager, variable_manager=variables, loader=loader)  # hostvars[...] works
    relays = manager.get_hosts("relays")
    if not relays:
        raise InventoryProblem(
            f"{inventory}: has no host in the group relays; the records name the relays' addresses"
        )
    inventory_dir = inventory if inventory.is_dir() else inventory.parent

    def resolved(host: Any, name: str, default: Any = None) -> Any:
        hostvars = variables.get_vars(host=host)
        if name not in hostvars:
            return default
        try:
            return Templar(loader=loader, variables=hostvars).template(hostvars[name])
        except AnsibleError as exc:
            reason = " ".join(str(getattr(exc, "message", "") or exc).split())
            raise InventoryProblem(
                f"{host.name}: {name}: cannot be resolved ({reason}); set what "
                "it refers to in the inventory (`smtpgw dns` gathers no facts), or write the value"
            ) from None

    first = relays[0]
    addresses: list[str] = []
    for relay in relays:
        value = resolved(relay, "smtpgw_public_addresses")
        if value is None:
            raise InventoryProblem(
                f"{relay.name}: smtpgw_public_addresses is not set; list the addresses this relay "
                "sends from, as the recipients' MX hosts see them (SPF names them)"
            )
        addresses += [str(a) for a in (value if isinstance(value, list) else [value])]
    tenants_dir = Path(resolved(first, "relay_tenants_dir") or inventory_dir / "tenants")
    presets = load_presets(presets_dirs(inventory_dir))
    smarthosts = resolve_smarthosts(resolved(first, "relay_smarthosts", []) or [], presets.by_name)
    if presets.errors or smarthosts.errors:
        raise InventoryProblem("; ".join(presets.errors + smarthosts.errors))
    result = check_dir(tenants_dir, smarthosts=[h["name"] for h in smarthosts.smarthosts])
    if result.errors:
        raise TenantError(result.errors)
    selectors = dict(resolved(first, "relay_dkim_selectors") or dkim_keys.DEFAULT_SELECTORS)
    keys_dir = Path(resolved(first, "relay_dkim_keys_dir") or inventory_dir / "dkim")
    domains = [d for t in result.tenants for d in t["domains"]]
    from . import dkim_rotation_ops

    relay_names = [r.name for r in relays]
    rotating = dkim_rotation_ops.publish_selectors(
        dkim_rotation_ops.statuses(dkim_rotation_ops.load_all(keys_dir, domains), relay_names)
    )
    localhost = manager.get_host("localhost") or first
    settings = {
        name: resolved(localhost, name)
        for name in (
            "smtpgw_dns_server",
            "smtpgw_dns_port",
            "smtpgw_dns_tsig",
            "smtpgw_dns_zones",
            "smtpgw_dns_ttl",
            "smtpgw_dns_resolver",
            "smtpgw_dns_smarthost_spf",
            "smtpgw_dkim_rotation_grace",
        )
    }
    return DnsInputs(
        tenants=result.tenants,
        relay_addresses=addresses,
        dkim=read_dkim_public(keys_dir, domains, selectors, rotating),
        selectors=[selectors[a] for a in dkim_keys.ALGORITHMS],
        smarthost_spf=spf_mechanisms(
            smarthosts.smarthosts, settings["smtpgw_dns_smarthost_spf"] or {}
        ),
        route=str(resolved(first, "relay_route") or "direct"),
        zones=list(settings["smtpgw_dns_zones"] or []),
        ttl=int(settings["smtpgw_dns_ttl"] or DEFAULT_TTL),
        server=settings["smtpgw_dns_server"],
        port=int(settings["smtpgw_dns_port"] or 53),
        tsig=settings["smtpgw_dns_tsig"],
        resolver=settings["smtpgw_dns_resolver"],
        rotation_grace=(
            None
            if settings["smtpgw_dkim_rotation_grace"] in (None, "")
            else int(settings["smtpgw_dkim_rotation_grace"])
        ),
        keys_dir=keys_dir,
        base_selectors=selectors,
        relays=relay_names,
        domain_selectors={
            d: [pair[a] for pair in pairs for a in dkim_keys.ALGORITHMS]
            for d, pairs in rotating.items()
        },
    )


def _vault_secrets(loader: Any) -> None:
    """Vault passwords as ansible-playbook finds them (ANSIBLE_VAULT_PASSWORD_FILE, ansible.cfg)."""
    from ansible import constants as C
    from ansible.cli import CLI

    files = C.DEFAULT_VAULT_PASSWORD_FILE
    files = [files] if isinstance(files, str) else list(files or [])
    if not files:
        return
    secrets = CLI.setup_vault_secrets(
        loader, vault_ids=C.DEFAULT_VAULT_IDENTITY_LIST, vault_password_files=files
    )
    loader.set_vault_secrets(secrets)
