"""Fixtures shared by every scenario's Testinfra tests (Molecule runs them from the host)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest


def container_ip(name: str) -> str:
    """The address of a scenario's container on its podman network, as the host reaches it."""
    out = subprocess.run(
        ["podman", "inspect", name], capture_output=True, text=True, check=True
    ).stdout
    networks = json.loads(out)[0]["NetworkSettings"]["Networks"]
    return next(iter(networks.values()))["IPAddress"]


@pytest.fixture(scope="session")
def ips() -> dict[str, str]:
    """Container name -> IP for every host of the scenario's inventory."""
    names = os.environ.get("MOLECULE_PLATFORMS_NAMES")
    if names is None:
        out = subprocess.run(
            ["podman", "ps", "--filter", "label=owner=molecule", "--format", "{{.Names}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = ",".join(out.split())
    return {name: container_ip(name) for name in names.split(",") if name}
