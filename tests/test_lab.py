"""`smtpgw lab` against real podman: up is safe to repeat and repairs what a killed run left
behind; down leaves no container, network or mount. Runs a lab of its own (smtpgw-labtest)
beside the user's, with one host to keep it quick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smtpgw.lab import LabError, Podman

ROOT = Path(__file__).resolve().parents[1]
NAME = "smtpgw-labtest"
SUBNET = "10.89.70.0/24"
CONTAINER = f"{NAME}-mx1"
IP = "10.89.70.25"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / ".lab" / "containers.conf"))
    env.update(SMTPGW_LAB_NAME=NAME, SMTPGW_LAB_SUBNET=SUBNET, SMTPGW_ROOT=str(ROOT), **extra)
    return env


def podman(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """podman as the harness runs it (the checks here look at what the CLI did, from outside)."""
    return Podman(_env()).run(*args, check=check)


def smtpgw(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smtpgw.cli", "lab", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=300,
        check=False,
    )


def _have_lab_image() -> bool:
    try:
        return podman("image", "exists", "localhost/smtpgw-lab:latest").returncode == 0
    except LabError:  # no podman
        return False


pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(not _have_lab_image(), reason="no lab image: run `make setup`"),
]


def inspect(name: str) -> dict | None:
    proc = podman("container", "inspect", name)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


@pytest.fixture
def clean_lab():
    smtpgw("down")
    yield
    down = smtpgw("down")
    assert down.returncode == 0, down.stderr


def test_up_twice_then_down_leaves_nothing(clean_lab):
    first = smtpgw("up", "mx1")
    assert first.returncode == 0, first.stderr
    info = inspect(CONTAINER)
    assert info["State"]["Running"]
    assert info["NetworkSettings"]["Networks"][NAME]["IPAddress"] == IP

    inventory = ROOT / ".lab" / NAME / "hosts.yml"
    assert "ansible_host: smtpgw-labtest-mx1" in inventory.read_text()
    ping = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "all", "-i", str(inventory), "-m", "ping"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr

    started = time.monotonic()
    again = smtpgw("up", "mx1")
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - started < 30
    assert inspect(CONTAINER)["Id"] == info["Id"], "a healthy host must be kept, not replaced"

    status = smtpgw("status")
    assert status.returncode == 0
    assert any(
        line.split()[:4] == ["mx1", IP, "running", "running"] for line in status.stdout.splitlines()
    )

    down = smtpgw("down")
    assert down.returncode == 0, down.stderr
    assert inspect(CONTAINER) is None
    assert podman("network", "exists", NAME).returncode != 0
    assert (
        info["Id"]
        not in subprocess.run(
            ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert not inventory.exists()


def test_up_replaces_a_container_whose_processes_were_killed(clean_lab):
    assert smtpgw("up", "mx1").returncode == 0
    old = inspect(CONTAINER)
    os.kill(old["State"]["Pid"], signal.SIGKILL)  # systemd, PID 1 of the container
    for _ in range(50):
        if not inspect(CONTAINER)["State"]["Running"]:
            break
        time.sleep(0.2)
    up = smtpgw("up", "mx1")
    assert up.returncode == 0, up.stderr
    new = inspect(CONTAINER)
    assert new["State"]["Running"] and new["Id"] != old["Id"]
    assert "running" in smtpgw("status").stdout


def test_up_replaces_a_stale_network(clean_lab):
    podman("network", "create", "--subnet", "10.89.71.0/24", NAME, check=True)
    up = smtpgw("up", "mx1")
    assert up.returncode == 0, up.stderr
    assert inspect(CONTAINER)["NetworkSettings"]["Networks"][NAME]["IPAddress"] == IP


def test_missing_image_is_one_clear_message(clean_lab):
    up = smtpgw("up", "mx1", SMTPGW_LAB_IMAGE="localhost/smtpgw-no-such-image:latest")
    assert up.returncode == 1
    assert up.stderr.strip() == (
        "smtpgw: the lab image localhost/smtpgw-no-such-image:latest is missing; "
        "run `make setup` to build it"
    )


def test_unknown_host_is_refused():
    up = smtpgw("up", "mx9")
    assert up.returncode == 1
    assert (
        "unknown lab host(s): mx9; the lab has: relay1, dns1, mx1, upstream1, relay2, redis1"
        in up.stderr
    )
