"""The lab_dns role's filters: reverse zones of the lab networks and the PTR records in them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

_PATH = Path(__file__).resolve().parents[1] / "roles/lab_dns/filter_plugins/lab_dns.py"
_spec = importlib.util.spec_from_file_location("lab_dns_filters", _PATH)
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)


def test_reverse_zones_end_at_an_octet():
    assert filters.lab_dns_reverse_zones(["10.89.60.0/24", "10.89.60.7/24", "172.16.0.0/20"]) == [
        "60.89.10.in-addr.arpa",
        "16.172.in-addr.arpa",
    ]
    assert filters.lab_dns_reverse_zones([]) == []


@pytest.mark.parametrize("bad", ["2001:db8::/64", "10.0.0.0/7", "not-a-network"])
def test_reverse_zones_refuse_what_is_not_an_ipv4_network_of_8_or_narrower(bad):
    with pytest.raises(AnsibleFilterError, match="lab_dns_reverse_networks"):
        filters.lab_dns_reverse_zones([bad])


def test_ptr_records_for_the_a_records_inside_the_networks_only():
    records = [
        {"zone": "lab.test", "name": "relay1.lab.test.", "type": "A", "value": "10.89.60.11"},
        {"zone": "lab.test", "name": "mx1", "type": "A", "value": ["10.89.60.25"]},
        {"zone": "lab.test", "name": "@", "type": "A", "value": "10.89.60.53"},
        {"zone": "lab.test", "name": "far", "type": "A", "value": "192.0.2.1"},
        {"zone": "lab.test", "name": "gone", "type": "A", "state": "absent"},
        {"zone": "dest.test", "name": "@", "type": "MX", "value": "10 mx1.lab.test."},
    ]
    assert filters.lab_dns_ptr_records(records, ["10.89.60.0/24"]) == [
        {
            "zone": "60.89.10.in-addr.arpa",
            "name": "11.60.89.10.in-addr.arpa.",
            "type": "PTR",
            "value": "relay1.lab.test.",
        },
        {
            "zone": "60.89.10.in-addr.arpa",
            "name": "25.60.89.10.in-addr.arpa.",
            "type": "PTR",
            "value": "mx1.lab.test.",
        },
        {
            "zone": "60.89.10.in-addr.arpa",
            "name": "53.60.89.10.in-addr.arpa.",
            "type": "PTR",
            "value": "lab.test.",
        },
    ]
    assert filters.lab_dns_ptr_records(records, []) == []
