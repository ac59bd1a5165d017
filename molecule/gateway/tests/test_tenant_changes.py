"""Tenant changes take effect on the next run of playbooks/site.yml, and nothing else changes:
adding a tenant, changing a password, removing a tenant (and a key file whose mode was widened by
hand is put back on the same run). Bad tenant files fail the run before any host is changed, each
with its own error."""

from __future__ import annotations

import re
import smtplib
import textwrap
from pathlib import Path

import pytest
import yaml
from gwlab import ROOT, run_site

from smtpgw import cli
from smtpgw.smtpclient import connect, send

# What a tenant change may touch on the relay: its files (tables, logins, rspamd's maps and
# signing table, the policy service's limits), the tables' databases, its domains' DKIM keys, and
# the reloads of rspamd, Postfix and the policy service.
TENANT_TASKS = {
    "relay : files | Render the tenant files",
    "relay : postfix | Build the databases of changed tables",
    "relay : dkim | Make the missing keys and read the others (on the controller)",
    "relay : dkim | Install the private keys, and only them",
    "relay : Reload rspamd",
    "relay : Reload Postfix",
    "relay : Reload the policy service",
}


def task_names(run) -> set[str]:
    """The changed tasks, by role-relative name (the role may be shown by its collection name)."""
    return {name.removeprefix("smtpgw.gateway.") for name in run.changed_tasks}


INITECH = """\
name: initech
domains: [initech.test]
users:
  - login: tps@initech.test
    password: initech-tps-reports
relay:
  via: upstream1
"""
HOOLI = """\
name: hooli
domains: [hooli.test]
users:
  - login: gavin@hooli.test
    password: hooli-nucleus-pw
networks: [192.0.2.0/28]
"""


def login(lab, user, password):
    return lab.submission(user, password)


def assert_login_refused(lab, user, password):
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        connect(login(lab, user, password))
    assert err.value.smtp_code == 535


def assert_tenant_change_only(run):
    assert run.rc == 0, run.output[-3000:]
    assert next(n for host, n in run.changed.items() if host.endswith("relay1")) > 0
    assert run.changed_tasks, "a tenant change changed no task"
    assert task_names(run) <= TENANT_TASKS, run.changed_tasks


def test_add_change_remove_tenants(lab, tenants_copy: Path):
    """Three runs: add three tenants (one written by `smtpgw tenants new`, its password in a vault
    file); change a password; remove them by deleting their files and with state: absent. The
    other tests' logins (scanner, billing) stay as they are."""
    # Add: the new tenants' logins relay on the next run (initech through its smart host).
    (tenants_copy / "initech.yml").write_text(INITECH)
    (tenants_copy / "hooli.yml").write_text(HOOLI)
    inventory = tenants_copy.parent  # with the scenario's smart hosts, for the check
    (inventory / "group_vars").symlink_to(ROOT / "inventories" / "lab" / "group_vars")
    vault = inventory / "vault.yml"
    argv = ["tenants", "new", "initrode", "--domain", "initrode.test"]
    assert cli.main([*argv, "--inventory", str(inventory), "--vault-file", str(vault)]) == 0
    initrode_password = yaml.safe_load(vault.read_text())["vault_initrode_app"]
    with_vault = ("-e", f"@{vault}")
    assert_tenant_change_only(run_site(tenants_copy, *with_vault))
    token = send(
        login(lab, "app@initrode.test", initrode_password), "app@initrode.test", "new@dest.test"
    )
    assert "From: app@initrode.test" in lab.find_mail(token)
    initech = login(lab, "tps@initech.test", "initech-tps-reports")
    token = send(initech, "tps@initech.test", "added@dest.test")
    assert "Authenticated sender: relay@lab.test" in lab.find_mail(token)
    token = send(
        login(lab, "gavin@hooli.test", "hooli-nucleus-pw"), "gavin@hooli.test", "added@dest.test"
    )
    assert lab.find_mail(token)

    # Change a password: the new one works, the old one no longer does; others are untouched.
    acme = tenants_copy / "acme.yml"
    acme.write_text(acme.read_text().replace('"{{ lab_secret_acme_app }}"', "a-brand-new-app-pw"))
    assert_tenant_change_only(run_site(tenants_copy, *with_vault))
    token = send(
        login(lab, "app@acme.test", "a-brand-new-app-pw"), "app@acme.test", "changed@dest.test"
    )
    assert lab.find_mail(token)
    assert_login_refused(lab, "app@acme.test", "lab-acme-app-password")
    token = send(
        login(lab, "scanner@acme.test", "lab-acme-scanner-pw"),
        "scanner@acme.test",
        "untouched@dest.test",
    )
    assert lab.find_mail(token)

    # Remove: every trace of both tenants leaves the relay. On the same run, a DKIM key whose mode
    # someone widened by hand is put back to 0600 (the keys are installed as one set).
    keys_dir = "/var/lib/rspamd/smtpgw-dkim"
    lab.exec("relay1", "chmod", "0644", f"{keys_dir}/acme.test.smtpgw-rsa.key")
    (tenants_copy / "initech.yml").unlink()
    (tenants_copy / "initrode.yml").unlink()
    (tenants_copy / "hooli.yml").write_text("name: hooli\nstate: absent\n")
    assert_tenant_change_only(run_site(tenants_copy, *with_vault))
    assert_login_refused(lab, "tps@initech.test", "initech-tps-reports")
    # (initrode's login is not tried too: a third wrong login in a row from this address meets
    # the relay's brute-force slowdown, 454. The traces below show it gone.)
    assert_login_refused(lab, "gavin@hooli.test", "hooli-nucleus-pw")
    traces = lab.exec(
        "relay1",
        "grep",
        "-rlE",
        "initech|initrode|hooli|192\\.0\\.2\\.0",
        "/etc/postfix",
        "/etc/dovecot",
        "/etc/rspamd",
        "/etc/smtpgw",
        check=False,
    )
    assert traces == "", f"a removed tenant is still in {traces}"
    keys = lab.exec(
        "relay1",
        "stat",
        "-c",
        "%n %a %U",
        "-L",
        *lab.exec("relay1", "find", keys_dir, "-type", "f").split(),
    )
    assert not {"hooli", "initech", "initrode"} & set(re.findall(r"[a-z]+", keys)), keys
    modes = {
        line.split()[0].rsplit("/", 1)[1]: line.split(None, 1)[1] for line in keys.splitlines()
    }
    assert "acme.test.smtpgw-rsa.key" in modes, modes
    assert set(modes.values()) == {"600 _rspamd"}, modes


BAD = {
    "unknown-field": ("typo.yml", "domians: [typo.test]\n", "typo.yml: unknown field 'domians'"),
    "bad-domain": (
        "bad.yml",
        "domains: [bad_domain..test]\n",
        "bad.yml: domains[0]: 'bad_domain..test'",
    ),
    "bad-cidr": (
        "bad.yml",
        "domains: [bad.test]\nnetworks: [10.0.0.300/24]\n",
        "bad.yml: networks[0]: '10.0.0.300/24' is not an IP network",
    ),
    "open-relay": (
        "bad.yml",
        "domains: [bad.test]\nnetworks: [0.0.0.0/0]\n",
        "bad.yml: networks[0]: 0.0.0.0/0 would make the gateway an open relay",
    ),
    "login-of-two-tenants": (
        "bad.yml",
        """\
            domains: [bad.test]
            users:
              - {login: tps@bad.test, password: long-enough-pw-1}
              - {login: TPS@bad.test, password: long-enough-pw-2}
            """,
        "bad.yml: users[1].login",
    ),
    "login-in-another-tenants-domain": (
        "bad.yml",
        """\
            domains: [bad.test]
            users:
              - {login: scanner@acme.test, password: long-enough-pw-1}
            """,
        "bad.yml: users[0].login: 'scanner@acme.test' is not in one of this tenant's domains",
    ),
    "domain-of-two-tenants": (
        "bad.yml",
        "domains: [acme.test]\n",
        "domain 'acme.test' is already claimed by tenant",
    ),
    "missing-password": (
        "bad.yml",
        "domains: [bad.test]\nusers:\n  - login: x@bad.test\n",
        "bad.yml: users[0]: one of password or password_hash is required",
    ),
    "undefined-secret": (
        "bad.yml",
        "domains: [bad.test]\nusers:\n  - {login: x@bad.test, password: '{{ vault_bad_x }}'}\n",
        "bad.yml: users[0].password: variable 'vault_bad_x' is undefined",
    ),
    "unknown-smarthost": (
        "bad.yml",
        "domains: [bad.test]\nrelay: {via: upstreem1}\n",
        "bad.yml: relay.via: unknown smart host 'upstreem1'; did you mean 'upstream1'?",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tenant_file_fails_before_any_change(lab, tenants_copy: Path, case):
    name, text, expected = BAD[case]
    (tenants_copy / name).write_text(textwrap.dedent(text))
    before = lab.relay_state()
    run = run_site(tenants_copy)
    assert run.rc != 0
    assert expected in run.output, run.output[-3000:]
    assert [n for host, n in run.changed.items() if host.endswith("relay1")] == [0]
    assert run.changed_tasks == []
    assert lab.relay_state() == before
