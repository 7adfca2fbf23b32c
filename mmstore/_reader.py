"""Readers of growable datasets: the committed rows, refreshed, waited for, followed.

A Reader maps the committed prefix of a growable dataset (invariant 3: never the rows
beyond the committed length) and follows its writer: ``refresh()`` takes the length the
writer last published, ``wait()`` sleeps on the publish count (inotify, see _notify.py)
until enough rows are committed, ``follow()`` yields every new block of rows once, in
order, and starts again at row 0 when the dataset is replaced.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import ClosedError, InvalidArgumentError
from ._format import Header
from ._locks import as_seconds
from ._maps import _Mapped
from ._notify import Waiter

if TYPE_CHECKING:
    from ._entries import _Entry, _Location
    from ._store import Store


def _generation_of(header: Any) -> tuple[str, int, int]:
    """What tells one generation of a dataset from every other: its generation number
    restarts at 1 after a delete and a create, but its data file's name (a fresh token)
    is never reused; generations packed into one data file differ in number and offset."""
    return header.data_file, header.generation, header.offset


class Reader:
    """Follows one dataset: ``array`` is its committed prefix as of the last refresh."""

    _header: Header
    _mapped: _Mapped

    def __init__(self, store: Store, location: _Location) -> None:
        self._store = store
        self._location = location
        self._waiter: Waiter | None = None
        self._waiter_pid = os.getpid()
        self._closed = False
        self.name = location.name
        self._load(store._current_entry(location), first=True)

    def _load(self, entry: _Entry, first: bool = False) -> None:
        """Follow ``entry`` (the current one): map its data file (again) and take the
        committed length from the map actually used, as Store._read does. That map may
        belong to a newer entry than ``entry`` (a replacement between our reading the
        sidecar and mapping), or be too small for the length read from it (the writer
        grew the file and flushed since the map was made: map again)."""
        entry, mapped, length = self._store._map_committed(self._location, entry, entry.mapped)
        header = entry.header
        waiter = self._waiter
        if not first and waiter is not None and _generation_of(header) != _generation_of(self._header):
            waiter.close()  # it watches the old generation's data file
            self._waiter = None
        self._header, self._mapped, self._length = header, mapped, length
        self._published = mapped.published()

    @property
    def generation(self) -> int:
        return self._header.generation

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._header.dtype

    @property
    def array(self) -> np.ndarray:
        """The committed rows (read-only, zero-copy) as of the last refresh()/wait()."""
        rows = self._mapped.rows
        return rows[: self._length] if self._header.shape else rows

    def __len__(self) -> int:
        return self._length

    def refresh(self) -> int:
        """Pick up new commits (a flush, or a replacement of the dataset); return the length."""
        if self._closed:
            raise ClosedError(f"reader of dataset {self.name!r} is closed")
        entry = self._store._current_entry(self._location)
        header = entry.header
        if _generation_of(header) == _generation_of(self._header):
            mapped = self._mapped
            length = mapped.committed_length(header)
            if length <= mapped.capacity:  # (the usual case: the same map still covers it)
                self._header, self._length = header, length
                self._published = mapped.published()
                return length
        self._load(entry)  # a new generation, or rows past our map: map again
        return self._length

    def wait(self, min_len: int | None = None, timeout: float | None = None, *, min_length: int | None = None) -> bool:
        """Block until the dataset has at least ``min_len`` committed rows (without
        ``min_len``: until any new commit), or until it is replaced by a new
        generation. Return False if ``timeout`` passed first. (``min_length`` is
        another name for ``min_len``.)"""
        if min_length is not None:
            if min_len is not None and min_len != min_length:
                raise InvalidArgumentError(f"min_len={min_len!r} and min_length={min_length!r} disagree; give one")
            min_len = min_length
        min_length = min_len
        timeout = as_seconds(timeout, "timeout")
        generation, published, length = _generation_of(self._header), self._published, self._length
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.refresh()
            if _generation_of(self._header) != generation:
                return True
            if min_length is not None:
                if self._length >= min_length:
                    return True
            elif (self._published, self._length) != (published, length):
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            waiter = self._waiter  # (once: close() in another thread may drop it)
            if waiter is not None and self._waiter_pid != os.getpid():
                waiter.close_in_child()  # forked: the inotify instance is shared with the parent
                self._waiter = waiter = None
            if waiter is None:
                self._waiter_pid = os.getpid()
                directory = self._location.directory
                self._waiter = waiter = Waiter([self._location.data_path(self._header.data_file)], [directory])
                if self._closed:  # close() ran meanwhile and found no waiter to close
                    self._waiter = None
                    waiter.close()
                continue  # re-check: a commit may have landed before the watch existed
            # close() of the reader (Store.close() closes its readers) wakes it at once.
            waiter.wait(remaining)

    def follow(self, start: int = 0, idle_timeout: float | None = None) -> Iterator[np.ndarray]:
        """Yield blocks of newly committed rows, in order, each exactly once.

        Starts at row ``start``; stops after ``idle_timeout`` seconds without a
        new commit (never, by default, or with infinity). If the dataset is
        replaced, following continues from row 0 of the new generation.
        """
        return self._follow(start, as_seconds(idle_timeout, "idle_timeout"))  # (checked now, not at first next())

    def _follow(self, start: int, idle_timeout: float | None) -> Iterator[np.ndarray]:
        position = start
        generation = _generation_of(self._header)
        self.refresh()
        while True:
            if _generation_of(self._header) != generation:
                generation, position = _generation_of(self._header), 0
            if self._length > position:
                block = self.array[position : self._length]
                position = self._length
                yield block
                self.refresh()
                continue
            # wait() refreshes, so the loop goes on with the state it found.
            if not self.wait(position + 1, idle_timeout):
                return

    def close(self) -> None:
        """Stop following; a wait() (or follow()) blocked in another thread raises ClosedError."""
        self._closed = True  # (first: a wait() that makes a waiter after this closes it)
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            if self._waiter_pid != os.getpid():
                waiter.close_in_child()  # (forked: waking it would wake the parent's wait)
            else:
                waiter.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.follow()

    def __repr__(self) -> str:
        return f"<mmstore.Reader {self.name!r} generation {self._header.generation}, {self._length} rows>"
