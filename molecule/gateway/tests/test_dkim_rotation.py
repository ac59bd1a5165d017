"""A full DKIM key rotation of one domain (soylent.test), end to end against the lab DNS server and
the deployed relay, with a TTL and a grace period of seconds: `smtpgw dkim rotate` makes the new
keys and publishes their records beside the old ones; playbooks/site.yml switches the relay to the
new keys once the records have been seen at every authoritative server for longer than their TTL;
playbooks/dns.yml removes the old records once the grace period after the switch is over. A
message sent at every step arrives with signatures that all verify (dkimpy resolving through
dns1); reruns at each step change nothing. Afterwards the records get their usual TTL back and
the domain stays at its new keys (a finished cycle, as a user leaves it; a rerun rotates again);
a cycle the test did not finish is undone (the domain's key files and state put back, the relay
and the records redeployed), so the tests after this one find a consistent gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dkim
import dns.resolver
import pytest
import yaml
from gwlab import NAME, ROOT, SCENARIO, run_site

from smtpgw import lab as smtpgw_lab
from smtpgw.smtpclient import send

DOMAIN = "soylent.test"
LOGIN = ("app@soylent.test", "lab-soylent-app-pw")
TTL = 8  # seconds: the records' TTL during the test (smtpgw_dns_ttl)
GRACE = 15  # seconds: the rotation's grace period (--grace)
RELAY = f"{NAME}-relay1"  # the relay's name in the scenario's inventory


def key_store() -> Path:
    return Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / "dkim"


def write_inventory(path: Path, lab, ttl: int | None) -> Path:
    """The scenario's hosts under their inventory names, the lab group_vars, the scenario's key
    store; `ttl` overrides smtpgw_dns_ttl."""
    hosts = {
        name: {"lab_ip": lab.hosts.ip(name), "ansible_host": lab.hosts.container(name)}
        for name in ("relay1", "dns1", "mx1", "upstream1")
    }
    hosts["relay1"]["relay_dkim_keys_dir"] = str(key_store())
    hosts["relay1"]["ansible_connection"] = "podman"  # playbooks/dns.yml gathers its facts
    groups = {
        group: {"hosts": {f"{NAME}-{host}": hosts[host]}}
        for group, host in (
            ("relays", "relay1"),
            ("lab_dns", "dns1"),
            ("lab_mx", "mx1"),
            ("lab_upstream", "upstream1"),
        )
    }
    inventory: dict = {"all": {"children": {"lab": {"children": groups}}}}
    if ttl is not None:
        inventory["all"]["hosts"] = {"localhost": {"smtpgw_dns_ttl": ttl}}
    path.mkdir(parents=True)
    (path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (path / "group_vars").symlink_to(ROOT / "inventories" / "lab" / "group_vars")
    return path


def smtpgw(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SMTPGW_TENANTS_DIR=str(SCENARIO / "tenants"))
    return subprocess.run(
        [sys.executable, "-m", "smtpgw.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def rotation_status(inventory: Path) -> dict:
    entries = json.loads(ok(smtpgw("dkim", "status", str(inventory), "--json")))
    return {e["domain"]: e for e in entries}[DOMAIN]


@pytest.fixture(scope="module")
def resolver(lab):
    """Asks the lab DNS server only (authoritative for the lab zones, and the lab's resolver)."""
    found = dns.resolver.Resolver(configure=False)
    found.nameservers = [lab.hosts.ip("dns1")]
    found.lifetime = 5
    found.cache = None
    return found


def dkim_records(resolver, selector: str) -> list[str]:
    try:
        answer = resolver.resolve(f"{selector}._domainkey.{DOMAIN}", "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [b"".join(r.strings).decode() for r in answer]


def published(resolver, selectors: list[str]) -> bool:
    """Each selector's record at dns1 is the public key in the store."""
    return all(
        dkim_records(resolver, s) == [(key_store() / f"{DOMAIN}.{s}.txt").read_text().strip()]
        for s in selectors
    )


def send_verified(lab, resolver, step: str) -> list[str]:
    """Send a message as the domain's login; every signature on arrival verifies through dns1.
    Returns the selectors it was signed with (RSA first)."""
    token = send(lab.submission(*LOGIN), LOGIN[0], "rotation@dest.test", f"rotation {step}")
    raw = lab.find_mail(token).replace("\r\n", "\n").replace("\n", "\r\n").encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    sigs = [
        dkim.util.parse_tag_value(v)
        for n, v in dkim.rfc822_parse(raw)[0]
        if n.lower() == b"dkim-signature"
    ]
    assert sorted(s[b"a"] for s in sigs) == [b"ed25519-sha256", b"rsa-sha256"], step
    checker = dkim.DKIM(raw)
    for index, sig in enumerate(sigs):
        assert sig[b"d"].decode() == DOMAIN
        assert checker.verify(idx=index, dnsfunc=dnsfunc), (
            f"step {step}: the {sig[b'a'].decode()} signature (s={sig[b's'].decode()}) fails"
        )
    by_algorithm = {s[b"a"].decode(): s[b"s"].decode() for s in sigs}
    return [by_algorithm["rsa-sha256"], by_algorithm["ed25519-sha256"]]


def failure(run) -> str:
    """What a failed playbook run said (its failed tasks), not its warnings."""
    lines = run.output.splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith(("fatal:", "failed:"))]
    shown = [line for i in marks[:3] for line in lines[i - 2 : i + 15]]
    return "\n".join(shown) if marks else run.output[-3000:]


def wait_until(moment: float) -> None:
    delay = moment - time.time()
    assert delay < 60, f"a wait of {delay:.0f} s: the TTL or grace is not the test's"
    if delay > 0:
        time.sleep(delay + 0.2)


@pytest.fixture
def put_back(lab, tmp_path):
    """The records' usual TTL after the test; and when the cycle did not finish, the domain's
    key files and state as they were, redeployed to the relay and the DNS."""
    store = key_store()
    saved = tmp_path / "saved"
    saved.mkdir()
    for path in store.glob(f"{DOMAIN}.*"):
        shutil.copy2(path, saved)
    yield
    state = store / f"{DOMAIN}.rotation.json"
    finished = state.is_file() and json.loads(state.read_text())["retired"] is not None
    if not finished:
        for path in store.glob(f"{DOMAIN}.*"):
            path.unlink()
        for path in saved.iterdir():
            shutil.copy2(path, store / path.name)
        site = run_site(SCENARIO / "tenants", "--limit", RELAY)
        assert site.rc == 0, failure(site)
    usual = write_inventory(tmp_path / "usual", lab, ttl=None)
    ok(smtpgw("dns", "apply", str(usual)))


def test_a_full_rotation_cycle_never_sends_a_signature_that_fails(
    lab, resolver, put_back, tmp_path
):
    inventory = write_inventory(tmp_path / "short-ttl", lab, ttl=TTL)
    store = key_store()
    # The records with the test's short TTL, so the waits below are seconds.
    ok(smtpgw("dns", "apply", str(inventory)))
    before = rotation_status(inventory)
    assert before["phase"] in ("none", "done"), before  # none, or a cycle a rerun finished
    old = [before["signing"]["rsa"], before["signing"]["ed25519"]]
    assert send_verified(lab, resolver, "before") == old

    # 1. Start: new keys, their records published beside the old ones and seen at dns1 (the
    #    zone's only authoritative server): the old TTL must pass before the relays switch.
    out = ok(smtpgw("dkim", "rotate", DOMAIN, str(inventory), "--grace", str(GRACE)))
    assert f"{DOMAIN}: rotation " in out and " started" in out
    # Right after it looked: seen, and the TTL (the largest on the old and new records) to pass.
    assert f"{DOMAIN}: propagate; signs with {old[0]}, {old[1]};" in out, out
    state_file = store / f"{DOMAIN}.rotation.json"
    cycle = json.loads(state_file.read_text())
    assert cycle["ttl"] == TTL and cycle["published"] is not None, cycle
    new = [cycle["new"]["rsa"], cycle["new"]["ed25519"]]
    assert new[0].startswith("smtpgw-rsa-r") and new[1].startswith("smtpgw-ed25519-r")
    status = rotation_status(inventory)
    assert status["publish"] == [cycle["old"], cycle["new"]]
    if status["phase"] == "propagate":  # unless the command took longer than the TTL
        assert status["not_before"] == cycle["published"] + TTL
        assert status["signing"] == cycle["old"]
        assert status["not_before_utc"].endswith("Z")
    assert published(resolver, old) and published(resolver, new)
    state = state_file.read_bytes()
    assert send_verified(lab, resolver, "published") == old
    # A rerun of the same step sends no update and records nothing.
    again = ok(smtpgw("dkim", "rotate", DOMAIN, str(inventory)))
    assert "is under way" in again and "no changes, no update sent" in again
    assert state_file.read_bytes() == state

    # 2. The TTL over, site.yml switches the relay and records it; both records stay.
    wait_until(cycle["published"] + TTL)
    status = rotation_status(inventory)
    assert (status["phase"], status["pending_relays"]) == ("switch", [RELAY]), status
    site = run_site(SCENARIO / "tenants", "--limit", RELAY)
    assert site.rc == 0, failure(site)
    cycle = json.loads(state_file.read_text())
    retire_at = cycle["switched"][RELAY] + GRACE
    status = rotation_status(inventory)
    if time.time() < retire_at:  # unless the command took longer than the grace
        assert (status["phase"], status["not_before"]) == ("grace", retire_at), status
    assert published(resolver, old) and published(resolver, new)
    # rspamd reloads its workers: until the new ones take over, mail may still carry the old
    # signature (which verifies: its record is still there). Bounded: a few messages.
    for attempt in range(5):
        selectors = send_verified(lab, resolver, f"switched-{attempt}")
        if selectors == new:
            break
        time.sleep(1)
    assert selectors == new

    # 3. The grace over, dns.yml removes the old records (and the old keys leave the store).
    wait_until(retire_at)
    assert rotation_status(inventory)["phase"] == "retire"
    # The old records are no longer wanted: `dns check` names them as leftovers.
    check = smtpgw("dns", "check", str(inventory), "--json")
    assert check.returncode == 2, check.stdout + check.stderr
    left = [f for f in json.loads(check.stdout) if f["status"] == "leftover"]
    assert sorted(f["name"] for f in left) == sorted(f"{s}._domainkey.{DOMAIN}." for s in old)
    assert all(f["kind"] == "dkim" and f["seen"] for f in left)
    dns_run = smtpgw_lab.run_playbook(
        ROOT / "playbooks" / "dns.yml",
        inventory,  # with dns1's address (the scenario's own inventory has it only as a fact)
        "-e",
        f"smtpgw_dns_ttl={TTL}",
        env={"SMTPGW_TENANTS_DIR": str(SCENARIO / "tenants")},
    )
    assert dns_run.rc == 0, failure(dns_run)
    status = rotation_status(inventory)
    assert status["phase"] == "done", status
    assert [dkim_records(resolver, s) for s in old] == [[], []]
    assert published(resolver, new)
    assert [p for s in old for p in store.glob(f"{DOMAIN}.{s}.*")] == []  # old keys gone
    assert send_verified(lab, resolver, "retired") == new
    ok(smtpgw("dns", "check", str(inventory)))  # no leftover, all ok

    # Every step again changes nothing.
    state = state_file.read_bytes()
    rerun = ok(smtpgw("dkim", "rotate", "--continue", str(inventory)))
    assert "no changes, no update sent" in rerun
    assert state_file.read_bytes() == state
