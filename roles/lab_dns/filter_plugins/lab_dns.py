"""Filters of the lab_dns role: the reverse zones of the lab networks and their PTR records."""

from __future__ import annotations

import ipaddress

from ansible.errors import AnsibleFilterError


def _network(text):
    try:
        net = ipaddress.ip_network(str(text), strict=False)
    except ValueError as exc:
        raise AnsibleFilterError(
            f"lab_dns_reverse_networks: {text!r} is not an IPv4 network ({exc}); "
            "write it as 10.89.60.0/24"
        ) from None
    if net.version != 4 or net.prefixlen < 8:
        raise AnsibleFilterError(
            f"lab_dns_reverse_networks: {text} must be an IPv4 network of /8 or narrower"
        )
    # A reverse zone ends at an octet: a /20 is served as the /16 that holds it.
    return net.supernet(new_prefix=net.prefixlen - net.prefixlen % 8)


def _zone(net):
    octets = str(net.network_address).split(".")[: net.prefixlen // 8]
    return ".".join(reversed(octets)) + ".in-addr.arpa"


def lab_dns_reverse_zones(networks):
    """The in-addr.arpa zone of each network (/8, /16, /24, or the octet boundary above)."""
    zones = []
    for text in networks or []:
        zone = _zone(_network(text))
        if zone not in zones:
            zones.append(zone)
    return zones


def lab_dns_ptr_records(records, networks):
    """A PTR record (in the reverse zone) for every present A record inside one of `networks`,
    naming the A record's owner. Records as lab_dns_records takes them."""
    nets = [_network(text) for text in networks or []]
    ptrs = []
    for record in records or []:
        if (
            str(record.get("type", "")).upper() != "A"
            or record.get("state", "present") != "present"
        ):
            continue
        name = str(record["name"])
        if name == "@":
            owner = f"{record['zone']}."
        elif name.endswith("."):
            owner = name
        else:
            owner = f"{name}.{record['zone']}."
        values = record.get("value")
        for value in values if isinstance(values, list) else [values]:
            address = ipaddress.ip_address(str(value))
            for net in nets:
                if address in net:
                    ptrs.append(
                        {
                            "zone": _zone(net),
                            "name": address.reverse_pointer + ".",
                            "type": "PTR",
                            "value": owner,
                        }
                    )
                    break
    return ptrs


class FilterModule:
    def filters(self):
        return {
            "lab_dns_reverse_zones": lab_dns_reverse_zones,
            "lab_dns_ptr_records": lab_dns_ptr_records,
        }
