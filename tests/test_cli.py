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
