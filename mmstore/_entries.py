"""The pieces of the read path a Store keeps per dataset, and small file helpers.

A ``_Location`` is where a validated name lives on disk (and its writer lock);
an ``_Entry`` is a parsed, committed header with its mapped data and the pinned
identity of its sidecar. Store (``_store.py``) keeps both in bounded caches.
"""

from __future__ import annotations

import os

import numpy as np

from . import _names
from ._errors import MmstoreError
from ._format import MANIFEST_NAME, Header, parse_header
from ._growable import _Mapped
from ._locks import DatasetLock

_READ_ALL = 1 << 16


def _descriptor_budget() -> int:
    """How many datasets to keep mapped and remembered: an eighth of the descriptor limit.

    Each cached dataset pins a sidecar descriptor (and its map one more); each
    remembered location may keep a lock descriptor. So a process touching many
    datasets uses at most ~3/8 of its descriptors on them: 128 datasets under the
    common limit of 1024, up to 4096 where the limit is high.
    """
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(64, min(4096, soft // 8))


class _Location:
    """Where one (validated) dataset name lives on disk, and its writer lock."""

    __slots__ = ("_lock", "directory", "inside", "leaf", "name", "permissions", "sidecar")

    def __init__(self, root: str, name: str, permissions: int | None = None) -> None:
        self.name = name
        self.permissions = permissions
        self.inside = False  # checked that no group directory on the way is a symlink
        self.directory, self.leaf = _names.split_leaf(root, name)
        self.sidecar = self.directory + "/" + self.leaf + ".json"
        self._lock: DatasetLock | None = None  # made on first use: readers never lock

    @property
    def lock(self) -> DatasetLock:
        if self._lock is None:
            self._lock = DatasetLock(
                self.directory + "/" + _names.lock_file_name(self.leaf), f"dataset {self.name!r}", self.permissions
            )
        return self._lock

    def data_path(self, data_file: str) -> str:
        return self.directory + "/" + data_file

    def temp_path(self) -> str:
        return self.directory + "/" + _names.temp_file_name(self.leaf, _names.new_token())


class _Entry:
    """A committed header (and, once read, its mapped array) plus the identity
    of the sidecar it came from.

    The sidecar descriptor is held open so that its inode number cannot be
    reused by a later sidecar: while we hold it, a stat() that shows the same
    inode really is the same, unchanged commit (sidecars are never rewritten in
    place, only replaced by rename). One stat() is all a repeated get costs.
    """

    __slots__ = ("device", "header", "inode", "mapped", "sidecar_fd")

    def __init__(self, header: Header, sidecar_fd: int, st: os.stat_result) -> None:
        self.header = header
        self.mapped: _Mapped | None = None
        self.sidecar_fd = sidecar_fd
        self.inode = st.st_ino
        self.device = st.st_dev


_warmed_up = False


def _warm_up(root: str) -> None:
    """Run the read path's code once per process, on the store's own manifest.

    A fresh interpreter pays ~150 us the first time it parses JSON, builds a
    dtype, opens and maps a file and makes an array from it; doing it here,
    when the store opens, keeps that one-time cost out of the first get() of
    a dataset. The manifest is read as a byte array through the same
    _Mapped/_Location code a dataset uses.
    """
    global _warmed_up
    if _warmed_up:
        return
    _warmed_up = True
    location = _Location(root, "warm-up")
    try:
        size = os.stat(os.path.join(root, MANIFEST_NAME)).st_size
    except OSError:
        return
    sample = Header(
        name="warm-up", dtype=np.dtype("u1"), shape=(size,), data_file=MANIFEST_NAME,
        offset=0, generation=1, created=0.0, modified=0.0, attrs={}, checksum=None,
    )  # fmt: skip
    header = parse_header("warm-up", sample.to_json())
    _names.validate_name("warm-up")
    try:
        mapped = _Mapped(header, location.data_path(header.data_file), writable=False)
        mapped.rows[...]
        del mapped
    except (OSError, MmstoreError):
        pass  # only a warm-up: the real read reports real problems


def _with_parents(root: str, directories: set[str]) -> list[str]:
    """The directories and their ancestors up to ``root``, deepest first."""
    found = set()
    for directory in directories:
        while directory.startswith(root) and directory not in found:
            found.add(directory)
            if directory == root:
                break
            directory = os.path.dirname(directory)
    return sorted(found, key=lambda path: (-path.count("/"), path))


def _read_fd(fd: int) -> bytes:
    """Read a small file whole; a short read of a regular file means its end (one system call)."""
    data = os.read(fd, _READ_ALL)
    if len(data) < _READ_ALL:
        return data
    chunks = [data]
    while chunk := os.read(fd, _READ_ALL):
        chunks.append(chunk)
    return b"".join(chunks)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _collect_names(root: str, directory: str, names: list[str]) -> None:
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            _collect_names(root, entry.path, names)
        elif entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
            name = entry.path[len(root) + 1 : -5]
            if name != "mmstore":
                names.append(name)
