"""Filters of the smtpgw roles: thin wrappers over the pure functions in src/smtpgw."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

# The project's Python package, through this collection (plugins/module_utils/smtpgw is src/smtpgw).
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import dkim_keys as _dkim
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import postfix_maps as _maps
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import presets as _presets
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import relay_files as _files


def smtpgw_postfix_maps(tenants, smarthosts, route="direct"):
    """Per-tenant Postfix tables as lines: see smtpgw.postfix_maps.postfix_maps."""
    try:
        return _maps.postfix_maps(tenants, smarthosts, route)
    except _maps.RouteError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def smtpgw_relay_files(
    tenants, smarthosts, route="direct", selectors=None, paths=None, domain_selectors=None
):
    """Every tenant-derived file of the relay: see smtpgw.relay_files.relay_files."""
    try:
        return _files.relay_files(tenants, smarthosts, route, selectors, paths, domain_selectors)
    except (_maps.RouteError, _dkim.KeyProblem) as exc:
        raise AnsibleFilterError(str(exc)) from exc


def smtpgw_signing_domains(tenants):
    """Every domain the relay signs for, sorted."""
    return _files.signing_domains(tenants)


def smtpgw_default_transport(route, smarthosts):
    """main.cf default_transport for the relay's route (`direct` or a smart-host name)."""
    try:
        return _maps.default_transport(route, smarthosts)
    except _maps.RouteError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def smtpgw_spf_mechanisms(smarthosts, overrides=None):
    """Smart host name -> SPF mechanism: see smtpgw.presets.spf_mechanisms."""
    return _presets.spf_mechanisms(smarthosts, overrides)


def smtpgw_is_ip_address(value):
    """True when value is an IPv4 or IPv6 address (not a name, not a network)."""
    import ipaddress

    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True


class FilterModule:
    def filters(self):
        return {
            "smtpgw_postfix_maps": smtpgw_postfix_maps,
            "smtpgw_default_transport": smtpgw_default_transport,
            "smtpgw_relay_files": smtpgw_relay_files,
            "smtpgw_signing_domains": smtpgw_signing_domains,
            "smtpgw_spf_mechanisms": smtpgw_spf_mechanisms,
            "smtpgw_is_ip_address": smtpgw_is_ip_address,
        }
