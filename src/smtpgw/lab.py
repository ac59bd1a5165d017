"""The local lab: podman containers booted with systemd, on a network of their own.

`up` reconciles what runs with the topology below (so it is safe to repeat, and it clears what a
killed run left behind), writes the Ansible inventory of the lab, and waits for systemd to boot.
`down` removes every container, the network and the inventory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

# The lab's name (network, container prefix, label) and subnet; tests run a lab of their own
# beside the user's by setting these.
NETWORK = os.environ.get("SMTPGW_LAB_NAME", "smtpgw-lab")
SUBNET = os.environ.get("SMTPGW_LAB_SUBNET", "10.89.60.0/24")
DOMAIN = "lab.test"
IMAGE = os.environ.get("SMTPGW_LAB_IMAGE", "localhost/smtpgw-lab:latest")
LABEL = f"smtpgw.lab.{NETWORK}"
BOOT_TIMEOUT = 90.0


@dataclass(frozen=True)
class LabHost:
    name: str
    octet: int
    groups: tuple[str, ...]
    purpose: str

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_network(SUBNET)[self.octet])

    @property
    def container(self) -> str:
        return f"{NETWORK}-{self.name}"

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"


HOSTS: dict[str, LabHost] = {
    h.name: h
    for h in (
        LabHost("relay1", 11, ("relays",), "the SMTP gateway under test"),
        LabHost("dns1", 53, ("lab_dns",), "authoritative DNS for the lab zones"),
        LabHost("mx1", 25, ("lab_mx",), "receives relayed mail and keeps it"),
        LabHost("upstream1", 26, ("lab_upstream",), "smart host: STARTTLS + AUTH"),
    )
}


class LabError(Exception):
    """A lab operation failed; the message says what and what to do."""


def project_root() -> Path:
    """The checkout this module runs from, or the current directory's project."""
    env = os.environ.get("SMTPGW_ROOT")
    if env:
        return Path(env)
    for start in (Path.cwd(), Path(__file__).resolve()):
        for candidate in (start, *start.parents):
            if (candidate / "galaxy.yml").is_file() and (candidate / "roles").is_dir():
                return candidate
    raise LabError("cannot find the smtpgw checkout; run from inside it or set SMTPGW_ROOT")


def podman_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    conf = root / ".lab" / "containers.conf"
    if "CONTAINERS_CONF" not in env and conf.is_file():
        env["CONTAINERS_CONF"] = str(conf)
    return env


class Podman:
    """A thin runner for the podman command, with time limits and readable failures."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                ["podman", *args],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise LabError("podman is not installed; run `make setup` first") from exc
        except subprocess.TimeoutExpired as exc:
            raise LabError(
                f"`podman {' '.join(args)}` hung for {timeout:.0f} s; a killed run may have left "
                "a podman lock behind: run `podman system renumber`, then try again"
            ) from exc
        if check and proc.returncode != 0:
            raise LabError(f"`podman {' '.join(args)}` failed: {proc.stderr.strip()}")
        return proc

    def inspect(self, kind: str, name: str) -> dict | None:
        proc = self.run(kind, "inspect", name, check=False)
        if proc.returncode != 0:
            return None
        data = json.loads(proc.stdout or "[]")
        return data[0] if data else None


def _select(names: list[str] | None) -> list[LabHost]:
    if not names:
        return list(HOSTS.values())
    unknown = [n for n in names if n not in HOSTS]
    if unknown:
        raise LabError(
            f"unknown lab host(s): {', '.join(unknown)}; the lab has: {', '.join(HOSTS)}"
        )
    return [HOSTS[n] for n in names]


def _ensure_network(pm: Podman) -> None:
    info = pm.inspect("network", NETWORK)
    if info is not None:
        subnets = [s.get("subnet") for s in info.get("subnets") or []]
        if SUBNET in subnets:
            return
        # A network of that name with other settings: from an older lab. Replace it.
        _remove_containers(pm)
        pm.run("network", "rm", "-f", NETWORK)
    pm.run("network", "create", "--subnet", SUBNET, "--label", f"{LABEL}=1", NETWORK)


def _container_is_healthy(pm: Podman, host: LabHost, image_id: str) -> bool:
    info = pm.inspect("container", host.container)
    if info is None:
        return False
    state = info.get("State", {})
    if not state.get("Running") or info.get("Image") != image_id:
        return False
    nets = info.get("NetworkSettings", {}).get("Networks", {})
    if nets.get(NETWORK, {}).get("IPAddress") != host.ip:
        return False
    # A container whose processes were killed may still be listed as running: ask systemd.
    probe = pm.run("exec", host.container, "true", check=False, timeout=20)
    return probe.returncode == 0


def _start(pm: Podman, host: LabHost) -> None:
    pm.run("rm", "-f", "--time", "5", host.container, check=False)
    pm.run(
        "run",
        "--detach",
        "--name",
        host.container,
        "--hostname",
        host.fqdn,
        "--network",
        NETWORK,
        "--ip",
        host.ip,
        "--systemd=always",
        "--label",
        f"{LABEL}=1",
        "--label",
        f"smtpgw.lab.host={host.name}",
        *(f"--add-host={h.fqdn}:{h.ip}" for h in HOSTS.values() if h is not host),
        IMAGE,
        "/sbin/init",
    )


def _wait_booted(pm: Podman, hosts: list[LabHost]) -> dict[str, str]:
    states: dict[str, str] = {}
    deadline = time.monotonic() + BOOT_TIMEOUT
    pending = list(hosts)
    while pending:
        for host in list(pending):
            proc = pm.run(
                "exec", host.container, "systemctl", "is-system-running", check=False, timeout=20
            )
            state = proc.stdout.strip() or "unknown"
            states[host.name] = state
            if state in ("running", "degraded"):
                pending.remove(host)
        if pending and time.monotonic() > deadline:
            detail = ", ".join(f"{h.name}: {states[h.name]}" for h in pending)
            raise LabError(
                f"lab host(s) did not finish booting in {BOOT_TIMEOUT:.0f} s ({detail}); "
                "see `podman logs <container>` and `podman exec <container> systemctl --failed`"
            )
        if pending:
            time.sleep(0.5)
    return states


def _remove_containers(pm: Podman) -> list[str]:
    proc = pm.run("ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}}")
    names = proc.stdout.split()
    if names:
        pm.run("rm", "-f", "--time", "5", *names)
    return names


def inventory(hosts: list[LabHost]) -> dict:
    """The Ansible inventory of running lab hosts: reached with the podman connection."""
    groups: dict[str, dict] = {}
    for host in hosts:
        for group in host.groups:
            groups.setdefault(group, {"hosts": {}})["hosts"][host.name] = {
                "ansible_connection": "containers.podman.podman",
                "ansible_host": host.container,
                "ansible_python_interpreter": "/usr/bin/python3",
                "lab_ip": host.ip,
                "lab_fqdn": host.fqdn,
            }
    return {"all": {"children": {"lab": {"children": groups}}}}


def inventory_path(root: Path) -> Path:
    if NETWORK == "smtpgw-lab":
        return root / "inventories" / "lab" / "hosts.yml"
    return root / ".lab" / NETWORK / "hosts.yml"


def write_inventory(root: Path, hosts: list[LabHost]) -> Path:
    path = inventory_path(root)
    header = "---\n# Written by `smtpgw lab up`: the lab hosts that run now. Do not edit.\n"
    text = header + yaml.safe_dump(inventory(hosts), sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def running_hosts(pm: Podman) -> list[LabHost]:
    proc = pm.run(
        "ps", "--filter", f"label={LABEL}", "--format", '{{index .Labels "smtpgw.lab.host"}}'
    )
    names = set(proc.stdout.split())
    return [h for h in HOSTS.values() if h.name in names]


def up(names: list[str] | None = None, root: Path | None = None) -> list[tuple[LabHost, str]]:
    root = root or project_root()
    pm = Podman(podman_env(root))
    hosts = _select(names)
    image = pm.inspect("image", IMAGE)
    if image is None:
        raise LabError(f"the lab image {IMAGE} is missing; run `make setup` to build it")
    _ensure_network(pm)
    for host in hosts:
        if not _container_is_healthy(pm, host, image["Id"]):
            _start(pm, host)
    states = _wait_booted(pm, hosts)
    write_inventory(root, running_hosts(pm))
    return [(h, states[h.name]) for h in hosts]


def down(root: Path | None = None) -> list[str]:
    root = root or project_root()
    pm = Podman(podman_env(root))
    removed = _remove_containers(pm)
    if pm.inspect("network", NETWORK) is not None:
        pm.run("network", "rm", "-f", NETWORK)
    inventory_path(root).unlink(missing_ok=True)
    return removed


def status(root: Path | None = None) -> list[dict[str, str]]:
    root = root or project_root()
    pm = Podman(podman_env(root))
    rows = []
    for host in HOSTS.values():
        info = pm.inspect("container", host.container)
        if info is None:
            rows.append({"host": host.name, "ip": host.ip, "container": "absent", "systemd": "-"})
            continue
        running = info.get("State", {}).get("Running", False)
        systemd = "-"
        if running:
            proc = pm.run(
                "exec", host.container, "systemctl", "is-system-running", check=False, timeout=20
            )
            systemd = proc.stdout.strip() or "unreachable"
        rows.append(
            {
                "host": host.name,
                "ip": host.ip,
                "container": "running" if running else info.get("State", {}).get("Status", "?"),
                "systemd": systemd,
            }
        )
    return rows


MAILDIR = "/var/mail/lab/Maildir"


def find_mail(
    token: str, host: str = "mx1", timeout: float = 60.0, container: str | None = None
) -> str:
    """The first message on a lab MX that contains `token`, waiting up to `timeout` seconds."""
    root = project_root()
    pm = Podman(podman_env(root))
    name = container or HOSTS[host].container
    deadline = time.monotonic() + timeout
    while True:
        proc = pm.run(
            "exec",
            name,
            "grep",
            "-rlF",
            "--",
            token,
            f"{MAILDIR}/new",
            f"{MAILDIR}/cur",
            check=False,
            timeout=30,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            path = proc.stdout.split()[0]
            return pm.run("exec", name, "cat", path).stdout
        if time.monotonic() > deadline:
            raise LabError(f"no message with {token} reached {name} in {timeout:.0f} s")
        time.sleep(0.5)


def container_ip(name: str) -> str:
    """The address of a container on its (first) podman network, as this machine reaches it."""
    pm = Podman(podman_env(project_root()))
    info = pm.inspect("container", name)
    if info is None:
        raise LabError(f"no container named {name}")
    networks = info["NetworkSettings"]["Networks"]
    return next(iter(networks.values()))["IPAddress"]
