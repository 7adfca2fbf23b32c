"""Every file-system step that makes data visible or durable lives here.

The ordering, written down once:

1. A new data file is created with O_CREAT|O_EXCL|O_NOFOLLOW and fully written.
2. A new sidecar is written to a hidden temp file beside the final one.
3. For a durable commit, the data file is fsynced, then the temp sidecar.
4. The temp sidecar is atomically swapped into place (the commit point).
5. For a durable commit, the directory is fsynced, so the rename survives power loss.

A kill -9 at any point leaves either the old or the new sidecar, each pointing
to a complete data file, because the page cache outlives the process. Power
loss without step 3 can leave a sidecar whose data never reached the disk;
the checksum in the sidecar is how `verify` notices.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Any

from ._errors import FsyncError, ReadOnlyError, StoreFullError, StoreIOError

NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted where a sidecar or data file should be
# must not hang the reader (it has no effect on regular files).
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Writing into an existing data file (a packed one). Not O_APPEND: on Linux that makes
# pwrite() ignore its offset. O_NONBLOCK: a FIFO planted there fails instead of hanging.
WRITE_EXISTING_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Large writes are split so that a single call never exceeds Linux's 2 GiB cap.
WRITE_CHUNK = 1 << 30
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def libc_function(name: str, *argtypes: Any) -> Any:
    """A C library function returning int (errno kept for ctypes.get_errno), or None.
    Without ``argtypes`` its arguments go as ctypes converts them by default (ints as
    C int, bytes as char *), which skips a from_param() call per argument."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    if argtypes:
        function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_fallocate = libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
_FALLOC_FL_KEEP_SIZE = 1


def preallocate(fd: int, nbytes: int) -> None:
    """Reserve the blocks of a new file about to be written with ``nbytes`` (a hint).

    Writing into allocated blocks is ~10% faster on ext4 than delayed allocation page by
    page (NumPy's tofile does the same), and a full disk fails here, before any copying.
    KEEP_SIZE: the file's size still grows only as bytes are written. Unsupported file
    systems just skip it (no emulation by writing zeros, as posix_fallocate would do).
    """
    if _fallocate is None or nbytes <= 0:
        return
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err in _FULL_ERRNOS:
            raise OSError(err, os.strerror(err))


# renameat2(int, const char *, int, const char *, unsigned int): every argument is an int
# or bytes, which ctypes passes as such without argtypes (a commit calls it once).
_renameat2 = libc_function("renameat2")
_exchange_supported = _renameat2 is not None
# os.fsencode without its Python-level call (a commit encodes two paths)
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def refused_write(exc: OSError) -> bool:
    """Whether a write failed for want of permission or on a read-only mount (EROFS binds root too)."""
    return isinstance(exc, PermissionError) or exc.errno == errno.EROFS


def io_error(exc: OSError, what: str) -> OSError:
    """Wrap an OSError from a write path in the matching mmstore error."""
    if isinstance(exc, (StoreIOError, ReadOnlyError)):
        return exc
    if exc.errno in _FULL_ERRNOS:
        return StoreFullError(exc.errno, f"{what}: no space left ({os.strerror(exc.errno)})")
    if refused_write(exc):
        # (the file named: which group or lock file of the store is not writable)
        return ReadOnlyError(exc.errno, f"{what}: {exc.strerror or exc}", exc.filename)
    return StoreIOError(exc.errno, f"{what}: {exc.strerror or exc}")


def create_new(path: str, permissions: int | None = None) -> int:
    """Create ``path`` exclusively (never through a symlink) and return a write fd.

    Missing parent directories are created. Without ``permissions`` the umask
    decides (0o666 & ~umask); with them, they are set exactly (a store shared by
    a group wants 0o660 whatever each user's umask is).
    """
    try:
        fd = os.open(path, NEW_FILE_FLAGS, 0o666)
    except FileNotFoundError:
        make_directories(os.path.dirname(path), permissions)
        fd = os.open(path, NEW_FILE_FLAGS, 0o666)
    if permissions is not None:
        try:
            os.fchmod(fd, permissions)
        except BaseException:
            os.close(fd)
            raise
    return fd


def directory_permissions(permissions: int) -> int:
    """Directory bits for file ``permissions``: search (x) wherever read (r) is allowed."""
    return permissions | ((permissions & 0o444) >> 2)


def make_directories(path: str, permissions: int | None = None) -> None:
    """os.makedirs, giving directories it creates the store's permissions if set."""
    if permissions is None:
        os.makedirs(path, exist_ok=True)
        return
    missing = []
    current = path
    while current and not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    os.makedirs(path, exist_ok=True)
    for directory in reversed(missing):
        try:
            os.chmod(directory, directory_permissions(permissions))
        except FileNotFoundError:
            pass


def write_all(fd: int, data: Any, offset: int | None = None) -> None:
    """Write the whole buffer, looping over short writes."""
    view = memoryview(data)
    total = view.nbytes
    if 0 < total <= WRITE_CHUNK:  # the usual case: one call writes it all
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if written == total:
            return
        position = written
    else:
        position = 0
    view = view.cast("B")
    while position < total:
        chunk = view[position : position + WRITE_CHUNK]
        if offset is None:
            written = os.write(fd, chunk)
        else:
            written = os.pwrite(fd, chunk, offset + position)
        if written <= 0:  # pragma: no cover - the kernel reports errors as OSError
            raise OSError(errno.EIO, "write returned 0")
        position += written


def fsync(fd: int, what: str) -> None:
    """fsync, turning a failure into FsyncError.

    After a failed fsync Linux may already have dropped the dirty pages and
    cleared the error, so a retry would "succeed" without the data (the
    PostgreSQL fsyncgate lesson): callers must not go on as if nothing happened.
    """
    try:
        os.fsync(fd)
    except OSError as exc:
        raise FsyncError(exc.errno, f"fsync of {what} failed: {exc.strerror or exc}") from None


def fsync_dir(path: str) -> None:
    """fsync a directory. One that is gone raises FileNotFoundError as it is: it holds
    nothing left to make durable, and that is no failed fsync (FsyncError makes a store
    refuse further commits)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FsyncError(exc.errno, f"fsync of directory {path!r} failed: {exc.strerror or exc}") from None
    try:
        fsync(fd, f"directory {path!r}")
    finally:
        os.close(fd)


def write_file_atomically(
    path: str, temp_path: str, content: bytes, *, durable: bool, permissions: int | None = None
) -> int:
    """Write ``content`` to ``temp_path`` and swap it into ``path`` (steps 2-4 above).

    If this raises, nothing was committed. Once it returns, the commit is
    visible; making the directory durable (step 5) is the caller's next step,
    so that a failure there is never mistaken for a failed commit. Returns an
    open descriptor of the new file, which the caller may keep to pin its
    inode (see ``_entries._Entry``) and must close.
    """
    fd = create_new(temp_path, permissions)
    try:
        write_all(fd, content)
        if durable:
            fsync(fd, repr(temp_path))
        swap_into_place(temp_path, path)
    except BaseException:
        os.close(fd)
        _unlink_quietly(temp_path)
        raise
    return fd


def fsync_dir_chain(directory: str, root: str) -> None:
    """fsync ``directory`` and every parent up to ``root`` (new group directories
    are only durable once their own entry in the parent is)."""
    while True:
        try:
            fsync_dir(directory)
        except FileNotFoundError:
            if directory == root:
                raise
            # (a group directory removed since the commit, say a cache's part directory:
            # nothing in it is left to make durable, but its parent's entry is)
        if directory == root or not directory.startswith(root):
            return
        directory = os.path.dirname(directory)


def swap_into_place(temp_path: str, path: str) -> None:
    """Atomically make ``temp_path`` visible as ``path``; ``temp_path`` is gone afterwards.

    When ``path`` exists we exchange the two names (renameat2 RENAME_EXCHANGE) and
    unlink the old file, rather than rename over it: ext4's auto_da_alloc
    heuristic flushes the new file to disk on a rename-over, which costs ~1 ms
    per commit, and durability here is explicit (flush), not a side effect.
    """
    global _exchange_supported
    if _exchange_supported:
        result = _renameat2(
            _AT_FDCWD,
            temp_path.encode(_FS_ENCODING, _FS_ERRORS),
            _AT_FDCWD,
            path.encode(_FS_ENCODING, _FS_ERRORS),
            _RENAME_EXCHANGE,
        )
        if result == 0:
            # Committed. temp_path now names the old file: removing it is cleanup,
            # and if that fails (or we crash first) recovery removes the hidden file.
            try:
                os.unlink(temp_path)
            except OSError:
                pass
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            _exchange_supported = False  # this file system cannot exchange
        elif err != errno.ENOENT:  # ENOENT: nothing to exchange with, rename below
            raise OSError(err, os.strerror(err), path)
    os.rename(temp_path, path)


def _unlink_quietly(path: str) -> None:
    """Best-effort removal of a file nothing refers to (recovery removes what is left)."""
    try:
        os.unlink(path)
    except OSError:
        pass


unlink_quietly = _unlink_quietly
