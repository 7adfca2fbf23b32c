"""Per-dataset writer locks.

A dataset's lock is an exclusive ``flock`` on its hidden ``.<leaf>.lock`` file,
taken through filelock's descriptor API. A ``put`` holds it only for the
commit (reading the old header, swapping the sidecar); a writer handle holds
it for its whole life, so a put waits for the handle to close.

Why not ``filelock.FileLock`` directly: its acquire+release costs ~60 us of
Python machinery; the descriptor API costs ~1 us. The descriptor stays open
after release (reopening would cost an open() and a close() per commit), for a
bounded number of released locks per process (a sixteenth of its descriptor
limit); the store also closes it when it forgets the location or closes. Lock
files are never unlinked: unlinking a locked file would split waiters across
two inodes.

flock belongs to the open file description, so two threads sharing one
descriptor would both "hold" it; a threading lock serialises them first. After
fork a child must not touch its parent's descriptors (an unlock there would
release the parent's lock), so stores drop them in the child (see _store.py).

The *change counter*: a dataset lock file holds a 64-bit counter in its first
8 bytes (little-endian), which every writer bumps to odd right after taking the
lock and back to even just before releasing it. Every change of a dataset is made
under its lock, so a reader that saw an even value before reading the sidecar,
and sees the same value now, knows the sidecar has not changed since: a
repeated get costs one pread() instead of a stat() path walk (docs/FORMAT.md).
The value is stored as a Gray code, so each bump flips exactly one bit and a
read racing a write sees the old or the new value, never a torn mix that could
equal an older value. A lock file too short to hold a counter (new, or emptied
by a foreign program) starts at a random even value, so a restarted counter
cannot come back to a value a reader remembers.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import resource
import secrets
import stat
import threading
import time
from collections import OrderedDict
from typing import Any

import filelock

from ._durable import READ_FLAGS, io_error, make_directories, unlink_quietly
from ._errors import InvalidArgumentError, LockTimeout

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
# Backoff while waiting for a contended lock: start fine-grained (commits hold
# the lock for tens of microseconds), cap so a waiter never sleeps long past a release.
_FIRST_SLEEP = 20e-6
_MAX_SLEEP = 2e-3


COUNTER_BYTES = 8
_THREAD_WAIT_MAX = threading.TIMEOUT_MAX


def counter_is_even(raw: bytes) -> bool:
    """True if ``raw`` is a whole change counter showing no change under way (the Gray
    code's bit parity is that of the count it encodes)."""
    return len(raw) == COUNTER_BYTES and not int.from_bytes(raw, "little").bit_count() & 1


def _next_gray(code: int) -> int:
    """The Gray code of the next count: flip bit 0 after an even count, else the bit
    left of the lowest set bit (one bit changes either way). The last count (only
    ever planted: counts start below 2**62) wraps to a random start."""
    if not code.bit_count() & 1:
        return code ^ 1
    code ^= (code & -code) << 1
    return code if code < 1 << 64 else _counter_start()


def _counter_start() -> int:
    """A random even count's Gray code (below 2**62: it never wraps)."""
    count = secrets.randbits(61) << 1
    return count ^ (count >> 1)


def as_seconds(value: Any, what: str) -> float | None:
    """A wait in seconds as the API takes one (a lock's timeout, wait()'s): None or infinity
    is None, wait forever; NaN and anything but a number are refused (InvalidArgumentError,
    a ValueError)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a number of seconds or None, not {value!r}") from None
    if math.isnan(seconds):
        raise InvalidArgumentError(f"{what} must be a number of seconds or None, not NaN")
    return None if seconds == math.inf else seconds


def open_lock_file(path: str, permissions: int | None = None) -> int:
    """Open (creating if needed) a lock file; a file we create gets the store's permissions."""
    try:
        return os.open(path, _OPEN_FLAGS & ~os.O_CREAT)  # the usual case: it exists
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, _OPEN_FLAGS | os.O_EXCL, 0o666)
    except FileExistsError:  # another process made it just now
        return os.open(path, _OPEN_FLAGS, 0o666)
    except FileNotFoundError:
        make_directories(os.path.dirname(path), permissions)
        return open_lock_file(path, permissions)
    if permissions is not None:
        os.fchmod(fd, permissions)
    return fd


# Released locks whose descriptors stay open, in the order they were first released
# (not re-sorted on every release: that would cost each commit more than it saves).
# The count is bounded per process (all stores and caches together), so a process
# that touches many datasets keeps only a bounded number open. Strong references: a
# lock a store has forgotten while another thread still used it is closed from here.
# Reentrant: a lock released from a signal handler or a finalizer may park itself while
# its own thread is inside _park (which mutates _idle only between whole statements).
_idle_guard = threading.RLock()
_idle: OrderedDict[int, DatasetLock] = OrderedDict()
_idle_limit = 0  # set on first use: the descriptor limit may change after import


def _park(lock: DatasetLock) -> None:
    global _idle_limit
    with _idle_guard:
        if not _idle_limit:
            _idle_limit = _idle_budget()
        _idle[id(lock)] = lock
        lock._parked = True
        while len(_idle) > _idle_limit:
            _key, oldest = _idle.popitem(last=False)
            oldest._parked = False  # parked again at its next release
            oldest.close_if_idle()  # non-blocking: a lock in use keeps its descriptors


def _idle_budget() -> int:
    """A sixteenth of the descriptor limit, within [16, 1024] (each idle lock holds its
    own descriptor and perhaps a held file's, so up to an eighth of the limit)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 64
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 16))


def _forget_idle_after_fork() -> None:
    global _idle_guard
    _idle_guard = threading.RLock()
    _idle.clear()  # the stores drop their inherited descriptors themselves


os.register_at_fork(after_in_child=_forget_idle_after_fork)


class DatasetLock:
    """An exclusive, timed lock on one dataset, held through one open descriptor."""

    __slots__ = (
        "_counter", "_fd", "_identity", "_parked", "_regular", "_thread_lock", "counted", "found_counter", "held_file",
        "holder", "keep_open", "label", "path", "permissions",
    )  # fmt: skip

    def __init__(
        self, path: str, label: str, permissions: int | None = None, keep_open: bool = True, counted: bool = True
    ) -> None:
        self.path = path
        self.label = label
        self.permissions = permissions
        # False for locks of which a process may touch thousands (the cache's
        # computation stripes): their descriptor is closed on every release.
        self.keep_open = keep_open
        # Bump the lock file's change counter around each holding (dataset locks; see
        # the module docstring). Locks that guard no sidecar need not.
        self.counted = counted
        self._counter = -1  # the odd value written at acquire, while held; -1 if none
        # The change counter as found (even) when the lock was taken, while held: an entry
        # whose counter equals it is current without a stat() (see Store._committed_header).
        self.found_counter: bytes | None = None
        self._regular = True  # the lock file is a regular file (else it can hold no counter)
        self._identity = (-1, -1)  # (inode, device) of the open lock file
        self._fd = -1
        self._parked = False
        self._thread_lock = threading.Lock()
        # (file name, descriptor) of a file the lock holder keeps open between commits
        # (a packed data file, see _writes.py); used only while the lock is held, and
        # closed whenever the lock's own descriptor is.
        self.held_file: tuple[str, int] | None = None
        # Who in this process holds the lock for long (a writer handle), for the timeout
        # message of a wait in this same process; None while free or held for a commit.
        self.holder: str | None = None

    def acquire(self, timeout: float) -> None:
        start = time.monotonic()
        # (A wait past threading's limit, ~292 years, is a wait forever: acquire() would
        # raise OverflowError.)
        if not self._thread_lock.acquire(True, -1 if timeout < 0 or timeout >= _THREAD_WAIT_MAX else timeout):
            raise self._timeout_error(timeout)
        try:
            reopened = 0
            while True:
                if self._fd < 0:
                    self._fd = self._open()
                if not filelock.lock_descriptor(self._fd, blocking=False):  # (uncontended: the usual case)
                    deadline = start + timeout if timeout >= 0 else None
                    sleep = _FIRST_SLEEP
                    while not filelock.lock_descriptor(self._fd, blocking=False):
                        if deadline is not None:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                raise self._timeout_error(timeout)
                            sleep = min(sleep, remaining)
                        time.sleep(sleep)
                        sleep = min(sleep * 2, _MAX_SLEEP)
                if self._still_named(reopened):
                    break
                reopened += 1
            self._begin_change()
        except BaseException:
            self._thread_lock.release()
            raise

    def _still_named(self, reopened: int = 0) -> bool:
        """With the flock just taken: True if the lock path still names the file we locked.
        If the lock file was deleted, replaced or renamed while we kept its descriptor
        (outside the protocol: lock files are never unlinked), we hold a file that other
        writers do not lock, whose change counter is no longer the dataset's: drop it, so
        that the caller locks the file the path names now. (After a few reopens in a row
        the lock is taken as it is: a file system whose stat() and fstat() disagree must
        not make us spin.)"""
        if reopened >= 3:
            return True
        try:
            found = os.stat(self.path)
            if (found.st_ino, found.st_dev) == self._identity:
                return True
        except (FileNotFoundError, NotADirectoryError):
            pass
        except BaseException:  # (an interrupt, EACCES: the flock must not stay held)
            filelock.unlock_descriptor(self._fd)
            raise
        filelock.unlock_descriptor(self._fd)
        self.close()
        return False

    def _begin_change(self) -> None:
        """With the flock just taken: bump the change counter to odd (see the module
        docstring). If that fails, the flock is released and the error raised."""
        self.found_counter = None
        if not (self.counted and self._regular):
            return
        try:
            raw = os.pread(self._fd, COUNTER_BYTES, 0)
            if len(raw) == COUNTER_BYTES:
                code = int.from_bytes(raw, "little")
                if code.bit_count() & 1:  # a holder died mid-change: it stays odd
                    self._counter = code
                    return
                code ^= 1
                if os.pwrite(self._fd, code.to_bytes(COUNTER_BYTES, "little"), 0) != COUNTER_BYTES:
                    raise OSError(errno.EIO, "short write of the change counter")
                self._counter = code
                self.found_counter = raw
                return
        except BaseException as exc:
            filelock.unlock_descriptor(self._fd)
            if isinstance(exc, OSError):
                raise io_error(exc, f"updating the change counter of {self.label}") from None
            raise
        # No counter yet (or a foreign program emptied the file), so no reader relies on
        # one: start one if we can, else go on without (readers then stat the sidecar).
        code = _next_gray(_counter_start())
        try:
            if os.pwrite(self._fd, code.to_bytes(COUNTER_BYTES, "little"), 0) == COUNTER_BYTES:
                self._counter = code
        except OSError:
            pass

    def _open(self) -> int:
        try:
            fd = open_lock_file(self.path, self.permissions)
        except OSError as exc:  # a full disk when the lock file is new, say
            raise io_error(exc, f"opening {self.label}") from None
        try:
            # A FIFO or device planted there still locks, as before, but holds no counter
            # (readers ignore anything but a regular file's).
            opened = os.fstat(fd)
            self._regular = stat.S_ISREG(opened.st_mode)
            self._identity = (opened.st_ino, opened.st_dev)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def try_acquire(self) -> bool:
        """One non-blocking attempt (used by recovery, which skips busy datasets)."""
        if not self._thread_lock.acquire(blocking=False):
            return False
        try:
            for attempt in range(4):  # (more if the lock path names another file than we locked)
                if self._fd < 0:
                    self._fd = self._open()
                if not filelock.lock_descriptor(self._fd, blocking=False):
                    break
                if self._still_named(attempt):
                    self._begin_change()
                    return True
        except BaseException:
            self._thread_lock.release()
            raise
        self._thread_lock.release()
        return False

    def release(self) -> bytes | None:
        """Release the lock. Never raises OSError: if unlocking fails, closing the descriptor
        drops the flock for certain. (Callers release after committing: an error here
        would read as a failed commit, and undoing a done commit loses data.)

        Returns the change counter written back (even), or None if none was: while the
        lock file still shows that value, nobody has changed the dataset since."""
        self.holder = None
        self.found_counter = None
        released = None
        try:
            if self._fd >= 0:  # (else something closed it: nothing left to unlock)
                released = self._end_change()
                filelock.unlock_descriptor(self._fd)
            if not self.keep_open:
                self.close()
        except BaseException as exc:
            released = None
            self.close_quietly()
            if not isinstance(exc, OSError):
                raise
        finally:
            self._thread_lock.release()
        if self.keep_open and not self._parked:
            _park(self)
        elif not self.keep_open:
            self.close_if_idle()  # (close_when_released() may have run since the check above)
        return released

    def _end_change(self) -> bytes | None:
        """Before the flock goes: bump the change counter back to even, and return it. If
        that fails it stays odd, and readers check the sidecar itself until the next writer."""
        code, self._counter = self._counter, -1
        if code >= 0:
            raw = _next_gray(code).to_bytes(COUNTER_BYTES, "little")
            try:
                if os.pwrite(self._fd, raw, 0) == COUNTER_BYTES:
                    return raw
            except OSError:
                pass
        return None

    def close(self) -> None:
        self.drop_held_file()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def close_quietly(self) -> None:
        """close(), ignoring errors (the descriptors are forgotten either way)."""
        try:
            self.drop_held_file()
        except OSError:
            pass
        try:
            self.close()
        except OSError:
            pass

    def drop_held_file(self) -> None:
        if self.held_file is not None:
            _name, fd = self.held_file
            self.held_file = None
            os.close(fd)

    def close_when_released(self) -> None:
        """Close the descriptor now if no thread holds the lock, else at its holder's
        release (closing a held lock's descriptor would drop its flock mid-commit, and
        the number could go to another file that the holder then unlocks)."""
        self.keep_open = False
        self.close_if_idle()

    def close_if_idle(self) -> bool:
        """Close the descriptor unless a thread holds (or is taking) the lock."""
        if not self._thread_lock.acquire(blocking=False):
            return False
        try:
            self.close()
        finally:
            self._thread_lock.release()
        return True

    def forget_after_fork(self) -> None:
        """In a forked child: drop the inherited descriptors without unlocking."""
        for fd in (self._fd, self.held_file[1] if self.held_file is not None else -1):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = -1
        self.held_file = None
        self.holder = None
        self._parked = False
        self._counter = -1
        self.found_counter = None
        self._thread_lock = threading.Lock()

    def _timeout_error(self, timeout: float) -> LockTimeout:
        holder = self.holder
        if holder is not None:
            return LockTimeout(
                f"timed out after {timeout:g} s waiting for the writer lock of {self.label} ({self.path}): "
                f"{holder} in this process holds it; close it first"
            )
        return LockTimeout(
            f"timed out after {timeout:g} s waiting for the writer lock of {self.label} "
            f"({self.path}); another writer holds it"
        )


def mark_alive(fd: int, *, shared: bool = False) -> bool:
    """Hold a flock on a file being written, so recovery can tell that its writer is
    alive (the kernel drops the lock when the process dies). False if a probe holds
    it at this instant (``remove_if_writer_gone`` may be removing the file).

    Probes take an exclusive lock, so a shared one marks the file alive just as well;
    the HDF5 export uses it because HDF5 readers take a shared flock on open, and the
    export's temp file becomes the output while still locked."""
    if not shared:
        return filelock.lock_descriptor(fd, blocking=False)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def writer_is_gone(path: str) -> bool:
    """True if nobody holds the liveness lock on ``path`` (its writer has exited)."""
    try:
        fd = os.open(path, READ_FLAGS)  # (O_NONBLOCK: a FIFO planted there does not hang us)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            return False
        raise
    try:
        return filelock.lock_descriptor(fd, blocking=False)
    finally:
        os.close(fd)  # closing drops the probe's own lock


def remove_if_writer_gone(path: str) -> bool:
    """Unlink ``path`` if nobody holds its liveness lock; True if this call removed it.

    The unlink happens while holding the lock and only if ``path`` still names the
    locked file. So a writer that creates a file, takes its lock with ``mark_alive`` and
    then finds the path still naming its file (``names_file``) knows no probe can remove
    it. Files we may not open or unlink (another user's) are left alone.
    """
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EACCES, errno.EPERM):
            return False
        raise
    try:
        if not filelock.lock_descriptor(fd, blocking=False) or not names_file(path, fd):
            return False
        try:
            os.unlink(path)
        except (FileNotFoundError, PermissionError):
            return False
        return True
    finally:
        os.close(fd)


def hold_new_file(path: str, fd: int, *, shared: bool = False) -> bool:
    """Take the liveness lock of ``path``, just created as ``fd`` under a fresh name, and
    check that ``path`` still names it: a probe (``remove_if_writer_gone``) may have
    removed it between the creation and the lock. If not held, ``fd`` is closed and the
    name removed: start over under a new one."""
    held = False
    try:
        held = mark_alive(fd, shared=shared) and names_file(path, fd)
    finally:
        if not held:
            os.close(fd)
            unlink_quietly(path)
    return held


def names_file(path: str, fd: int) -> bool:
    """True if ``path`` (not followed if a symlink) is the file open as ``fd``."""
    try:
        found = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)
