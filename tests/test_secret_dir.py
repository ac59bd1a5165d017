"""smtpgw.secret_dir: a directory made to hold exactly a set of secret files (a real filesystem)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from smtpgw.secret_dir import SyncError, sync_dir

UID, GID = os.getuid(), os.getgid()
FILES = {"a.test.rsa.key": b"rsa-a\n", "a.test.ed.key": b"ed-a\n", "b.test.rsa.key": b"rsa-b\n"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_sync_writes_everything_with_modes(tmp_path: Path):
    d = tmp_path / "keys"
    result = sync_dir(str(d), FILES, UID, GID)
    assert result.changed and result.dir_fixed
    assert sorted(result.written) == sorted(FILES)
    assert mode(d) == 0o700
    for name, content in FILES.items():
        assert (d / name).read_bytes() == content
        assert mode(d / name) == 0o600
    assert sorted(os.listdir(d)) == sorted(FILES), "no temporary file left behind"


def test_second_sync_changes_nothing(tmp_path: Path):
    d = tmp_path / "keys"
    sync_dir(str(d), FILES, UID, GID)
    before = {n: (d / n).stat().st_mtime_ns for n in FILES}
    result = sync_dir(str(d), FILES, UID, GID)
    assert not result.changed, result
    assert {n: (d / n).stat().st_mtime_ns for n in FILES} == before


def test_puts_back_modes_removes_strays_and_rewrites_changed(tmp_path: Path):
    d = tmp_path / "keys"
    sync_dir(str(d), FILES, UID, GID)
    (d / "a.test.rsa.key").chmod(0o644)
    d.chmod(0o755)
    (d / "b.test.rsa.key").write_bytes(b"tampered\n")
    (d / "gone.test.rsa.key").write_bytes(b"old\n")
    (d / ".tmp-leftover").write_bytes(b"half\n")
    result = sync_dir(str(d), FILES, UID, GID)
    assert result.fixed == ["a.test.rsa.key"]
    assert result.written == ["b.test.rsa.key"]
    assert result.removed == [".tmp-leftover", "gone.test.rsa.key"]
    assert result.dir_fixed
    assert mode(d) == 0o700 and mode(d / "a.test.rsa.key") == 0o600
    assert (d / "b.test.rsa.key").read_bytes() == b"rsa-b\n"
    assert sorted(os.listdir(d)) == sorted(FILES)


def test_check_mode_reports_and_changes_nothing(tmp_path: Path):
    d = tmp_path / "keys"
    result = sync_dir(str(d), FILES, UID, GID, check=True)
    assert result.changed and not d.exists()
    sync_dir(str(d), FILES, UID, GID)
    (d / "a.test.rsa.key").chmod(0o640)
    (d / "stray").write_bytes(b"x")
    result = sync_dir(str(d), {**FILES, "c.test.rsa.key": b"c"}, UID, GID, check=True)
    assert (result.written, result.fixed, result.removed) == (
        ["c.test.rsa.key"],
        ["a.test.rsa.key"],
        ["stray"],
    )
    assert mode(d / "a.test.rsa.key") == 0o640 and (d / "stray").exists()
    assert not (d / "c.test.rsa.key").exists()


def test_a_symlink_is_replaced_not_followed(tmp_path: Path):
    d = tmp_path / "keys"
    sync_dir(str(d), FILES, UID, GID)
    outside = tmp_path / "outside"
    outside.write_bytes(b"rsa-a\n")
    (d / "a.test.rsa.key").unlink()
    (d / "a.test.rsa.key").symlink_to(outside)
    result = sync_dir(str(d), FILES, UID, GID)
    assert result.written == ["a.test.rsa.key"]
    assert not (d / "a.test.rsa.key").is_symlink()
    assert outside.read_bytes() == b"rsa-a\n"


def test_empty_set_empties_the_directory(tmp_path: Path):
    d = tmp_path / "keys"
    sync_dir(str(d), FILES, UID, GID)
    result = sync_dir(str(d), {}, UID, GID)
    assert sorted(result.removed) == sorted(FILES) and os.listdir(d) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x\0y"])
def test_refuses_a_name_that_is_not_plain(tmp_path: Path, name: str):
    with pytest.raises(SyncError, match="not a plain file name"):
        sync_dir(str(tmp_path / "keys"), {name: b"x"}, UID, GID)
    assert not (tmp_path / "keys").exists()


def test_refuses_a_file_in_place_of_the_directory_and_a_subdirectory(tmp_path: Path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(SyncError, match="not a directory"):
        sync_dir(str(tmp_path / "file"), FILES, UID, GID)
    d = tmp_path / "keys"
    (d / "sub").mkdir(parents=True)
    with pytest.raises(SyncError, match="is a directory"):
        sync_dir(str(d), FILES, UID, GID)
    assert (d / "sub").is_dir()
