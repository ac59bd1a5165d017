"""What the benchmarks share: a lab of their own beside the user's, its inventory, timed runs.

Every benchmark runs in the lab `smtpgw-bench` (10.89.80.0/24), never in the user's `smtpgw-lab`
or a Molecule scenario's. Its inventory lives in `.lab/smtpgw-bench/`: the `hosts.yml` that
`smtpgw lab up` writes there, the lab inventory's `group_vars` (linked), a tenants directory of
the benchmark's own and its own lab CA (`pki/`), so nothing of the user's lab is read or written.
`BenchLab.down()` removes the containers, the network and that directory.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Another name and subnet for a second checkout's bench beside a running one (each lab its lock).
LAB_NAME = os.environ.get("SMTPGW_BENCH_LAB_NAME", "smtpgw-bench")
LAB_SUBNET = os.environ.get("SMTPGW_BENCH_LAB_SUBNET", "10.89.80.0/24")

os.environ["SMTPGW_ROOT"] = str(ROOT)
os.environ["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
os.environ.setdefault("CONTAINERS_CONF", str(ROOT / ".lab" / "containers.conf"))
# The tools beside this interpreter (the project's venv) come first, as `scripts/env.sh` does.
for _bin in (ROOT / ".venv" / "bin", Path(sys.executable).parent):
    if _bin.is_dir() and str(_bin) not in os.environ["PATH"].split(os.pathsep):
        os.environ["PATH"] = f"{_bin}{os.pathsep}{os.environ['PATH']}"
# The checkout's own Python package, here and in the Python tools run from here, before any
# installed one. (Ansible's plugins import the collection's copy, which is this same src/smtpgw.)
if (ROOT / "src" / "smtpgw").is_dir():
    sys.path.insert(0, str(ROOT / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p
    )

from smtpgw import lab  # noqa: E402

# The bench lab, beside the user's (never the user's: another name, another subnet).
LAB = lab.Lab(LAB_NAME, LAB_SUBNET, ROOT)

INVENTORY = ROOT / ".lab" / LAB_NAME
# The controller's password-hash cache of the bench's own, removed with the bench lab: a first run
# hashes every password, as it does for a user's new inventory.
os.environ["SMTPGW_PASSWORD_CACHE"] = str(INVENTORY / "password-cache")
# Every playbook run's output is kept here (the lab goes, the logs stay): one directory a run.
LOGS = ROOT / ".lab" / "bench-logs" / f"{Path(sys.argv[0]).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
TENANTS = INVENTORY / "tenants"
PKI = INVENTORY / "pki"
CA = PKI / "ca.crt"
# One bench lab on the machine at a time, whichever checkout runs it.
LOCK = Path("/var/tmp") / f"{LAB_NAME}.lock"
RELAY_NAME = "relay1.lab.test"


class BenchError(Exception):
    """The benchmark could not run; the message says what failed and where to look."""


def rerun_command(script: str, argv: Sequence[str]) -> str:
    """The command that runs this benchmark again, as a person types it."""
    args = "".join(f" {shlex.quote(a)}" for a in argv)
    return f"cd {ROOT} && source scripts/env.sh && python bench/{script}{args}"


def source_version() -> str:
    """The commit benchmarked, and whether the working tree differs from it (bench/ aside)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", ".", ":!bench"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{ROOT} (not a git checkout)"
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def log(text: str) -> None:
    print(f"   {text}", flush=True)


# --------------------------------------------------------------------------------------------
# Playbook runs


Run = lab.PlaybookRun
_runs = 0


def run_playbook(playbook: str | Path, *extra: str, label: str = "", timeout: float = 900.0) -> Run:
    """Run a playbook against the bench inventory (smtpgw.lab.run_playbook, timed per task).

    `playbook` is a name in playbooks/ (`site.yml`) or a path. The inventory is the hosts.yml
    file, not its directory: Ansible would try every file in a directory (the tenant files, the
    CA) as an inventory source. The output goes to LOGS/NN-LABEL.log; a failed run raises.
    """
    global _runs
    _runs += 1
    LOGS.mkdir(parents=True, exist_ok=True)
    logfile = LOGS / f"{_runs:02d}-{label or Path(playbook).stem}.log"
    path = ROOT / "playbooks" / playbook if isinstance(playbook, str) else playbook
    try:
        run = lab.run_playbook(
            path,
            INVENTORY / "hosts.yml",
            "-e",
            f"lab_pki_dir={PKI}",
            *extra,
            env={"SMTPGW_TENANTS_DIR": str(TENANTS)},
            timeout=timeout,
            profile=True,
            cwd=ROOT,
        )
    except lab.LabError as exc:
        raise BenchError(str(exc)) from exc
    logfile.write_text(
        f"# {shlex.join(run.command)}\n# {run.seconds:.1f} s, rc {run.rc}\n{run.output}"
    )
    if run.rc != 0:
        last = "\n".join(run.output.rstrip().splitlines()[-40:])
        raise BenchError(
            f"{playbook} failed (rc {run.rc}); whole output in {logfile}; its last lines:\n{last}"
        )
    return run


# --------------------------------------------------------------------------------------------
# The lab


def podman(*args: str, check: bool = True, timeout: float = 120.0) -> str:
    proc = LAB.podman.run(*args, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise BenchError(f"`podman {' '.join(args)}` failed: {detail}")
    return proc.stdout


def on(host: str, *cmd: str, check: bool = True, timeout: float = 120.0) -> str:
    """Run a command in one of the bench lab's containers."""
    try:
        return LAB.exec(host, *cmd, check=check, timeout=timeout)
    except lab.LabError as exc:
        raise BenchError(str(exc)) from exc


@dataclass(frozen=True)
class BenchHost:
    name: str
    container: str
    ip: str
    fqdn: str


def host(name: str) -> BenchHost:
    """A bench lab host: its container, address and name."""
    return BenchHost(name, LAB.container(name), LAB.planned_ip(name), lab.HOSTS[name].fqdn)


class BenchLab:
    """The bench lab: `with BenchLab(["dns1", "relay1"]) as bl:` starts it and always removes it."""

    def __init__(self, hosts: Sequence[str], keep: bool = False) -> None:
        self.hosts = list(hosts)
        self.keep = keep
        self._lock: int | None = None

    def __enter__(self) -> BenchLab:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock)
            self._lock = None
            raise BenchError(
                f"another benchmark holds {LOCK} (one bench lab at a time); wait for it to end"
            ) from exc
        # SIGTERM (a killed make, a CI timeout) ends the run through the same clean-up.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            self.up(self.hosts)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.keep:
                section(f"Bench lab kept (--keep); remove it with: {self.down_command()}")
            else:
                self.down()
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None

    @staticmethod
    def down_command() -> str:
        return (
            f"cd {ROOT} && source scripts/env.sh && SMTPGW_LAB_NAME={LAB_NAME} "
            f"SMTPGW_LAB_SUBNET={LAB_SUBNET} smtpgw lab down && rm -rf .lab/{LAB_NAME}"
        )

    @staticmethod
    def up(hosts: Sequence[str]) -> None:
        """Start (or keep) the hosts; lay out the inventory around the hosts.yml lab up writes."""
        try:
            LAB.up(list(hosts))
        except lab.LabError as exc:
            raise BenchError(f"bench lab: {exc}") from exc
        gv = INVENTORY / "group_vars"
        if not gv.is_symlink():
            gv.symlink_to(ROOT / "inventories" / "lab" / "group_vars")
        TENANTS.mkdir(exist_ok=True)

    @staticmethod
    def recreate(host: str) -> None:
        """Replace a host's container by a fresh one from the image (same name and address)."""
        podman("rm", "-f", "--time", "5", LAB.container(host))
        BenchLab.up([host])

    @staticmethod
    def down() -> None:
        section(f"Removing the bench lab ({LAB_NAME})")
        try:
            removed = LAB.down()
        except lab.LabError as exc:
            print(f"smtpgw bench: removing the lab failed: {exc}", file=sys.stderr)
            print(f"remove it by hand: {BenchLab.down_command()}", file=sys.stderr)
            raise
        shutil.rmtree(INVENTORY, ignore_errors=True)
        log(f"removed {len(removed)} container(s), the {LAB_NAME} network and .lab/{LAB_NAME}/")


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------------
# Tenants


def write_tenants(tenants: Mapping[str, str]) -> None:
    """Replace the bench tenant files by these: {name: YAML text}, written as NAME.yml."""
    TENANTS.mkdir(parents=True, exist_ok=True)
    for old in TENANTS.glob("*.yml"):
        old.unlink()
    for name, text in tenants.items():
        (TENANTS / f"{name}.yml").write_text(text)


def generated_tenants(count: int) -> dict[str, str]:
    return dict(generated_tenant(i) for i in range(count))


def generated_tenant(i: int) -> tuple[str, str]:
    """Tenant number i: a domain, one login with a literal password, one /32 network.

    The networks are single addresses in 198.18.0.0/15 (RFC 2544, for benchmarks): distinct,
    and no real client.
    """
    name = f"t{i:04d}"
    return name, (
        f"name: {name}\n"
        f"domains: [{name}.bench.test]\n"
        "users:\n"
        f"  - login: app@{name}.bench.test\n"
        f'    password: "bench-{name}-password"\n'
        f"networks: [198.18.{i // 256}.{i % 256}/32]\n"
    )


def fail(message: str) -> int:
    print(f"\nsmtpgw bench: FAILED: {message}", file=sys.stderr, flush=True)
    return 1
