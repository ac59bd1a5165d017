"""Fixtures shared by every scenario's Testinfra tests (Molecule runs them from the host)."""

from __future__ import annotations

import os

import pytest
import testinfra

from smtpgw.lab import Podman, container_ip, podman_env, project_root


@pytest.fixture(scope="session")
def ips() -> dict[str, str]:
    """Container name -> IP for every host of the scenario's inventory."""
    podman = Podman(podman_env(project_root()))
    names = os.environ.get("MOLECULE_PLATFORMS_NAMES")
    if names is None:
        out = podman.run("ps", "--filter", "label=owner=molecule", "--format", "{{.Names}}").stdout
        names = ",".join(out.split())
    return {name: container_ip(name, podman) for name in names.split(",") if name}


@pytest.fixture(scope="session")
def lab_host():
    """Factory: the Testinfra host of one of the scenario's containers, by container name.

    For tests that act on a given host rather than on each (the `host` fixture runs a test once per
    host of the inventory).
    """

    def get(name: str):
        inventory = os.environ["MOLECULE_INVENTORY_FILE"]
        return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")

    return get
