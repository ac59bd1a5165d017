"""The relay's own nftables rules: who may reach its metrics port (pure, no I/O)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["FirewallError", "nft_sets"]


class FirewallError(ValueError):
    """A value of relay_metrics_allowed is no address or network; the message says which."""


def nft_sets(
    values: Iterable[object], field: str = "relay_metrics_allowed"
) -> dict[str, list[str]]:
    """Addresses and networks -> {"ip": [...], "ip6": [...]}, normalised and sorted, for nftables.

    ``10.0.0.7`` stays an address, ``10.0.0.0/24`` a network, ``10.0.0.7/24`` becomes
    ``10.0.0.0/24`` (what it means). Raises :class:`FirewallError` naming the field and item.
    """
    out: dict[str, set[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {"ip": set(), "ip6": set()}
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise FirewallError(f"{field}: must be a list of addresses or networks, not {values!r}")
    for index, value in enumerate(values):
        try:
            net = ipaddress.ip_network(str(value).strip(), strict=False)
        except ValueError:
            raise FirewallError(
                f"{field}[{index}]: {value!r} is not an IP address or network; write an address "
                "(192.0.2.10, 2001:db8::10) or a network (192.0.2.0/24), not a host name"
            ) from None
        out["ip" if net.version == 4 else "ip6"].add(net)

    def text(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
        return str(net.network_address) if net.num_addresses == 1 else str(net)

    return {family: [text(n) for n in sorted(nets)] for family, nets in out.items()}
