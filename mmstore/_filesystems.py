"""Which file system a store lives on, and a warning where mmstore's guarantees weaken.

mmstore relies on flock() for writer exclusion, on a shared page cache for
zero-copy reads that see every commit, and on inotify for follower wake-ups.
Network and user-space file systems (NFS, SMB/CIFS, FUSE, 9p, Ceph, Lustre ...)
give none of these across machines, and some not even on one machine. Opening a
store there works, with a warning; the supported way to share data across
machines is `mmstore compact` to HDF5 on shared storage.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

_NETWORK_PREFIXES = ("nfs", "cifs", "smb", "fuse", "9p", "ceph", "lustre", "gpfs", "afs", "glusterfs", "sshfs", "davfs")


class UnsafeFileSystemWarning(UserWarning):
    """The store is on a network or user-space file system where locks and maps are not coherent."""


class Mount(NamedTuple):
    point: str  # where it is mounted
    type: str  # ext4, tmpfs, nfs4 ...
    source: str  # /dev/vda, a server:/export ...


def mount_of(path: str) -> Mount | None:
    """The mount holding ``path`` (the longest mount point above it, from /proc/self/mountinfo)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: Mount | None = None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        fs_type, source = [*line.split(" - ", 1)[1].split(), "?", "?"][:2]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.point)):
            best = Mount(point, fs_type, source)
    return best


def filesystem_type(path: str) -> str | None:
    """The type of the file system holding ``path``, or None if it cannot be told."""
    mount = mount_of(path)
    return None if mount is None else mount.type


def warn_if_unsafe(path: str) -> None:
    fs_type = filesystem_type(path)
    if fs_type is not None and fs_type.startswith(_NETWORK_PREFIXES):
        warnings.warn(
            f"store {path!r} is on a {fs_type} file system: writer locks (flock) and memory maps are not "
            "coherent across machines there, so two writers on different hosts can collide and readers can "
            "see stale data. Use one machine per store, or `mmstore compact` to HDF5 for sharing across machines.",
            UnsafeFileSystemWarning,
            stacklevel=3,
        )
