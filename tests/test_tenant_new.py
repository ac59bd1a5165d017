"""`smtpgw tenants new`: the file it writes checks clean, the password lands in the vault file
(encrypted ones too), and every refusal writes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from ansible.parsing.vault import VaultLib, VaultSecret

from smtpgw import cli
from smtpgw.tenant_files import check_inventory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    inv = tmp_path / "inv"
    shutil.copytree(ROOT / "inventories" / "lab" / "tenants", inv / "tenants")
    shutil.copytree(ROOT / "inventories" / "lab" / "group_vars", inv / "group_vars")
    return inv


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(*argv: str) -> int:
    return cli.main(["tenants", "new", *argv])


def test_new_tenant_checks_clean_and_its_password_is_in_the_vault(inventory, capsys):
    assert (
        run(
            "initech",
            "--domain",
            "initech.test",
            "--network",
            "198.51.100.0/28",
            "--preset",
            "m365",
            "--inventory",
            str(inventory),
        )
        == 0
    )
    out = capsys.readouterr().out
    vault = inventory / "group_vars" / "all" / "vault.yml"
    secrets = yaml.safe_load(vault.read_text())
    password = secrets["vault_initech_app"]
    assert len(password) >= 20 and password not in out  # never printed unless asked
    assert vault.stat().st_mode & 0o777 == 0o600
    assert f"ansible-vault encrypt {vault}" in out
    tenant = yaml.safe_load((inventory / "tenants" / "initech.yml").read_text())
    assert tenant["users"] == [{"login": "app@initech.test", "password": "{{ vault_initech_app }}"}]
    assert tenant["relay"] == {"via": "upstream1"}  # the lab's smart host with preset m365
    result = check_inventory(inventory)
    assert result.errors == []
    assert "initech" in [t["name"] for t in result.tenants]


def test_show_password_prints_it(inventory, capsys):
    assert (
        run("hooli", "--domain", "hooli.test", "--inventory", str(inventory), "--show-password")
        == 0
    )
    vault = yaml.safe_load((inventory / "group_vars" / "all" / "vault.yml").read_text())
    assert f"password: {vault['vault_hooli_app']}" in capsys.readouterr().out


def test_encrypted_vault_is_extended_and_stays_encrypted(inventory, tmp_path, capsys):
    secret_file = tmp_path / "vault-pass"
    secret_file.write_text("lab-vault-password\n")
    lib = VaultLib([("default", VaultSecret(b"lab-vault-password"))])
    vault = inventory / "group_vars" / "all" / "vault.yml"
    vault.write_bytes(lib.encrypt("---\n# mine\nvault_other: keep-me\n"))
    argv = ("hooli", "--domain", "hooli.test", "--inventory", str(inventory))
    # Without the vault password: refused, nothing written.
    before = snapshot(inventory)
    assert run(*argv) == 1
    assert "pass --vault-password-file" in capsys.readouterr().err
    assert snapshot(inventory) == before
    assert run(*argv, "--vault-password-file", str(secret_file)) == 0
    assert vault.read_bytes().startswith(b"$ANSIBLE_VAULT;")
    text = lib.decrypt(vault.read_bytes()).decode()
    assert text.startswith("---\n# mine\nvault_other: keep-me\n")
    assert yaml.safe_load(text)["vault_hooli_app"]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (("acme", "--domain", "new.test"), "acme.yml: exists already"),
        (
            ("acme2", "--domain", "acme.test"),
            "domain 'acme.test' is already claimed by tenant 'acme'",
        ),
        (("other", "--domain", "o.test", "--preset", "m366"), "unknown preset 'm366'; presets: "),
        (("other", "--domain", "o.test", "--preset", "sendgrid"), "no smart host of"),
        (("Bad_Name", "--domain", "o.test"), "not a tenant name"),
        (("other", "--domain", "o.test", "--network", "0.0.0.0/0"), "open relay"),
    ],
)
def test_refusals_write_nothing(inventory, capsys, argv, said):
    before = snapshot(inventory)
    assert run(*argv, "--inventory", str(inventory)) == 1
    err = capsys.readouterr().err
    assert said in err and "nothing written" in err
    assert snapshot(inventory) == before


def test_an_inventory_template_wins(inventory):
    (inventory / "templates").mkdir()
    (inventory / "templates" / "tenant.yml.j2").write_text(
        "name: {{ name }}\ndomains: {{ domains | tojson }}\n# ours\n"
    )
    assert run("hooli", "--domain", "hooli.test", "--inventory", str(inventory)) == 0
    assert (inventory / "tenants" / "hooli.yml").read_text().endswith("# ours\n")
