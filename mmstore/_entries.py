"""The pieces of the read path a Store keeps per dataset, and small file helpers.

A ``_Location`` is where a validated name lives on disk (and its writer lock);
an ``_Entry`` is a parsed, committed header with its mapped data and the pinned
identity of its sidecar. StoreReads (``_reads.py``) keeps both in bounded caches.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from . import _durable, _names
from ._errors import AccessDeniedError, FormatError
from ._format import MAX_SIDECAR_BYTES, Header
from ._locks import COUNTER_BYTES, DatasetLock, counter_is_even
from ._maps import _Mapped

_READ_ALL = 1 << 16
# O_PATH: walking needs only search permission on a directory, as a path lookup does.
_DIRECTORY_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


def _descriptor_budget() -> int:
    """How many datasets to keep mapped and remembered: an eighth of the descriptor limit.

    Each cached dataset pins a sidecar descriptor, its map one more and, once read
    twice, its lock file's (for the change counter) one more; each remembered
    location may keep a lock descriptor. So a process touching many datasets uses
    at most half of its descriptors on them: 128 datasets under the common limit
    of 1024, up to 4096 where the limit is high, at least 16.
    """
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft // 8))


class _Location:
    """Where one (validated) dataset name lives on disk, and its writer lock."""

    __slots__ = (
        "_lock", "directory", "groups", "inside", "leaf", "name", "permissions", "root", "shared_lock", "sidecar",
    )  # fmt: skip

    def __init__(self, root: str, name: str, permissions: int | None = None, shared_lock: bool = False) -> None:
        """``shared_lock``: the dataset's writer lock and change counter are its directory's
        shared lock file (_names.SHARED_LOCK_FILE), not a file of its own."""
        self.name = name
        self.permissions = permissions
        self.inside = False  # checked that no group directory on the way is a symlink
        self.root = root
        if "/" in name:
            self.groups = name.split("/")[:-1]
            self.directory, self.leaf = _names.split_leaf(root, name)
        else:  # (every dataset's first read comes here)
            self.groups = []
            self.directory, self.leaf = root, name
        self.sidecar = self.directory + "/" + self.leaf + ".json"
        self.shared_lock = shared_lock
        self._lock: DatasetLock | None = None  # made on first use: readers never lock

    @property
    def lock(self) -> DatasetLock:
        if self._lock is None:
            self._lock = DatasetLock(self.directory + "/" + self.lock_file, f"dataset {self.name!r}", self.permissions)
        return self._lock

    @property
    def lock_file(self) -> str:
        """The name of the dataset's lock file in its directory (named when first needed:
        every dataset's first read makes a location, and readers seldom need it)."""
        return _names.SHARED_LOCK_FILE if self.shared_lock else _names.lock_file_name(self.leaf)

    def open_counter(self) -> int:
        """A read-only descriptor of the lock file, for its change counter; -1 if there is
        no regular file to read (a store not written by mmstore, another user's file)."""
        try:
            fd = self.open_file(self.lock_file, _durable.READ_FLAGS)
        except (OSError, FormatError):
            return -1
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
        except OSError:
            pass
        os.close(fd)
        return -1

    def data_path(self, data_file: str) -> str:
        return self.directory + "/" + data_file

    def create_data_file(self, permissions: int | None) -> tuple[str, int]:
        """A new data file of this dataset, under a name never used before, created
        exclusively: (its name, a write descriptor). StoreIOError (or StoreFullError,
        ReadOnlyError) if it cannot be."""
        data_file = _names.data_file_name(self.leaf, _names.new_token())
        try:
            return data_file, _durable.create_new(self.data_path(data_file), permissions)
        except OSError as exc:
            raise _durable.io_error(exc, f"dataset {self.name!r}: creating its data file") from None

    def open_file(self, file_name: str, flags: int, directory_fd: int | None = None) -> int:
        """Open ``file_name`` in the dataset's directory without following a group symlink.

        The directory is reached from the store root one group at a time with
        O_NOFOLLOW (or is ``directory_fd``, from open_directory), and the file is
        opened relative to it, so a group directory replaced by a symlink (even
        between two calls) can never make a reader serve a file from outside the
        store: FormatError instead. Readers get here only when they (re)read a
        sidecar or map a data file, never on the cached path of a repeated get.
        Names without groups cost nothing extra.
        """
        if directory_fd is not None:
            return os.open(file_name, flags, dir_fd=directory_fd)
        if not self.groups:
            return os.open(self.directory + "/" + file_name, flags)
        directory_fd = self.open_directory()
        assert directory_fd is not None
        try:
            return os.open(file_name, flags, dir_fd=directory_fd)
        finally:
            os.close(directory_fd)

    def open_directory(self) -> int | None:
        """A descriptor of the dataset's directory reached without following symlinks
        (None for a name without groups: the store root, opened by path)."""
        if not self.groups:
            return None
        fd = os.open(self.root, _DIRECTORY_FLAGS)
        try:
            for index, part in enumerate(self.groups):
                try:
                    child = os.open(part, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(part, fd):
                        group = "/".join(self.groups[: index + 1])
                        raise FormatError(
                            f"dataset {self.name!r}: group directory {group!r} is a symlink; "
                            "refusing to follow it (it could lead out of the store)"
                        ) from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def group_symlink(self) -> str | None:
        """The first group on the way that is a symlink (an lstat walk), or None."""
        return _first_symlink(self.root, self.groups)

    def temp_path(self) -> str:
        return self.directory + "/" + _names.temp_file_name(self.leaf, _names.new_token())


def _first_symlink(root: str, parts: list[str]) -> str | None:
    """The first of the nested directories ``root/parts[0]/parts[1]...`` that is a
    symlink, as a path relative to ``root``; None if none is (or one is missing)."""
    current = root
    for part in parts:
        current += "/" + part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return current[len(root) + 1 :]
        except OSError:
            return None
    return None


# Serialises opening an entry's counter descriptor against closing the entry (the only
# two places that touch Entry.counter_fd besides reads); reentrant, as __del__ may close.
_counter_guard = threading.RLock()


def _reset_counter_guard_after_fork() -> None:
    global _counter_guard
    _counter_guard = threading.RLock()


os.register_at_fork(after_in_child=_reset_counter_guard_after_fork)

_NO_COUNTER = -2  # Entry.counter_fd: the lock file could not be opened; not tried again


class _Entry:
    """A committed header (and, once read, its mapped array) plus the identity
    of the sidecar it came from.

    The sidecar descriptor is held open so that its inode number cannot be
    reused by a later sidecar: while we hold it, a stat() that shows the same
    inode really is the same, unchanged commit (sidecars are never rewritten in
    place, only replaced by rename).

    ``counter`` is the dataset's change counter (see _locks.py) as read, even,
    before a check that found this entry current (or before its sidecar was read);
    while the lock file still shows it, no writer has taken the lock since, and a
    repeated get costs one pread() of ``counter_fd``. Whoever pops an entry from a
    store's cache closes it.
    """

    __slots__ = ("closed", "counter", "counter_fd", "header", "identity", "mapped", "sidecar_fd")

    def __init__(self, header: Header, sidecar_fd: int, st: os.stat_result | None = None) -> None:
        self.header = header
        self.mapped: _Mapped | None = None
        self.sidecar_fd = sidecar_fd
        # (inode, device) of the sidecar; a put leaves it to the first recheck that needs it
        # (an fstat() a commit need not make: its own get trusts the change counter).
        self.identity = None if st is None else (st.st_ino, st.st_dev)
        self.counter: bytes | None = None
        self.counter_fd = -1  # opened on the entry's first recheck (a first get never needs it)
        self.closed = False

    def is_file(self, st: os.stat_result) -> bool:
        """Whether ``st`` (a stat() of the sidecar path) is this entry's sidecar. False if
        the entry was closed meanwhile (its descriptor number may name another file now)."""
        identity = self.identity
        if identity is None:
            with _counter_guard:
                if self.closed:
                    return False
                try:
                    pinned = os.fstat(self.sidecar_fd)
                except OSError:
                    return False
            self.identity = identity = (pinned.st_ino, pinned.st_dev)
        return st.st_ino == identity[0] and st.st_dev == identity[1]

    def read_counter(self, location: _Location) -> bytes | None:
        """The change counter now if it shows no change under way, else None; opens the
        lock file on first use. (A descriptor closed by another thread meanwhile reads
        garbage or fails; the caller trusts the value only if the entry is still cached,
        and entries are popped before they are closed.)"""
        fd = self.counter_fd
        if fd == -1:
            opened = location.open_counter()
            with _counter_guard:
                if self.closed or self.counter_fd != -1:  # popped meanwhile, or another thread was first
                    if opened >= 0:
                        os.close(opened)
                    return None
                self.counter_fd = fd = opened if opened >= 0 else _NO_COUNTER
        if fd < 0:
            return None
        try:
            raw = os.pread(fd, COUNTER_BYTES, 0)
        except OSError:
            return None
        return raw if counter_is_even(raw) else None

    def close(self, successor: _Entry | None = None) -> None:
        """Close the entry's descriptors. ``successor``, the entry that replaces this one
        (not yet shared with other threads), takes over its counter descriptor instead
        (the same dataset's lock file): saves an open() per generation."""
        with _counter_guard:
            self.closed = True
            counter_fd, self.counter_fd = self.counter_fd, -1
            if successor is not None and counter_fd >= 0:
                successor.counter_fd, counter_fd = counter_fd, -1
        _close_quietly(self.sidecar_fd)
        if counter_fd >= 0:
            _close_quietly(counter_fd)


def _is_symlink(name: str, directory_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=directory_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


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
    """Read a small file whole; a short read of a regular file means its end (one system
    call). Stops past MAX_SIDECAR_BYTES (a larger file is refused by its reader anyway),
    so that a device planted in place of a sidecar cannot make it read forever."""
    data = os.read(fd, _READ_ALL)
    if len(data) < _READ_ALL:
        return data
    chunks = [data]
    total = len(data)
    while total <= MAX_SIDECAR_BYTES and (chunk := os.read(fd, _READ_ALL)):
        chunks.append(chunk)
        total += len(chunk)
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
    except PermissionError:
        # (not skipped: a listing that silently left out a group's datasets would hide them)
        raise AccessDeniedError(
            errno.EACCES, f"store {root!r}: permission denied listing group directory {directory!r}"
        ) from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            _collect_names(root, entry.path, names)
        elif entry.name.endswith(".json"):
            # A sidecar that is a symlink or a special file is listed (reading it raises
            # FormatError): a corrupt dataset is seen, not hidden. A symlinked group
            # directory is never entered (is_dir above does not follow it).
            name = entry.path[len(root) + 1 : -5]
            if name != "mmstore":
                names.append(name)
