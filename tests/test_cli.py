"""The `smtpgw tenants check` command on the shipped inventories and on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgw.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("inventory", "smarthost"), [("inventories/lab", "upstream1"), ("inventories/example", "m365")]
)
def test_shipped_inventories_are_valid(capsys, inventory, smarthost):
    assert main(["tenants", "check", str(ROOT / inventory), "--smarthost", smarthost]) == 0
    assert "2 tenant(s) ok" in capsys.readouterr().out


def test_bad_tenant_is_reported_with_file_field_and_fix(tmp_path, capsys):
    (tmp_path / "acme.yml").write_text("domains: [acme.test]\nnetworks: [0.0.0.0/0]\n")
    assert main(["tenants", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        f"{tmp_path}/acme.yml: networks[0]: 0.0.0.0/0 would make the gateway an open relay" in err
    )
    assert "1 error(s)" in err


def test_unknown_smarthost_needs_the_list(tmp_path, capsys):
    (tmp_path / "acme.yml").write_text("domains: [acme.test]\nrelay: {via: m356}\n")
    assert main(["tenants", "check", str(tmp_path), "--smarthost", "m365"]) == 1
    assert "relay.via: unknown smart host 'm356'; did you mean 'm365'?" in capsys.readouterr().err


def test_missing_directory(tmp_path, capsys):
    assert main(["tenants", "check", str(tmp_path / "nope")]) == 2
    assert "no such directory of tenant files" in capsys.readouterr().err


def test_shipped_inventories_are_valid_with_their_own_smarthosts(capsys):
    for inventory in ("inventories/lab", "inventories/example"):
        assert main(["tenants", "check", str(ROOT / inventory)]) == 0
        assert "2 tenant(s) ok" in capsys.readouterr().out


def _inventory(tmp_path: Path, via: str) -> Path:
    (tmp_path / "group_vars" / "relays").mkdir(parents=True)
    (tmp_path / "group_vars" / "relays" / "main.yml").write_text(
        "relay_smarthosts:\n  - name: m365\n    host: smtp.office365.com\n"
    )
    (tmp_path / "tenants").mkdir()
    (tmp_path / "tenants" / "acme.yml").write_text(f"domains: [acme.test]\nrelay: {{via: {via}}}\n")
    return tmp_path


def test_inventory_check_reads_the_inventorys_smarthosts(tmp_path, capsys):
    inventory = _inventory(tmp_path, "m356")
    assert main(["tenants", "check", str(inventory)]) == 1
    err = capsys.readouterr().err
    assert (
        f"{inventory}/tenants/acme.yml: relay.via: unknown smart host 'm356'; did you mean 'm365'?"
        in err
    )


def test_inventory_check_accepts_a_known_smarthost_and_extra_ones(tmp_path, capsys):
    inventory = _inventory(tmp_path, "m365")
    assert main(["tenants", "check", str(inventory)]) == 0
    (inventory / "tenants" / "acme.yml").write_text("domains: [acme.test]\nrelay: {via: other}\n")
    assert main(["tenants", "check", str(inventory), "--smarthost", "other"]) == 0


def test_tenants_directory_alone_checks_via_only_with_smarthost(tmp_path, capsys):
    inventory = _inventory(tmp_path, "m356")
    assert main(["tenants", "check", str(inventory / "tenants")]) == 0
    assert main(["tenants", "check", str(inventory / "tenants"), "--smarthost", "m365"]) == 1
