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

_NETWORK_PREFIXES = ("nfs", "cifs", "smb", "fuse", "9p", "ceph", "lustre", "gpfs", "afs", "glusterfs", "sshfs", "davfs")


class UnsafeFileSystemWarning(UserWarning):
    """The store is on a network or user-space file system where locks and maps are not coherent."""


def filesystem_type(path: str) -> str | None:
    """The type of the file system holding ``path`` (from /proc/self/mountinfo), or None."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        fs_type = line.split(" - ", 1)[1].split()[0]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fs_type
    return best_type


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
