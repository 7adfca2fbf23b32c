"""Wake-ups for followers: inotify on the data file, with a polling fallback.

A writer publishes a flush with a small pwrite() to the data file's control
block. The kernel turns every write() into an IN_MODIFY event for anyone
watching the file, so a follower blocked in poll() on an inotify descriptor
wakes within microseconds and burns no CPU while it waits. Watching needs only
read permission, so read-only followers wake the same way. Events are queued
from the moment the watch exists, so a check-then-wait loop cannot miss one.

Where inotify is unavailable (not Linux, out of instances, a network file
system whose remote writers the kernel never sees) Waiter falls back to
sleeping with a short exponential backoff.
"""

from __future__ import annotations

import ctypes
import os
import select
import threading
import time
import weakref
from typing import Any

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400

_FALLBACK_FIRST_SLEEP = 50e-6
_FALLBACK_MAX_SLEEP = 5e-3
# poll() takes a C int of milliseconds (~24.8 days): a longer wait is waited in chunks
# (wait() returns after one, and the caller, which keeps the deadline, waits again).
_MAX_POLL_MILLISECONDS = 2**31 - 1


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()


def _close_descriptors(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Waiter:
    """Block until one of the watched files changes (or a timeout passes).

    A waiter dropped without close() (its reader gone out of scope) closes its inotify
    descriptor when collected: the per-user limit on inotify instances is small (128 by
    default), and every follower beyond it falls back to polling.

    close() from another thread wakes a wait() blocked in poll() through an eventfd in
    the poll set; the descriptors are then closed by the last thread to leave wait()
    (closing them under a poll() would let their numbers go to other files, which the
    poll would then watch and drain)."""

    def __init__(self, file_paths: list[str], directory_paths: list[str]) -> None:
        self._fd = -1
        self._wake_fd = -1
        self._poll: Any = None
        self._sleep = _FALLBACK_FIRST_SLEEP
        # Reentrant: close() may come from a signal handler while this thread is in wait().
        self._guard = threading.RLock()
        self._waiting = 0  # threads inside poll()
        self._closed = False
        if _libc is None or not hasattr(os, "eventfd"):
            return
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return
        try:
            for path in file_paths:
                if _libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF) < 0:
                    raise OSError(ctypes.get_errno(), "inotify_add_watch")
            for path in directory_paths:
                if _libc.inotify_add_watch(fd, os.fsencode(path), IN_MOVED_TO | IN_CREATE | IN_DELETE) < 0:
                    raise OSError(ctypes.get_errno(), "inotify_add_watch")
            wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            os.close(fd)
            return
        self._fd, self._wake_fd = fd, wake_fd
        self._release = weakref.finalize(self, _close_descriptors, (fd, wake_fd))
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(wake_fd, select.POLLIN)

    @property
    def uses_inotify(self) -> bool:
        return self._fd >= 0

    def wait(self, timeout: float | None) -> None:
        """Return after an event, after ``timeout`` seconds, or (fallback) after a short sleep."""
        if self._fd < 0:
            if self._closed:
                return
            pause = self._sleep if timeout is None else min(self._sleep, max(timeout, 0.0))
            time.sleep(pause)
            self._sleep = min(self._sleep * 2, _FALLBACK_MAX_SLEEP)
            return
        if timeout is None:
            milliseconds = None
        elif timeout * 1000 >= _MAX_POLL_MILLISECONDS:  # (infinity too)
            milliseconds = _MAX_POLL_MILLISECONDS
        else:
            milliseconds = max(0, int(timeout * 1000 + 0.999))
        with self._guard:
            if self._closed:
                return
            self._waiting += 1
        try:
            if self._poll.poll(milliseconds) and not self._closed:
                self.drain()
        finally:
            with self._guard:
                self._waiting -= 1
                last_out = self._closed and not self._waiting
            if last_out:
                self._close_descriptors()

    def drain(self) -> None:
        """Discard the queued events (their content does not matter, only that they came)."""
        if self._fd < 0:
            self._sleep = _FALLBACK_FIRST_SLEEP
            return
        try:
            # One read takes every queued event (each is 16 bytes plus a short name);
            # reading again until EAGAIN would only cost a failing system call.
            os.read(self._fd, 65536)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close the waiter; a wait() under way in another thread returns at once."""
        with self._guard:
            if self._closed:
                return
            self._closed = True
            if self._waiting:
                os.eventfd_write(self._wake_fd, 1)  # the last thread out of poll() closes the descriptors
                return
        self._close_descriptors()

    def close_in_child(self) -> None:
        """In a forked child: close our copies of the descriptors (no thread of ours waits)."""
        self._closed = True
        self._close_descriptors()

    def _close_descriptors(self) -> None:
        if self._fd >= 0:
            self._fd = self._wake_fd = -1
            self._release()  # (once: a finalizer runs at most once)
