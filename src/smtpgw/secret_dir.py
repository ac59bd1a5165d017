"""A directory of secret files made to hold exactly a given set of files, in one pass.

The relay's DKIM private keys arrive as one bundle (one module call for every key of every
domain) instead of one task item per key: at 1,000 domains that is two files a domain, and a
task item per file costs a connection round trip each. `sync_dir` compares what is there with
what should be, writes only what differs (atomically: a temporary file in the same directory,
then a rename), puts back a widened mode or a wrong owner, and removes every file that is not
in the set. Standard library only: it runs on the relay, inside an Ansible module.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class SyncResult:
    """What `sync_dir` did (or, in check mode, would do), by file name: never the contents."""

    written: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    dir_fixed: bool = False
    before: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.written or self.fixed or self.removed or self.dir_fixed)


class SyncError(Exception):
    """The directory cannot be made to hold the files; the message says what and where."""


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def sync_dir(
    path: str,
    files: Mapping[str, bytes],
    uid: int,
    gid: int,
    file_mode: int = 0o600,
    dir_mode: int = 0o700,
    check: bool = False,
) -> SyncResult:
    """Make `path` hold exactly `files` (name -> content), owned uid:gid, with these modes.

    Anything else in `path` is removed (a subdirectory is refused rather than removed: nothing
    here makes one, so one is someone else's). In check mode nothing is changed and the result
    says what would be.
    """
    bad = sorted(n for n in files if not _is_plain_name(n))
    if bad:
        raise SyncError(f"not a plain file name: {bad[0]!r}")
    result = SyncResult()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise SyncError(f"{path} exists and is not a directory: move it away")
    if st is None:
        result.dir_fixed = True
        if check:
            result.written = sorted(files)
            return result
        os.makedirs(path, mode=dir_mode)
        st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) != dir_mode or (st.st_uid, st.st_gid) != (uid, gid):
        result.dir_fixed = True
        if not check:
            os.chown(path, uid, gid)
            os.chmod(path, dir_mode)

    present = {}
    with os.scandir(path) as entries:
        for entry in entries:
            present[entry.name] = entry.stat(follow_symlinks=False)
    result.before = sorted(present)
    for name in sorted(present):
        if name in files:
            continue
        if stat.S_ISDIR(present[name].st_mode):
            raise SyncError(f"{path}/{name} is a directory, which this directory never holds")
        result.removed.append(name)
        if not check:
            os.unlink(os.path.join(path, name))

    for name in sorted(files):
        content = files[name]
        target = os.path.join(path, name)
        now = present.get(name)
        if now is not None and stat.S_ISREG(now.st_mode) and now.st_size == len(content):
            with open(target, "rb") as fh:
                same = fh.read() == content
        else:
            same = False
        if not same:
            result.written.append(name)
            if not check:
                _write(path, name, content, uid, gid, file_mode)
            continue
        if stat.S_IMODE(now.st_mode) != file_mode or (now.st_uid, now.st_gid) != (uid, gid):
            result.fixed.append(name)
            if not check:
                os.chown(target, uid, gid)
                os.chmod(target, file_mode)
    return result


def _write(path: str, name: str, content: bytes, uid: int, gid: int, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path)
    try:
        os.fchmod(fd, mode)
        os.fchown(fd, uid, gid)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(path, name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
