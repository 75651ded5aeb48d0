"""Writing provisioning files with the right permissions from the first byte.

A secret must never exist, even for a moment, with a mode that lets another
user read it: files are created with their final mode (no chmod afterwards)
and replaced atomically, so a broker reloading mid-write sees the old or the
new file, never half of one.
"""

from __future__ import annotations

import contextlib
import grp
import os
from pathlib import Path

PUBLIC = 0o644
PRIVATE = 0o600
GROUP_READABLE = 0o640


def write_file(path: Path, data: bytes, mode: int, group: str | None = None) -> None:
    """Atomically write `data` to `path` with `mode` (and `group`, if it exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we asked for
        gid = group_id(group)
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def write_public(path: Path, data: bytes) -> None:
    write_file(path, data, PUBLIC)


def write_private(path: Path, data: bytes, group: str | None = None) -> None:
    """Owner-only, or owner + `group` read (the broker reading its key)."""
    write_file(path, data, GROUP_READABLE if group_id(group) is not None else PRIVATE, group)


def group_id(group: str | None) -> int | None:
    """The gid of `group` if we may hand files to it (root, group exists)."""
    if group is None or os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def make_dir(path: Path, mode: int, group: str | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    gid = group_id(group)
    if gid is not None:
        os.chown(path, -1, gid)
