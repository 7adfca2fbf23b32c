"""The cache's shared control file, ``.mmstore-cache``: one map every process shares.

A 4096-byte header (magic, format version, and u64 fields: bytes reserved, hit, miss
and eviction counts), then two tables of _SLOTS u64 slots each: the access time of
every key's slot (milliseconds, for least-recently-used eviction across processes) and
its change counter (see _Change). Keys share slots by hash.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from typing import Any

from . import _durable, _names
from ._errors import FormatError

_CONTROL_NAME = ".mmstore-cache"
_MAGIC = b"MMSCACH\x01"
_HEADER_BYTES = 4096
_SLOTS = 65536  # access-time slots (u64 milliseconds); keys share a slot by hash
# After the access-time table, a change-counter table with the same slots: every
# set/delete/eviction bumps its key's slot before and after touching the entry,
# so a hit whose slot still shows the (even) value seen when the entry was read
# needs no system call at all. Odd means "a change is in progress": look again.
# Every bump is made under the cache lock: a read-then-write by two processes at
# once could lose one and bring the counter back to a value a reader has seen.
_RESERVED, _HITS, _MISSES, _EVICTIONS, _VERSION_SLOT = 1, 2, 3, 4, 7  # u64 fields of the header
# Version 3: the entries of one e/<h2> directory share its lock file (SHARED_LOCK_FILE), so
# a cache holds at most 256 entry lock files, however many keys it has ever seen. Version 2
# caches keep a lock file per key ever stored, and are still written that way.
_VERSION = 3
_SHARED_LOCKS_SINCE = 3
ENTRY_GROUP = "e/"  # (entries are e/<h2>/<h>: see _entry_of)


def shared_lock_groups(root: str) -> tuple[str, ...] | None:
    """The groups whose datasets share their directory's lock file in the cache at
    ``root``: (ENTRY_GROUP,) for a cache of version 3 or later, () for an older one,
    None if ``root`` holds no cache control file (a plain store, or a cache being made).
    Every handle on a cache directory, a Store's too, must lock entries alike: a control
    file that is there but cannot be read raises (OSError), rather than let a writer lock
    and count through files other handles do not read."""
    try:
        fd = os.open(os.path.join(root, _CONTROL_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        raw = os.pread(fd, 8, 8 * _VERSION_SLOT)
    finally:
        os.close(fd)
    if len(raw) != 8:
        return None
    return (ENTRY_GROUP,) if struct.unpack("<Q", raw)[0] >= _SHARED_LOCKS_SINCE else ()


def _entry_of(raw: bytes) -> tuple[str, int]:
    """(entry name, access slot) of a key's canonical bytes."""
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    name = f"e/{digest[:2]}/{digest}"
    return name, _slot_of(name)


def _slot_of(name: str) -> int:
    """The access-time and change-counter slot of entry ``e/<h2>/<h>``: from its digest."""
    return int(name[-32:-24], 16) % _SLOTS


class _Change:
    """Two bumps of a change counter around a change: odd while it is under way.

    A bump is a read and a write of shared memory: callers hold the cache lock, since
    two processes bumping at once could lose one, and the counter come back to a value
    a reader saw before a change."""

    __slots__ = ("counters", "slot")

    def __init__(self, counters: Any, slot: int) -> None:
        self.counters = counters
        self.slot = slot

    def begin(self) -> None:
        self.counters[self.slot] = (self.counters[self.slot] + 1) & 0xFFFFFFFFFFFFFFFF

    def end(self) -> None:
        self.counters[self.slot] = (self.counters[self.slot] + 1) & 0xFFFFFFFFFFFFFFFF


def _open_control(root: str, permissions: int | None) -> mmap.mmap:
    """Map the shared control file, creating it (atomically, zeroed) if needed."""
    path = os.path.join(root, _CONTROL_NAME)
    size = _HEADER_BYTES + 2 * _SLOTS * 8
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        # Not a store temp-file name: recovery must not take this for a dataset's sidecar.
        temp = os.path.join(root, f"{_CONTROL_NAME}-new-{_names.new_token()}")
        new = _durable.create_new(temp, permissions)
        try:
            os.posix_fallocate(new, 0, size)
            os.pwrite(new, _MAGIC, 0)
            os.pwrite(new, struct.pack("<Q", _VERSION), 8 * _VERSION_SLOT)
        finally:
            os.close(new)
        try:
            os.link(temp, path)  # never replace a control file another process made first
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size or os.pread(fd, 8, 0) != _MAGIC:
            raise FormatError(f"cache {root!r}: {_CONTROL_NAME} is not an mmstore cache control file")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
