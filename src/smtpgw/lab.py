"""The local lab: podman containers booted with systemd, on a network of their own.

`Lab.up` reconciles what runs with the topology below (so it is safe to repeat, and it clears what
a killed run left behind), writes the Ansible inventory of the lab, and waits for systemd to boot.
`Lab.down` removes every container, the network and the inventory. The tests and the benchmarks
reach lab hosts through a `Lab` too, and run playbooks with `run_playbook`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The user's lab. Tests and benchmarks run labs of their own beside it (other names and subnets);
# `Lab.from_env()` reads SMTPGW_LAB_NAME / SMTPGW_LAB_SUBNET / SMTPGW_LAB_IMAGE when it is called.
DEFAULT_NAME = "smtpgw-lab"
DEFAULT_SUBNET = "10.89.60.0/24"
DEFAULT_IMAGE = "localhost/smtpgw-lab:latest"
DOMAIN = "lab.test"
BOOT_TIMEOUT = 90.0
MAILDIR = "/var/mail/lab/Maildir"


@dataclass(frozen=True)
class LabHost:
    """A host of the lab's topology: its name, its address's last octet and its groups."""

    name: str
    octet: int
    groups: tuple[str, ...]
    purpose: str

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
        LabHost("relay2", 12, ("relays",), "a second relay, sharing redis1 with relay1"),
        LabHost("redis1", 16, ("redis",), "Redis: the relays' shared sending-limit counters"),
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
        self, *args: str, check: bool = True, timeout: float = 120.0, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                ["podman", *args],
                input=stdin,
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


@dataclass
class Lab:
    """One lab: containers `<name>-<host>` on the podman network `<name>` (`subnet`).

    The user's lab is `Lab()`; tests and benchmarks make labs of their own beside it, and the
    Molecule scenarios' containers (`smtpgw-gw-relay1`, ...) are reached as `Lab("smtpgw-gw")`
    (their addresses come from podman, not from `subnet`). Everything that runs podman or reads
    a lab host goes through here.
    """

    name: str = DEFAULT_NAME
    subnet: str = DEFAULT_SUBNET
    root: Path | None = None
    image: str = DEFAULT_IMAGE

    def __post_init__(self) -> None:
        self.root = self.root or project_root()
        self.podman = Podman(podman_env(self.root))

    @classmethod
    def from_env(cls, root: Path | None = None) -> Lab:
        """The lab that SMTPGW_LAB_NAME / _SUBNET / _IMAGE name (the user's by default)."""
        return cls(
            os.environ.get("SMTPGW_LAB_NAME", DEFAULT_NAME),
            os.environ.get("SMTPGW_LAB_SUBNET", DEFAULT_SUBNET),
            root,
            os.environ.get("SMTPGW_LAB_IMAGE", DEFAULT_IMAGE),
        )

    @property
    def label(self) -> str:
        return f"smtpgw.lab.{self.name}"

    def container(self, host: str | LabHost) -> str:
        return f"{self.name}-{host if isinstance(host, str) else host.name}"

    def planned_ip(self, host: str | LabHost) -> str:
        """The address `up` gives a host (from the subnet and the host's octet)."""
        octet = (HOSTS[host] if isinstance(host, str) else host).octet
        return str(ipaddress.ip_network(self.subnet)[octet])

    def ip(self, host: str) -> str:
        """The address of a running host, as this machine reaches it (podman's word)."""
        return container_ip(self.container(host), self.podman)

    # -- acting on hosts ---------------------------------------------------------------------

    def exec(
        self,
        host: str,
        *cmd: str,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> str:
        """Run a command in a host; its output. With `check`, a failure raises LabError."""
        interactive = ("-i",) if stdin is not None else ()
        proc = self.podman.run(
            "exec",
            *interactive,
            self.container(host),
            *cmd,
            check=False,
            timeout=timeout,
            stdin=stdin,
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"{self.container(host)}: `{' '.join(cmd)}` failed: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc.stdout

    def mail_files(self, token: str, host: str = "mx1") -> list[str]:
        """The Maildir files on a lab MX that contain `token`."""
        out = self.exec(
            host, "grep", "-rlF", "--", token, f"{MAILDIR}/new", f"{MAILDIR}/cur", check=False
        )
        return out.split()

    def find_mail(self, token: str, host: str = "mx1", timeout: float = 60.0) -> str:
        """The first message on a lab MX that contains `token`, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            files = self.mail_files(token, host)
            if files:
                return self.exec(host, "cat", files[0])
            if time.monotonic() > deadline:
                raise LabError(
                    f"no message with {token} reached {self.container(host)} in {timeout:.0f} s"
                )
            time.sleep(0.5)

    # -- the lab's life ----------------------------------------------------------------------

    def up(self, names: list[str] | None = None) -> list[tuple[LabHost, str]]:
        """Start (or keep) the hosts; replace dead or stale ones; write the inventory."""
        hosts = _select(names)
        image = self.podman.inspect("image", self.image)
        if image is None:
            raise LabError(f"the lab image {self.image} is missing; run `make setup` to build it")
        self._ensure_network()
        for host in hosts:
            if not self._container_is_healthy(host, image["Id"]):
                self._start(host)
        states = self._wait_booted(hosts)
        self.write_inventory(self.running_hosts())
        return [(h, states[h.name]) for h in hosts]

    def recreate(self, host: str) -> None:
        """Replace a host's container by a fresh one from the image (same name and address)."""
        self.podman.run("rm", "-f", "--time", "5", self.container(host))
        self.up([host])

    def down(self) -> list[str]:
        """Remove every container of the lab, its network and its inventory."""
        removed = self._remove_containers()
        if self.podman.inspect("network", self.name) is not None:
            self.podman.run("network", "rm", "-f", self.name)
        self.inventory_path().unlink(missing_ok=True)
        return removed

    def status(self) -> list[dict[str, str]]:
        rows = []
        for host in HOSTS.values():
            name, ip = self.container(host), self.planned_ip(host)
            info = self.podman.inspect("container", name)
            if info is None:
                rows.append({"host": host.name, "ip": ip, "container": "absent", "systemd": "-"})
                continue
            running = info.get("State", {}).get("Running", False)
            systemd = "-"
            if running:
                proc = self.podman.run(
                    "exec", name, "systemctl", "is-system-running", check=False, timeout=20
                )
                systemd = proc.stdout.strip() or "unreachable"
            rows.append(
                {
                    "host": host.name,
                    "ip": ip,
                    "container": "running" if running else info.get("State", {}).get("Status", "?"),
                    "systemd": systemd,
                }
            )
        return rows

    def running_hosts(self) -> list[LabHost]:
        proc = self.podman.run(
            "ps",
            "--filter",
            f"label={self.label}",
            "--format",
            '{{index .Labels "smtpgw.lab.host"}}',
        )
        names = set(proc.stdout.split())
        return [h for h in HOSTS.values() if h.name in names]

    # -- the inventory -----------------------------------------------------------------------

    def inventory(self, hosts: list[LabHost]) -> dict:
        """The Ansible inventory of running lab hosts: reached with the podman connection."""
        groups: dict[str, dict] = {}
        for host in hosts:
            for group in host.groups:
                groups.setdefault(group, {"hosts": {}})["hosts"][host.name] = {
                    "ansible_connection": "containers.podman.podman",
                    "ansible_host": self.container(host),
                    "ansible_python_interpreter": "/usr/bin/python3",
                    "lab_ip": self.planned_ip(host),
                    "lab_fqdn": host.fqdn,
                }
        # This machine on the lab network (podman's gateway, the subnet's first address): where
        # the lab's own examples (acme's "office scanner" network) and the tests send from.
        machine = str(ipaddress.ip_network(self.subnet)[1])
        return {
            "all": {
                "vars": {"lab_machine_ip": machine},
                "children": {"lab": {"children": groups}},
            }
        }

    def inventory_path(self) -> Path:
        assert self.root is not None
        if self.name == DEFAULT_NAME:
            return self.root / "inventories" / "lab" / "hosts.yml"
        return self.root / ".lab" / self.name / "hosts.yml"

    def write_inventory(self, hosts: list[LabHost]) -> Path:
        path = self.inventory_path()
        header = "---\n# Written by `smtpgw lab up`: the lab hosts that run now. Do not edit.\n"
        text = header + yaml.safe_dump(self.inventory(hosts), sort_keys=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        return path

    # -- internals ---------------------------------------------------------------------------

    def _ensure_network(self) -> None:
        info = self.podman.inspect("network", self.name)
        if info is not None:
            subnets = [s.get("subnet") for s in info.get("subnets") or []]
            if self.subnet in subnets:
                return
            # A network of that name with other settings: from an older lab. Replace it.
            self._remove_containers()
            self.podman.run("network", "rm", "-f", self.name)
        self.podman.run(
            "network", "create", "--subnet", self.subnet, "--label", f"{self.label}=1", self.name
        )

    def _container_is_healthy(self, host: LabHost, image_id: str) -> bool:
        info = self.podman.inspect("container", self.container(host))
        if info is None:
            return False
        state = info.get("State", {})
        if not state.get("Running") or info.get("Image") != image_id:
            return False
        nets = info.get("NetworkSettings", {}).get("Networks", {})
        if nets.get(self.name, {}).get("IPAddress") != self.planned_ip(host):
            return False
        # A container whose processes were killed may still be listed as running: ask systemd.
        probe = self.podman.run("exec", self.container(host), "true", check=False, timeout=20)
        return probe.returncode == 0

    def _start(self, host: LabHost) -> None:
        name = self.container(host)
        self.podman.run("rm", "-f", "--time", "5", name, check=False)
        self.podman.run(
            "run",
            "--detach",
            "--name",
            name,
            "--hostname",
            host.fqdn,
            "--network",
            self.name,
            "--ip",
            self.planned_ip(host),
            "--systemd=always",
            # nftables inside the container: the roles' host firewalls, the tests' faults.
            "--cap-add=NET_ADMIN",
            "--label",
            f"{self.label}=1",
            "--label",
            f"smtpgw.lab.host={host.name}",
            *(f"--add-host={h.fqdn}:{self.planned_ip(h)}" for h in HOSTS.values() if h is not host),
            self.image,
            "/sbin/init",
        )

    def _wait_booted(self, hosts: list[LabHost]) -> dict[str, str]:
        states: dict[str, str] = {}
        deadline = time.monotonic() + BOOT_TIMEOUT
        pending = list(hosts)
        while pending:
            for host in list(pending):
                proc = self.podman.run(
                    "exec",
                    self.container(host),
                    "systemctl",
                    "is-system-running",
                    check=False,
                    timeout=20,
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

    def _remove_containers(self) -> list[str]:
        proc = self.podman.run(
            "ps", "-a", "--filter", f"label={self.label}", "--format", "{{.Names}}"
        )
        names = proc.stdout.split()
        if names:
            self.podman.run("rm", "-f", "--time", "5", *names)
        return names


def container_ip(name: str, podman: Podman | None = None) -> str:
    """The address of a container on its (first) podman network, as this machine reaches it."""
    podman = podman or Podman(podman_env(project_root()))
    info = podman.inspect("container", name)
    if info is None:
        raise LabError(f"no container named {name}")
    networks = info["NetworkSettings"]["Networks"]
    return next(iter(networks.values()))["IPAddress"]


# --------------------------------------------------------------------------------------------
# Playbook runs: the one runner of the tests, the benchmarks and the lab's own commands.

_RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)
# ansible.posix.profile_tasks summary: "role : task name ------------- 12.34s"
_PROFILE = re.compile(r"^(.+?) -{3,} (\d+\.\d+)s$", re.M)
_TASK = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(.+?)\]")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class PlaybookRun:
    """What one ansible-playbook run did, read from its output."""

    playbook: str
    rc: int
    seconds: float
    output: str
    command: list[str] = field(default_factory=list)
    changed: dict[str, int] = field(default_factory=dict)  # host -> changed count
    failed: dict[str, int] = field(default_factory=dict)
    changed_tasks: list[str] = field(default_factory=list)  # handlers too, in order
    tasks: list[tuple[str, float]] = field(default_factory=list)  # profile_tasks, slowest first

    @property
    def total_changed(self) -> int:
        return sum(self.changed.values())


def parse_run(playbook: str, rc: int, seconds: float, output: str) -> PlaybookRun:
    """Read a run's output: the recap's counts, the changed tasks, profile_tasks' times."""
    out = _ANSI.sub("", output)
    recap = _RECAP.findall(out)
    run = PlaybookRun(playbook, rc, seconds, out)
    run.changed = {m[0]: int(m[2]) for m in recap}
    run.failed = {m[0]: int(m[4]) for m in recap}
    current = None
    for line in out.splitlines():
        task = _TASK.match(line)
        if task:
            current = task.group(1)
        elif line.startswith("changed:") and current and run.changed_tasks[-1:] != [current]:
            run.changed_tasks.append(current)
    tail = out.rsplit("=" * 20, 1)[-1] if "=" * 20 in out else ""
    run.tasks = [(m[0].strip(), float(m[1])) for m in _PROFILE.findall(tail)]
    return run


def run_playbook(
    playbook: str | Path,
    inventory: str | Path,
    *extra: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 900.0,
    profile: bool = False,
    cwd: Path | None = None,
) -> PlaybookRun:
    """Run ansible-playbook (the one beside this Python, else on PATH), uncoloured; never raises
    for a failed run (look at `rc`), only for one that outlives `timeout`."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.update(ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1")
    if profile:  # per-task times, for where the time goes (negligible overhead)
        full_env.update(
            ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks",
            PROFILE_TASKS_TASK_OUTPUT_LIMIT="100",
        )
    beside = Path(sys.executable).with_name("ansible-playbook")
    command = [
        str(beside) if beside.is_file() else "ansible-playbook",
        "-i",
        str(inventory),
        str(playbook),
        *extra,
    ]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            check=False,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{playbook} ran longer than {timeout:.0f} s; stopped it") from exc
    seconds = time.monotonic() - start
    run = parse_run(str(playbook), proc.returncode, seconds, proc.stdout + proc.stderr)
    run.command = command
    return run
