"""The collection smtpgw.gateway as a user gets it: `ansible-galaxy collection build` of this
checkout, `ansible-galaxy collection install` of the tarball into an empty collections path, then
playbooks in a directory outside the checkout that use the plugins and the relay role by their
full names, with no project ansible.cfg and nothing of the checkout on any path.

Where the plugins' Python code comes from is proven, not assumed: the playbook runs with a
`sitecustomize` (the only entry of PYTHONPATH) that installs an audit hook in every Python process
of the run (workers are forks, so they inherit it) and logs each module imported and each .py/.pyc
file opened whose name holds "smtpgw". The test then requires the collection's module_utils names
and files under the installed tree, and no module named `smtpgw` (the pip package, which the venv
has installed in editable mode from a checkout) and no file of this checkout.

The relay role runs against one lab container of its own (`smtpgw-coll`, 10.89.85.0/24, relay1
only), which the test removes afterwards, also when it fails."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import ssl
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from smtpgw.lab import DEFAULT_IMAGE, Lab, LabError

ROOT = Path(__file__).resolve().parents[1]
COLLECTION = "smtpgw.gateway"
MODULE_UTILS = "ansible_collections.smtpgw.gateway.plugins.module_utils.smtpgw"
# What the action and the filter import of the package.
MODULES = {
    "tenant_schema",
    "tenant_files",
    "password_cache",
    "passwords",
    "postfix_maps",
    "presets",
}
LAB_NAME = "smtpgw-coll"
LAB_SUBNET = "10.89.85.0/24"
RELAY_IP = "10.89.85.11"  # relay1 is .11 in every lab (smtpgw.lab.HOSTS)
PASSWORD = "coll-test-scanner-pw"

# Every Python process of the playbook run imports this first (it is all PYTHONPATH holds).
SITECUSTOMIZE = """\
import os
import sys

_LOG = os.environ["SMTPGW_IMPORT_LOG"]


def _note(kind, name):
    with open(_LOG, "a", encoding="utf-8") as log:
        log.write(f"{os.getpid()} {kind} {name}\\n")


def _hook(event, args):
    if event == "import" and args and "smtpgw" in str(args[0]):
        _note("import", args[0])
    elif event == "open" and args and isinstance(args[0], (str, bytes)):
        # Reads only: code loaded. (Writing a module's payload, AnsiballZ_smtpgw_*.py, to a
        # target is not loading it; the payload is built from the installed collection.)
        mode = args[1] if len(args) > 1 else None
        flags = args[2] if len(args) > 2 else 0
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
        )
        path = os.fsdecode(args[0])
        if not writes and "smtpgw" in path and path.endswith((".py", ".pyc")):
            _note("open", os.path.realpath(path))


sys.addaudithook(_hook)
"""


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (run `make setup`)")
    return found


def _run(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{out}"
    return out


def _clean_env(tmp: Path) -> dict[str, str]:
    """The environment of a user outside the checkout: an empty ansible.cfg, no ANSIBLE_*,
    no PYTHONPATH, the collections path the tarball was installed into."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ANSIBLE_", "MOLECULE_", "SMTPGW_")) and k != "PYTHONPATH"
    }
    (tmp / "ansible.cfg").write_text("[defaults]\n")
    env.update(
        ANSIBLE_CONFIG=str(tmp / "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=str(tmp / "collections"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    env.setdefault("CONTAINERS_CONF", str(ROOT / ".lab" / "containers.conf"))
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the collection from this checkout and install the tarball, offline."""
    tmp = tmp_path_factory.mktemp("collection")
    env = _clean_env(tmp)
    galaxy = _tool("ansible-galaxy")
    started = time.monotonic()
    _run(
        [galaxy, "collection", "build", "--output-path", str(tmp / "dist"), str(ROOT)],
        env=env,
        cwd=tmp,
        timeout=180,
    )
    tarballs = list((tmp / "dist").glob("smtpgw-gateway-*.tar.gz"))
    assert len(tarballs) == 1, tarballs
    _run(
        [
            *(galaxy, "collection", "install", "--offline", "--no-deps", "--force"),
            *("-p", str(tmp / "collections"), str(tarballs[0])),
        ],
        env=env,
        cwd=tmp,
        timeout=180,
    )
    root = tmp / "collections" / "ansible_collections" / "smtpgw" / "gateway"
    assert root.is_dir()
    return {
        "tmp": tmp,
        "root": root,
        "tarball": tarballs[0],
        "env": env,
        "seconds": time.monotonic() - started,
    }


def test_the_installed_tree_is_whole_and_stands_alone(installed):
    root: Path = installed["root"]
    # Nothing dangling, nothing pointing out of the installed collection.
    for path in root.rglob("*"):
        if path.is_symlink():
            target = path.resolve()
            assert target.exists(), f"{path} -> {os.readlink(path)} dangles"
            assert target.is_relative_to(root.resolve()), f"{path} points out to {target}"
    # The plugins, the role and the Python code the plugins import.
    for name in (
        "meta/runtime.yml",
        "plugins/action/smtpgw_tenants.py",
        "plugins/filter/smtpgw.py",
        "roles/relay/tasks/main.yml",
        "roles/relay/meta/argument_specs.yml",
        "plugins/action/smtpgw_dkim_keys.py",
        "roles/relay/templates/rspamd.lua.j2",
        "playbooks/site.yml",
        "plugins/action/smtpgw_dns.py",
        "playbooks/dns.yml",
    ):
        assert (root / name).is_file(), name
    # module_utils/smtpgw is the whole package, the same code as the checkout's src/smtpgw.
    package = root / "plugins" / "module_utils" / "smtpgw"
    # (*.lua: the sending limits' counter script, which the relay role installs and renders)
    ours = sorted(p.name for g in ("*.py", "*.lua") for p in (ROOT / "src" / "smtpgw").glob(g))
    assert sorted(p.name for g in ("*.py", "*.lua") for p in package.glob(g)) == ours
    for name in ours:
        assert (package / name).read_bytes() == (ROOT / "src" / "smtpgw" / name).read_bytes()
    # The checkout's tooling is not shipped.
    with tarfile.open(installed["tarball"]) as tar:
        names = tar.getnames()
    for unwanted in (".config", "molecule", "tests", "bench", "roles/lab_dns", "inventories"):
        assert not any(n == unwanted or n.startswith(unwanted + "/") for n in names), unwanted
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["collection_info"]["dependencies"] == {}


def _playbook_run(installed: dict, workdir: Path, playbook: str, *args: str, timeout: float):
    """ansible-playbook in `workdir` (outside the checkout), with the import audit hook."""
    assert not workdir.resolve().is_relative_to(ROOT.resolve())
    hook = workdir / "pythonpath"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = workdir / "imports.log"
    log.unlink(missing_ok=True)
    env = dict(installed["env"], PYTHONPATH=str(hook), SMTPGW_IMPORT_LOG=str(log))
    proc = subprocess.run(
        [_tool("ansible-playbook"), *args, playbook],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = log.read_text().splitlines() if log.exists() else []
    entries = [line.split(" ", 2)[1:] for line in lines]
    return proc, entries


def _assert_loaded_through_the_collection(installed: dict, entries: list, modules: set[str]):
    imported = {name for kind, name in entries if kind == "import"}
    opened = {Path(name) for kind, name in entries if kind == "open"}
    assert {f"{MODULE_UTILS}.{m}" for m in modules} <= imported, sorted(imported)
    by_name = sorted(n for n in imported if n == "smtpgw" or n.startswith("smtpgw."))
    assert not by_name, f"the pip package was imported: {by_name}"
    assert opened, "the audit hook saw no smtpgw file opened"
    installed_at = installed["tmp"].resolve()
    outside = sorted(str(p) for p in opened if not p.is_relative_to(installed_at))
    assert not outside, f"files from outside the installed collection: {outside}"
    assert not any(p.is_relative_to(ROOT.resolve()) for p in opened)


ACTION_PLAYBOOK = """\
---
- name: The collection's action and filter, by their full names
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Load good tenant files
      smtpgw.gateway.smtpgw_tenants:
        path: good
        smarthosts: [smart1]
      register: good
    - name: Load a directory with a bad file
      smtpgw.gateway.smtpgw_tenants:
        path: bad
      register: bad
      ignore_errors: true
    - name: Resolve a smart host with a preset the collection carries
      smtpgw.gateway.smtpgw_smarthosts:
        smarthosts:
          - {name: m365, preset: m365, username: relay@example.com, password: a-password-12}
      register: hosts
    - name: Save the results
      ansible.builtin.copy:
        content: "{{ {'good': good, 'bad': bad, 'maps': maps, 'hosts': found} | to_json }}"
        dest: "{{ playbook_dir }}/result.json"
        mode: "0600"
      vars:
        maps: "{{ good.tenants[:1] | smtpgw.gateway.smtpgw_postfix_maps([]) }}"
        found: "{{ hosts.smarthosts }}"
"""


def test_action_and_filter_by_fqcn_outside_the_checkout(installed, tmp_path):
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "acme.yml").write_text(
        "domains: [ACME.test, acme.test.]\n"
        "users:\n"
        "  - login: Scanner@acme.test\n"
        f'    password: "{PASSWORD}"\n'
        "networks: [192.0.2.0/28, 192.0.2.0/28]\n"
    )
    (tmp_path / "good" / "globex.yml").write_text("domains: [globex.test]\nrelay: {via: smart1}\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "typo.yml").write_text("domian: [typo.test]\n")
    (tmp_path / "playbook.yml").write_text(ACTION_PLAYBOOK)

    proc, entries = _playbook_run(
        installed,
        tmp_path,
        "playbook.yml",
        *("-i", "localhost,", "-e", f"ansible_python_interpreter={sys.executable}"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())

    good = result["good"]
    assert [t["name"] for t in good["tenants"]] == ["acme", "globex"]
    acme = good["tenants"][0]
    assert acme["domains"] == ["acme.test"]
    assert acme["networks"] == ["192.0.2.0/28"]
    assert acme["users"][0]["login"] == "scanner@acme.test"
    assert acme["users"][0]["password_hash"].startswith("{SHA512-CRYPT}$6$")
    assert PASSWORD not in json.dumps(good)
    assert any("scanner@acme.test" in line for line in result["maps"]["sender_logins"])

    assert [(h["host"], h["port"], h["tls"]) for h in result["hosts"]] == [
        ("smtp.office365.com", 587, "starttls")
    ]

    bad = result["bad"]
    assert bad.get("failed") is True and "tenants" not in bad
    assert bad["msg"].startswith("bad/typo.yml: ")
    assert "unknown field 'domian'; did you mean 'domains'?" in bad["msg"], bad["msg"]

    _assert_loaded_through_the_collection(installed, entries, MODULES)


# --------------------------------------------------------------------------------------------
# The relay role, by its full name, against one lab container


def _have_lab_image() -> bool:
    try:
        return Lab(LAB_NAME, LAB_SUBNET, ROOT).podman.inspect("image", DEFAULT_IMAGE) is not None
    except LabError:
        return False


@pytest.fixture
def relay_lab():
    """relay1 of the lab smtpgw-coll (inventory in .lab/smtpgw-coll/); removed at the end."""
    lab = Lab(LAB_NAME, LAB_SUBNET, ROOT)
    lab.down()
    try:
        lab.up(["relay1"])
        yield lab.inventory_path()
    finally:
        lab.down()
        assert lab.podman.inspect("network", LAB_NAME) is None


ROLE_PLAYBOOK = """\
---
- name: A gateway from the installed collection's role
  hosts: relays
  gather_facts: true
  roles:
    - role: smtpgw.gateway.relay
      vars:
        relay_tenants_dir: "{{ playbook_dir }}/tenants"
        relay_tls_certificate: "{{ lookup('ansible.builtin.file', playbook_dir ~ '/relay.crt') }}"
        relay_tls_private_key: "{{ lookup('ansible.builtin.file', playbook_dir ~ '/relay.key') }}"
        relay_redis_password: coll-test-redis-password
"""


@pytest.mark.lab
@pytest.mark.skipif(not _have_lab_image(), reason="no lab image: run `make setup`")
def test_relay_role_by_fqcn_against_a_lab_container(installed, relay_lab, tmp_path):
    work = tmp_path / "play"
    (work / "tenants").mkdir(parents=True)
    (work / "tenants" / "acme.yml").write_text(
        f'domains: [acme.test]\nusers:\n  - login: scanner@acme.test\n    password: "{PASSWORD}"\n'
    )
    crt, key = work / "relay.crt", work / "relay.key"
    _run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=relay1.lab.test", "-addext", "subjectAltName=DNS:relay1.lab.test"),
            *("-keyout", str(key), "-out", str(crt)),
        ],
        env=dict(os.environ),
        cwd=work,
        timeout=60,
    )
    (work / "site.yml").write_text(ROLE_PLAYBOOK)

    proc, entries = _playbook_run(installed, work, "site.yml", "-i", str(relay_lab), timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "relay1" in proc.stdout and "failed=0" in proc.stdout
    _assert_loaded_through_the_collection(installed, entries, MODULES)

    # The role ran: Postfix answers on 587, offers STARTTLS and AUTH only under TLS, presents
    # the certificate made here, and takes the tenant's login (hashed by the action).
    deadline = time.monotonic() + 30
    while True:
        try:
            smtp = smtplib.SMTP(RELAY_IP, 587, timeout=20)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    with smtp:
        code, _ = smtp.ehlo("collection-test.example")
        assert code == 250
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        context = ssl.create_default_context(cafile=str(crt))
        context.check_hostname = False  # reached by address; the chain is still verified
        smtp.starttls(context=context)
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(crt.read_text())
        smtp.ehlo("collection-test.example")
        assert smtp.has_extn("auth")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("scanner@acme.test", "not-the-password-at-all")
        smtp.ehlo("collection-test.example")
        assert smtp.login("scanner@acme.test", PASSWORD)[0] == 235
