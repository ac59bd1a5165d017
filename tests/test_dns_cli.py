"""`smtpgw dns export` and the inputs `smtpgw dns` reads from an inventory (no DNS server here:
plan, apply and check against one are in test_dns_publish.py and the gateway scenario)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from smtpgw import dkim_keys
from smtpgw.cli import main

SELECTORS = dkim_keys.DEFAULT_SELECTORS


def make_inventory(root: Path, tenants: dict[str, dict], relay_vars: dict | None = None) -> Path:
    inventory = root / "inv"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "tenants").mkdir()
    relay = {"relay_ip": "192.0.2.25"} if relay_vars is None else relay_vars
    hosts = {"all": {"children": {"relays": {"hosts": {"relay1": relay}}}}}
    (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (inventory / "group_vars" / "all.yml").write_text(
        yaml.safe_dump(
            {
                "smtpgw_dns_zones": ["example.test"],
                "smtpgw_dns_ttl": 600,
                "smtpgw_dns_smarthost_spf": {"m365": "include:spf.protection.outlook.com"},
            }
        )
    )
    # Templated as in a play: a host variable through Jinja.
    (inventory / "group_vars" / "relays.yml").write_text(
        "smtpgw_public_addresses: ['{{ relay_ip }}']\n"
        "relay_smarthosts: [{name: m365, host: smtp.office365.com}]\n"
    )
    for name, data in tenants.items():
        (inventory / "tenants" / f"{name}.yml").write_text(yaml.safe_dump(data))
    store = inventory / "dkim"
    store.mkdir(mode=0o700)
    domains = [d for t in tenants.values() for d in t.get("domains", [])]
    for spec in dkim_keys.key_specs(domains, SELECTORS):
        path = store / spec.key_file
        path.write_bytes(dkim_keys.generate(spec.algorithm))
        os.chmod(path, 0o600)
    return inventory


def public_txt(inventory: Path, domain: str, selector: str, algorithm: str) -> str:
    pem = (inventory / "dkim" / f"{domain}.{selector}.key").read_bytes()
    return dkim_keys.txt_value(dkim_keys.load_private(pem, algorithm, "key"))


def test_export_prints_the_records_of_the_inventory(tmp_path, capsys):
    inventory = make_inventory(
        tmp_path,
        {
            "acme": {"domains": ["acme.example.test"]},
            "globex": {
                "domains": ["globex.test"],
                "relay": {"via": "m365"},
                "dns": {"mta_sts": {"mode": "enforce", "mx": ["mx.globex.test"]}},
            },
        },
    )
    assert main(["dns", "export", str(inventory)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "; zone example.test"
    assert 'acme.example.test.\t600\tIN\tTXT\t"v=spf1 ip4:192.0.2.25 ~all"' in out
    assert (
        'globex.test.\t600\tIN\tTXT\t"v=spf1 ip4:192.0.2.25 include:spf.protection.outlook.com '
        '~all"'
    ) in out
    ed = public_txt(inventory, "globex.test", "smtpgw-ed25519", "ed25519")
    assert f'smtpgw-ed25519._domainkey.globex.test.\t600\tIN\tTXT\t"{ed}"' in out
    assert "; https://mta-sts.globex.test/.well-known/mta-sts.txt (serve it as text/plain):" in out
    assert ";   mode: enforce" in out


@pytest.mark.parametrize(
    ("tenants", "relay_vars", "said"),
    [
        (
            {"acme": {"domains": ["acme.test"], "dns": {"dmarc": {"reports": ["nobody"]}}}},
            None,
            "acme.yml: dns.dmarc.reports[0]: 'nobody' is not an e-mail address",
        ),
        (
            {
                "acme": {
                    "domains": ["acme.test"],
                    "dns": {"spf": [f"a:h{i}.test" for i in range(11)]},
                }
            },
            None,
            "tenant acme: dns.spf: the SPF record would need 11 DNS lookups, more than SPF's limit",
        ),
        (
            {"acme": {"domains": ["acme.test"]}},
            {},
            "relay1: smtpgw_public_addresses: cannot be resolved ('relay_ip' is undefined)",
        ),
    ],
)
def test_bad_input_fails_before_any_server_is_asked(tmp_path, capsys, tenants, relay_vars, said):
    inventory = make_inventory(tmp_path, tenants, relay_vars)
    assert main(["dns", "plan", str(inventory)]) == 1
    assert said in capsys.readouterr().err


def test_a_missing_key_says_how_to_make_it(tmp_path, capsys):
    inventory = make_inventory(tmp_path, {"acme": {"domains": ["acme.test"]}})
    (inventory / "dkim" / "acme.test.smtpgw-rsa.key").unlink()
    assert main(["dns", "export", str(inventory)]) == 1
    assert (
        "acme.test: no DKIM key for selector smtpgw-rsa; run playbooks/dns.yml or "
        "playbooks/site.yml, which make the missing keys"
    ) in capsys.readouterr().err
