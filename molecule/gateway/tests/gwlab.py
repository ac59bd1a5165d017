"""The gateway scenario's lab, as the tests see it from the machine: addresses, the lab CA, ways
to act inside a container (send from a host outside every tenant network, read a queue), and
reruns of playbooks/site.yml with other tenant files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from smtpgw.lab import container_ip
from smtpgw.smtpclient import Submission

SCENARIO = Path(__file__).resolve().parents[1]
ROOT = SCENARIO.parents[1]
PREFIX = "smtpgw-gw-"
MAILDIR = "/var/mail/lab/Maildir"


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


@dataclass
class Lab:
    relay_ip: str
    relay_name: str
    ca: str
    relay_cert: str

    def submission(
        self, login: str | None = None, password: str | None = None, port=587, mode="starttls"
    ) -> Submission:
        """How a client reaches the relay: its address, its name and the lab CA verified."""
        return Submission(
            self.relay_ip,
            port,
            mode,
            server_name=self.relay_name,
            cafile=self.ca,
            login=login,
            password=password,
        )

    @staticmethod
    def exec(host: str, *cmd: str, stdin: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            ["podman", "exec", "-i", PREFIX + host, *cmd],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{host}: {' '.join(cmd)} failed: {proc.stderr or proc.stdout}")
        return proc.stdout

    def python_on(self, host: str, script: str) -> str:
        """Run a Python script on a lab host (a client outside the tenants' networks)."""
        return self.exec(host, "python3", "-", stdin=script)

    def find_mail(self, token: str, timeout: float = 60) -> str:
        """The message containing `token` on the lab MX, waiting for it to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.exec(
                "mx1", "grep", "-rlF", "--", token, f"{MAILDIR}/new", f"{MAILDIR}/cur", check=False
            )
            if out.strip():
                return self.exec("mx1", "cat", out.split()[0])
            if time.monotonic() > deadline:
                raise AssertionError(f"no message with {token} reached mx1 in {timeout:.0f} s")
            time.sleep(0.5)

    def mail_count(self, token: str) -> int:
        out = self.exec(
            "mx1", "grep", "-rlF", "--", token, f"{MAILDIR}/new", f"{MAILDIR}/cur", check=False
        )
        return len(out.split())

    def queue(self) -> list[dict]:
        """The relay's Postfix queue (postqueue -j), one dict a message."""
        out = self.exec("relay1", "postqueue", "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def relay_state(self) -> str:
        """Checksums of everything the relay role writes: equal means nothing changed."""
        return self.exec(
            "relay1",
            "sh",
            "-c",
            "find /etc/postfix/main.cf /etc/postfix/master.cf /etc/postfix/smtpgw "
            "/etc/dovecot/dovecot.conf /etc/dovecot/smtpgw-users -type f -print0 "
            "| sort -z | xargs -0 sha256sum",
        )


def lab_from_scenario() -> Lab:
    pki = ROOT / ".lab" / "pki"
    return Lab(
        relay_ip=container_ip(PREFIX + "relay1"),
        relay_name="relay1.lab.test",
        ca=str(pki / "ca.crt"),
        relay_cert=str(pki / "relay1.lab.test.crt"),
    )


RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)


@dataclass
class Run:
    rc: int
    output: str
    changed: dict[str, int]
    failed: dict[str, int]
    changed_tasks: list[str]


def run_site(tenants_dir: Path, *extra: str) -> Run:
    """Run playbooks/site.yml against the scenario's inventory with another tenants directory."""
    env = dict(os.environ)
    env["SMTPGW_TENANTS_DIR"] = str(tenants_dir)
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_DISPLAY_OK_HOSTS"] = "false"
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    playbook = shutil.which("ansible-playbook") or "ansible-playbook"
    proc = subprocess.run(
        [playbook, "-i", str(Path(inventory).parent), str(ROOT / "playbooks" / "site.yml"), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    out = proc.stdout + proc.stderr
    changed = {m[0]: int(m[2]) for m in RECAP.findall(out)}
    failed = {m[0]: int(m[4]) for m in RECAP.findall(out)}
    return Run(proc.returncode, out, changed, failed, _changed_tasks(out))


def _changed_tasks(out: str) -> list[str]:
    """Names of the tasks that reported a change (handlers included)."""
    names, current = [], None
    for line in out.splitlines():
        m = re.match(r"^(?:TASK|RUNNING HANDLER) \[(.+?)\]", line)
        if m:
            current = m.group(1)
        elif line.startswith("changed:") and current and (not names or names[-1] != current):
            names.append(current)
    return names
