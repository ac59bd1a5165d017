"""Set-up copes with what a killed image build left behind: its work folder, with a file
system still mounted in the chroot, is unmounted and removed, and nothing outside it is touched."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("podman") or not shutil.which("debootstrap"),
    reason="needs root, podman and debootstrap (run `make setup` as root)",
)


def _image_built() -> bool:
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / ".lab" / "containers.conf")}
    proc = subprocess.run(
        ["podman", "image", "exists", "localhost/smtpgw-lab:latest"], env=env, check=False
    )
    return proc.returncode == 0


@pytest.mark.skipif(not _image_built(), reason="no lab image: run `make setup`")
def test_build_removes_a_killed_builds_leftovers(tmp_path):
    stale = Path("/var/tmp/smtpgw-image.killedrun")
    proc_dir = stale / "rootfs" / "proc"
    keep = tmp_path / "outside"
    keep.write_text("not the build's")
    proc_dir.mkdir(parents=True, exist_ok=True)
    (stale / "rootfs" / "etc").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(proc_dir)], check=True)
    try:
        env = {**os.environ, "CONTAINERS_CONF": str(ROOT / ".lab" / "containers.conf")}
        out = subprocess.run(
            [str(ROOT / "lab" / "image" / "build.sh")],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert not stale.exists()
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True)
        assert str(stale) not in mounts.stdout
        assert keep.read_text() == "not the build's"
        assert Path("/proc/self").exists()  # the host's own /proc is untouched
    finally:
        subprocess.run(["umount", "-l", str(proc_dir)], check=False, capture_output=True)
        shutil.rmtree(stale, ignore_errors=True)
