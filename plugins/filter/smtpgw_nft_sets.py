"""smtpgw_nft_sets: relay_metrics_allowed as nftables address sets (smtpgw.firewall.nft_sets)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError
from ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw import firewall as _fw


def smtpgw_nft_sets(values, field="relay_metrics_allowed"):
    """Addresses and networks -> {"ip": [...], "ip6": [...]}; a bad one fails, named."""
    try:
        return _fw.nft_sets(values, field)
    except _fw.FirewallError as exc:
        raise AnsibleFilterError(str(exc)) from exc


class FilterModule:
    def filters(self):
        return {"smtpgw_nft_sets": smtpgw_nft_sets}
