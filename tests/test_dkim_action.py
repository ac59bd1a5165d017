"""The smtpgw_dkim_keys action, run for real through ansible-playbook: keys made once, kept,
refused when the store is open or a key broken, decrypted when vaulted, never shown."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PLAYBOOK = """\
- name: Keys
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Make and read the keys
      smtpgw.gateway.smtpgw_dkim_keys:
        path: "{{ playbook_dir }}/dkim"
        domains: [acme.test, globex.test]
      register: __keys
      ignore_errors: true
    - name: Save what a later task sees
      ansible.builtin.copy:
        content: "{{ __keys | to_json }}"
        dest: "{{ playbook_dir }}/result.json"
        mode: "0600"
      no_log: true
"""


def _tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    path = str(found) if found.is_file() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def run(workdir: Path, *extra: str) -> tuple[dict, str]:
    import json

    collections = workdir / "collections"
    link = collections / "ansible_collections" / "smtpgw" / "gateway"
    if not link.is_symlink():
        link.parent.mkdir(parents=True)
        link.symlink_to(REPO)
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(collections),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
    )
    command = [_tool("ansible-playbook"), "-i", "localhost,", "-c", "local", "playbook.yml"]
    command += ["-e", f"ansible_python_interpreter={sys.executable}", *extra]
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((workdir / "result.json").read_text()), done.stdout + done.stderr


def test_keys_made_once_kept_refused_and_never_shown(tmp_path: Path):
    (tmp_path / "playbook.yml").write_text(PLAYBOOK)
    store = tmp_path / "dkim"

    first, output = run(tmp_path, "-v")  # -v prints every result that is not hidden
    assert first["changed"] is True and len(first["created"]) == 4 + 1  # the store, four keys
    assert oct(store.stat().st_mode & 0o777) == "0o700"
    keys = sorted(p.name for p in store.glob("*.key"))
    assert keys == [
        "acme.test.smtpgw-ed25519.key",
        "acme.test.smtpgw-rsa.key",
        "globex.test.smtpgw-ed25519.key",
        "globex.test.smtpgw-rsa.key",
    ]
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in store.glob("*.key"))
    txt = (store / "acme.test.smtpgw-rsa.txt").read_text()
    assert txt.startswith("v=DKIM1; k=rsa; p=")
    assert {k["txt"] for k in first["dkim_keys"]} >= {txt.strip()}
    secrets = [k["private"] for k in first["dkim_keys"]]
    assert not any(s.strip().splitlines()[-2] in output for s in secrets if "\n" in s.strip())
    assert not any(s.strip() in output for s in secrets)
    assert "PRIVATE KEY" not in output

    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.iterdir()}
    second, _ = run(tmp_path)
    assert second["changed"] is False and second["created"] == []
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.iterdir()} == before
    assert [k["private"] for k in second["dkim_keys"]] == secrets

    # A vaulted key is decrypted.
    (tmp_path / "pass").write_text("vault test password\n")
    key = store / "globex.test.smtpgw-rsa.key"
    subprocess.run(
        [_tool("ansible-vault"), "encrypt", "--vault-password-file", "pass", str(key)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    assert key.read_bytes().startswith(b"$ANSIBLE_VAULT")
    vaulted, _ = run(tmp_path, "--vault-password-file", "pass")
    assert [k["private"] for k in vaulted["dkim_keys"]] == secrets
    without, _ = run(tmp_path)
    assert without["failed"] and f"{key}: cannot decrypt the private key" in without["msg"]

    # An open store, an open key, a broken key: refused, named, with the fix.
    store.chmod(0o755)
    opened, output = run(tmp_path, "--vault-password-file", "pass")
    assert opened["failed"] and f"chmod 0700 {store}" in opened["msg"]
    assert f"chmod 0700 {store}" in output  # a failure is shown
    store.chmod(0o700)
    (store / "acme.test.smtpgw-rsa.key").chmod(0o640)
    opened, _ = run(tmp_path, "--vault-password-file", "pass")
    assert "lets its group read or change" in opened["msg"]
    (store / "acme.test.smtpgw-rsa.key").chmod(0o600)
    (store / "acme.test.smtpgw-ed25519.key").write_text("garbage\n")
    broken, _ = run(tmp_path, "--vault-password-file", "pass")
    assert broken["failed"]
    assert f"{store}/acme.test.smtpgw-ed25519.key: cannot read the private key" in broken["msg"]
