"""The gateway scenario's lab, as the tests see it from the machine: addresses, the lab CA, ways
to act inside a container (send from a host outside every tenant network, read a queue), and
reruns of playbooks/site.yml with other tenant files."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from smtpgw import lab as smtpgw_lab
from smtpgw.smtpclient import Submission

SCENARIO = Path(__file__).resolve().parents[1]
ROOT = SCENARIO.parents[1]
# The scenario's containers are smtpgw-gw-<host> (molecule.yml): the lab named smtpgw-gw.
NAME = os.environ.get("SMTPGW_MOLECULE_LAB", "smtpgw-gw")
MAILDIR = smtpgw_lab.MAILDIR


@dataclass
class Lab:
    """The gateway scenario's lab as a client sees it, over the hosts of `smtpgw.lab`."""

    hosts: smtpgw_lab.Lab
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

    def exec(self, host: str, *cmd: str, stdin: str | None = None, check: bool = True) -> str:
        try:
            return self.hosts.exec(host, *cmd, stdin=stdin, check=check)
        except smtpgw_lab.LabError as exc:
            raise AssertionError(str(exc)) from None

    def python_on(self, host: str, script: str) -> str:
        """Run a Python script on a lab host (a client outside the tenants' networks)."""
        return self.exec(host, "python3", "-", stdin=script)

    def find_mail(self, token: str, timeout: float = 60) -> str:
        """The message containing `token` on the lab MX, waiting for it to arrive."""
        try:
            return self.hosts.find_mail(token, timeout=timeout)
        except smtpgw_lab.LabError as exc:
            raise AssertionError(str(exc)) from None

    def mail_count(self, token: str) -> int:
        return len(self.hosts.mail_files(token))

    def queue(self) -> list[dict]:
        """The relay's Postfix queue (postqueue -j), one dict a message."""
        out = self.exec("relay1", "postqueue", "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queued_for(self, rcpt: str) -> list[dict]:
        """The relay's queued messages with `rcpt` among their recipients."""
        return [m for m in self.queue() if any(r["address"] == rcpt for r in m["recipients"])]

    def deferred(self, rcpt: str, timeout: float = 60) -> tuple[dict, str]:
        """The queued message for `rcpt` and its delay reason, once it was tried and deferred."""
        deadline = time.monotonic() + timeout
        while True:
            queued = self.queued_for(rcpt)
            reasons = [r.get("delay_reason", "") for m in queued for r in m["recipients"]]
            if queued and any(reasons):
                return queued[0], next(reason for reason in reasons if reason)
            assert time.monotonic() < deadline, f"{rcpt} never got deferred: {self.queue()}"
            time.sleep(1)

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
    hosts = smtpgw_lab.Lab(NAME, root=ROOT)
    pki = ROOT / ".lab" / "pki"
    return Lab(
        hosts=hosts,
        relay_ip=hosts.ip("relay1"),
        relay_name="relay1.lab.test",
        ca=str(pki / "ca.crt"),
        relay_cert=str(pki / "relay1.lab.test.crt"),
    )


def run_playbook_on_scenario(
    playbook: Path, *extra: str, env: dict[str, str] | None = None
) -> smtpgw_lab.PlaybookRun:
    """Run a playbook against the scenario's inventory, with the lab roles on the roles path."""
    inventory = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
    return smtpgw_lab.run_playbook(
        playbook,
        inventory,
        *extra,
        env={"ANSIBLE_ROLES_PATH": str(ROOT / "roles"), **(env or {})},
    )


def run_site(tenants_dir: Path, *extra: str) -> smtpgw_lab.PlaybookRun:
    """Run playbooks/site.yml against the scenario's inventory with another tenants directory."""
    return run_playbook_on_scenario(
        ROOT / "playbooks" / "site.yml",
        *extra,
        env={"SMTPGW_TENANTS_DIR": str(tenants_dir), "ANSIBLE_DISPLAY_OK_HOSTS": "false"},
    )
