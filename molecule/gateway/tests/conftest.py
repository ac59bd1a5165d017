"""Fixtures of the gateway scenario's tests (helpers in gwlab.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gwlab import SCENARIO, Lab, lab_from_scenario


@pytest.fixture(scope="session")
def lab() -> Lab:
    return lab_from_scenario()


@pytest.fixture
def tenants_copy(tmp_path: Path) -> Path:
    """A copy of the scenario's tenant files, for a test to add to, change or remove."""
    dest = tmp_path / "tenants"
    shutil.copytree(SCENARIO / "tenants", dest)
    return dest
