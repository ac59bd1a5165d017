"""lab_dns and lab_resolver, verified by behaviour on the gateway scenario's own dns1: DNS queries
and RFC 2136 updates from the host, name lookups from relay1 through dns1, and reruns of the roles
with changed or bad input."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import dns.tsig
import dns.tsigkeyring
import dns.update
import pytest
import yaml
from gwlab import NAME, ROOT, run_playbook_on_scenario

# The scenario's containers, as its inventory names them; relay1 resolves through dns1.
DNS1 = f"{NAME}-dns1"
CLIENT1 = f"{NAME}-relay1"
TSIG = yaml.safe_load((ROOT / "roles/lab_dns/defaults/main.yml").read_text())["lab_dns_tsig"]
LAB_VARS = yaml.safe_load((ROOT / "inventories/lab/group_vars/all/lab.yml").read_text())
ZONES = LAB_VARS["lab_dns_zones"]
REFUSALS = (dns.rcode.REFUSED, dns.rcode.NOTAUTH)


def query(server: str, name: str, rdtype: str, recurse: bool = False) -> dns.message.Message:
    message = dns.message.make_query(name, rdtype)
    if not recurse:
        message.flags &= ~dns.flags.RD
    return dns.query.udp(message, server, timeout=5)


def answers(response: dns.message.Message) -> list[str]:
    return sorted(rr.to_text() for rrset in response.answer for rr in rrset)


def update(server: str, zone: str, name: str, text: str, ring=None) -> int:
    """Add a TXT record with an RFC 2136 update; the response code (NOTAUTH for a bad signature)."""
    message = dns.update.UpdateMessage(zone, keyring=ring, keyalgorithm=TSIG["algorithm"])
    message.add(name, 60, "TXT", f'"{text}"')
    try:
        return dns.query.tcp(message, server, timeout=10).rcode()
    except dns.tsig.PeerError:  # the server rejected the signature and said so, unsigned
        return dns.rcode.NOTAUTH


def keyring(secret: str = TSIG["secret"], name: str = TSIG["name"]):
    return dns.tsigkeyring.from_text({name: secret})


def rerun(tmp_path: Path, target: str, role: str, role_vars: dict) -> tuple[int, str]:
    """Apply one role to one host again, with these variables, as a user's playbook would.

    Returns the exit code and everything ansible-playbook printed, uncoloured, on one line.
    """
    playbook = tmp_path / "rerun.yml"
    play = {
        "name": "Rerun",
        "hosts": target,
        "gather_facts": role == "lab_dns",  # lab_dns's defaults name facts; lab_resolver needs none
        "tasks": [{"ansible.builtin.include_role": {"name": role}, "vars": role_vars}],
    }
    playbook.write_text(json.dumps([play]))
    run = run_playbook_on_scenario(playbook)
    return run.rc, " ".join(run.output.split())


@pytest.fixture(scope="module")
def dns1(lab) -> str:
    return lab.hosts.ip("dns1")


@pytest.fixture(scope="module")
def mx1(lab) -> str:
    return lab.hosts.ip("mx1")


def test_named_enabled(lab_host):
    named = lab_host(DNS1).service("named")
    assert named.is_enabled
    assert named.is_running


def test_mx_record_published(dns1):
    response = query(dns1, "dest.test", "MX")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert answers(response) == ["10 mx1.lab.test."]


def test_a_records(dns1, mx1, lab):
    assert answers(query(dns1, "mx1.lab.test", "A")) == [mx1]
    assert answers(query(dns1, "relay1.lab.test", "A")) == [lab.hosts.ip("relay1")]
    # The initial zone file's record of the name server itself.
    assert answers(query(dns1, "dns1.lab.test", "A")) == [dns1]


def test_reverse_zone_names_the_hosts_inside_the_network(dns1, lab):
    """lab_dns_reverse_networks: the network's in-addr.arpa zone, a PTR per A record in it."""
    relay1 = lab.hosts.ip("relay1")
    reverse = dns.reversename.from_address(relay1)
    assert answers(query(dns1, reverse.to_text(), "PTR")) == ["relay1.lab.test."]
    zone = ".".join(reversed(relay1.split(".")[:3])) + ".in-addr.arpa"
    assert query(dns1, zone, "SOA").answer, f"{zone} is not served"
    # An address outside the network (a documentation address) gets no PTR here.
    assert query(dns1, "25.2.0.192.in-addr.arpa", "PTR").answer == []


def test_signed_update_is_applied(dns1):
    token = uuid.uuid4().hex
    assert update(dns1, "lab.test", f"t-{token}", token, keyring()) == dns.rcode.NOERROR
    assert answers(query(dns1, f"t-{token}.lab.test", "TXT")) == [f'"{token}"']


@pytest.mark.parametrize(
    "ring",
    [None, keyring(secret="d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldC13cm9uZyE="), keyring(name="other")],
    ids=["unsigned", "wrong-secret", "unknown-key"],
)
def test_other_updates_are_refused(dns1, ring):
    token = uuid.uuid4().hex
    assert update(dns1, "lab.test", f"t-{token}", token, ring) in REFUSALS
    assert query(dns1, f"t-{token}.lab.test", "TXT").rcode() == dns.rcode.NXDOMAIN


@pytest.fixture(scope="module")
def mirror(lab_host) -> str:
    """The Debian mirror's name, as relay1's apt uses it: the name lab hosts need forwarded."""
    sources = lab_host(CLIENT1).file("/etc/apt/sources.list.d/debian.sources").content_string
    host = re.search(r"^URIs:\s*\w+://([^/:\s]+)", sources, re.M).group(1)
    if re.fullmatch(r"[\d.]+|\[?[0-9a-fA-F:]+\]?", host):
        pytest.skip(f"the mirror is an address ({host}): nothing to resolve")
    return host


def test_recursion_forwards(dns1, mirror):
    # Not a lab zone: only dns1's forwarding to the resolvers the host gave it can answer it.
    response = query(dns1, f"{mirror}.", "A", recurse=True)
    assert response.flags & dns.flags.RA
    assert response.rcode() == dns.rcode.NOERROR
    assert any(rrset.rdtype == dns.rdatatype.A for rrset in response.answer), response


def test_client_resolves_through_dns1(lab_host, dns1, mx1, mirror):
    client = lab_host(CLIENT1)
    lines = client.file("/etc/resolv.conf").content_string.splitlines()
    assert [line for line in lines if line.startswith("nameserver")] == [f"nameserver {dns1}"]
    assert "search lab.test" in lines
    assert client.check_output("getent ahostsv4 mx1.lab.test").split()[0] == mx1
    assert client.check_output("getent ahostsv4 dns1").split()[0] == dns1  # search lab.test
    # Not a lab zone: the name apt needs, through dns1's forwarding.
    assert client.run(f"getent ahostsv4 {mirror}").rc == 0


def test_added_zone_is_served_and_updates_are_kept(tmp_path, dns1):
    token = uuid.uuid4().hex
    assert update(dns1, "lab.test", f"t-{token}", token, keyring()) == dns.rcode.NOERROR

    rc, output = rerun(tmp_path, DNS1, "lab_dns", {"lab_dns_zones": [*ZONES, "added.test"]})
    assert rc == 0, output

    soa = query(dns1, "added.test", "SOA")
    assert soa.rcode() == dns.rcode.NOERROR and soa.flags & dns.flags.AA
    assert update(dns1, "added.test", f"t-{token}", token, keyring()) == dns.rcode.NOERROR
    assert answers(query(dns1, f"t-{token}.added.test", "TXT")) == [f'"{token}"']
    # The existing zones were not rewritten from their initial content.
    assert answers(query(dns1, f"t-{token}.lab.test", "TXT")) == [f'"{token}"']
    assert answers(query(dns1, "dest.test", "MX")) == ["10 mx1.lab.test."]


def test_rejected_configuration_is_never_written(tmp_path, lab_host, dns1, mx1):
    before = lab_host(DNS1).file("/etc/bind/named.conf.options").content_string
    rc, output = rerun(tmp_path, DNS1, "lab_dns", {"lab_dns_allow_recursion": ["no such acl"]})
    assert rc != 0
    assert "failed to validate" in output, output
    assert lab_host(DNS1).file("/etc/bind/named.conf.options").content_string == before
    assert answers(query(dns1, "mx1.lab.test", "A")) == [mx1]


@pytest.mark.parametrize(
    ("target", "role", "role_vars", "message"),
    [
        (CLIENT1, "lab_resolver", {}, "missing required arguments: lab_resolver_nameserver"),
        (
            CLIENT1,
            "lab_resolver",
            {"lab_resolver_nameserver": "dns1.lab.test"},
            "must be the lab DNS",
        ),
        (
            DNS1,
            "lab_dns",
            {"lab_dns_records": [{"zone": "lab.test", "name": "x"}]},
            "missing required arguments: type found in lab_dns_records",
        ),
        (
            DNS1,
            "lab_dns",
            {
                "lab_dns_records": [
                    {"zone": "elsewhere.test", "name": "x", "type": "A", "value": "192.0.2.1"}
                ]
            },
            "must be one of lab_dns_zones or the reverse zones "
            "(records outside them: ['elsewhere.test'])",
        ),
    ],
    ids=["no-nameserver", "nameserver-not-address", "record-without-type", "record-outside-zones"],
)
def test_invalid_input_fails_clearly(tmp_path, target, role, role_vars, message):
    rc, output = rerun(tmp_path, target, role, role_vars)
    assert rc != 0
    assert message in output, output
