"""Reading a store: the cache of sidecar entries, and get().

A store keeps, per dataset it has read, an *entry* (_entries.py): the parsed
header, a descriptor that pins the sidecar's inode, and the map of the data
file. A repeated get() trusts an entry while the dataset's change counter
(_locks.py) still shows the value it was found current with (one pread());
otherwise one stat() of the sidecar tells whether it changed, and only a
changed sidecar is read again. Entries are bounded per process: the open
stores share a descriptor budget, and the store holding most gives up its
least recently used first.

StoreReads is the base class of Store (_store.py), which sets the attributes
declared below.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar, overload

import numpy as np

from . import _durable
from ._entries import _Entry, _Location, _read_fd
from ._errors import ClosedError, DatasetNotFoundError, FormatError, access_denied
from ._format import Header
from ._locks import COUNTER_BYTES
from ._maps import ChecksumMismatch, MissingDataFile, _Mapped, data_file_error, validate_length
from ._names import validate_name

_pread = os.pread  # (a module global: the repeated get's one system call)
_REQUIRED: Any = object()  # get() without a default
_T = TypeVar("_T")

# The open stores of this process, by id (a store leaves at close() or when collected).
# A dict rather than a WeakSet: "is this the only open store?" is asked on every
# dataset's first read, and a WeakSet's len() and membership test are Python code.
_live_stores: dict[int, weakref.ref[StoreReads]] = {}


def open_stores() -> list[StoreReads]:
    return [store for store in (ref() for ref in list(_live_stores.values())) if store is not None]


class StoreReads:
    """Store's reading half: locating datasets, the entry cache, get()."""

    path: str
    permissions: int | None
    _closed: bool
    _entries: OrderedDict[str, _Entry]
    _entry_budget: int
    _locations: dict[str, _Location]
    _locations_guard: threading.Lock
    _parse_sidecar: Callable[[str, bytes], Header]
    _shared_lock_groups: tuple[str, ...]  # datasets under these share their directory's lock file

    def _locate(self, name: str) -> _Location:
        """The location of a dataset name, validating the name on first use."""
        location = self._locations.get(name)
        if location is None:
            if self._closed:
                self._check_open()
            validate_name(name)
            if len(self._locations) >= self._entry_budget:
                with self._locations_guard:
                    self._forget_idle_locations()
            # setdefault is atomic: threads racing on a new name all get the one stored.
            shared = bool(self._shared_lock_groups) and name.startswith(self._shared_lock_groups)
            location = self._locations.setdefault(name, _Location(self.path, name, self.permissions, shared))
            if self._closed:  # close() ran meanwhile: it would not see this location's lock
                self._locations.pop(name, None)
                self._check_open()
        return location

    def _forget_idle_locations(self) -> None:
        """Drop the older half of the remembered locations whose locks are not held."""
        for name in list(self._locations)[: self._entry_budget // 2]:
            location = self._locations.get(name)
            if location is not None and (location._lock is None or location._lock.close_if_idle()):
                self._locations.pop(name, None)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"store {self.path!r} is closed")

    def _missing(self, name: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(f"no dataset {name!r} in store {self.path!r}")

    @overload
    def get(self, name: str) -> np.ndarray: ...

    @overload
    def get(self, name: str, default: _T) -> np.ndarray | _T: ...

    def get(self, name: str, default: Any = _REQUIRED) -> Any:
        """Return the dataset as a read-only array mapped from its data file (no copy).

        The array stays valid after the dataset is replaced or deleted and after
        the store is closed: it keeps mapping the generation it was read from.
        Never stale: a repeated get reads the dataset's change counter (one
        pread(), see _locks.py) to learn whether any writer has taken its lock
        since the last call. A missing dataset raises DatasetNotFoundError (a
        KeyError), or returns ``default`` if one is given (as dict.get does).
        """
        entry = self._unchanged_entry(name)
        if entry is None:
            if default is _REQUIRED:
                return self._read(name, checked=True)[0]
            try:
                return self._read(name, checked=True)[0]
            except DatasetNotFoundError:
                return default
        mapped = entry.mapped
        if mapped is not None and not entry.header.growable:
            return mapped.rows[...]  # a new view: callers cannot reshape each other's arrays
        return self._read(name, entry)[0]

    def _read(self, name: str, entry: _Entry | None = None, checked: bool = False) -> tuple[np.ndarray, Header]:
        """get(), also returning the header the array belongs to. ``entry``: one found
        current just now; ``checked``: _unchanged_entry() just said None."""
        location = self._locate(name)
        if entry is None:
            if checked:
                entry = self._recheck_entry(location, map_data=True)
            else:
                entry = self._current_entry(location, map_data=True)
        mapped = entry.mapped  # (read once: another thread may replace the entry's map)
        if mapped is None:
            entry, mapped = self._map_entry(location, entry)
        if not entry.header.growable:
            return mapped.rows[...], entry.header
        entry, mapped, length = self._map_committed(location, entry, mapped)
        return mapped.rows[:length], entry.header

    def _map_committed(self, location: _Location, entry: _Entry, mapped: _Mapped | None) -> tuple[_Entry, _Mapped, int]:
        """(entry, map, committed length) of a dataset whose entry was found current, the
        length read from the map actually used. That map may belong to a newer entry (a
        replacement between reading the sidecar and mapping), or be too small for the
        length read from it: the writer grew the file and flushed since the map was made
        (or a newer generation's writer grew that one before we read its length), so it
        is mapped again. ``mapped``: the entry's map, if it has one."""
        mapped_before: tuple[_Entry, int] | None = None
        for _attempt in range(1000):
            if mapped is None:
                entry, mapped = self._map_entry(location, entry)
            length = mapped.committed_length(entry.header)
            if length <= mapped.capacity or mapped_before == (entry, mapped.size):
                return entry, mapped, validate_length(entry.header, mapped, length)
            mapped_before = (entry, mapped.size)  # (a new map of the same, unchanged file that does not fit: corrupt)
            mapped = None
        raise FormatError(f"dataset {location.name!r}: its data file grew too often to read a consistent length")

    def _map_entry(self, location: _Location, entry: _Entry) -> tuple[_Entry, _Mapped]:
        """Map the entry's data file. If it vanished (or a packed generation's bytes no
        longer match its checksum) because a commit or a writer changed the dataset
        between our reading the sidecar and mapping, read the new sidecar and try
        again; the same problem under an unchanged sidecar is a corrupt dataset."""
        for _attempt in range(1000):
            try:
                return entry, self._map_data(location, entry, None)
            except (MissingDataFile, ChecksumMismatch):
                newer = self._current_entry(location)
                if newer is entry:
                    raise
                entry = newer
        raise FormatError(f"dataset {location.name!r}: replaced too often to read a consistent generation")

    def _map_data(self, location: _Location, entry: _Entry, directory_fd: int | None) -> _Mapped:
        """Map the entry's data file, as the entry's map from now on (other threads may be
        reading its previous one: it stays valid), and return the map."""
        fd = self._open_data(location, entry.header, directory_fd)
        try:
            mapped = entry.mapped = _Mapped(entry.header, "", writable=False, fd=fd)
        finally:
            os.close(fd)
        return mapped

    def _open_data(self, location: _Location, header: Header, directory_fd: int | None = None) -> int:
        """Open the header's data file for reading, never through a symlink (FormatError)."""
        try:
            return location.open_file(header.data_file, _durable.READ_FLAGS, directory_fd)
        except OSError as exc:
            raise data_file_error(header, exc) from None

    def _current_entry(self, location: _Location, map_data: bool = False, counted: bool = True) -> _Entry:
        """The entry of the committed sidecar, re-reading it only if it changed
        (and, with ``map_data``, mapping the data file of a re-read entry).

        An entry whose change counter still shows the value seen before it was last
        found current is current: no writer has taken the dataset's lock since. Else
        one stat() of the sidecar tells, and the counter read just before it becomes
        the entry's (``counted=False``: not for a writer holding the lock).
        """
        entry = self._unchanged_entry(location.name)
        if entry is not None:
            return entry
        return self._recheck_entry(location, map_data, counted)

    def _recheck_entry(self, location: _Location, map_data: bool = False, counted: bool = True) -> _Entry:
        """_current_entry() after its counter check failed: stat() the sidecar."""
        name = location.name
        entries = self._entries
        entry = entries.get(name)
        if entry is not None:
            counter = entry.read_counter(location) if counted else None
            try:
                st = os.stat(location.sidecar)
            except (FileNotFoundError, NotADirectoryError):
                self._drop_entry(name)
                raise self._missing(name) from None
            except PermissionError:
                raise access_denied(name, "its sidecar", location.sidecar) from None
            if entries.get(name) is not entry:
                counter = None  # (its descriptor may have been closed before the read)
            elif entry.is_file(st):
                if counter is not None:
                    entry.counter = counter
                return entry
            # Changed: the sidecar read next is at least as new as the counter read before it.
            return self._read_entry(location, map_data, counter)
        return self._read_entry(location, map_data)

    def _unchanged_entry(self, name: str) -> _Entry | None:
        """The cached entry of ``name`` if its change counter shows that no writer has
        taken the dataset's lock since it was found current (no stat), else None. Also
        marks the entry recently used."""
        entries = self._entries
        entry = entries.get(name)
        if entry is None:
            return None
        try:
            entries.move_to_end(name)
        except KeyError:
            return None  # another thread dropped it just now
        counter = entry.counter
        if counter is None:
            return None
        try:
            # Still cached after the read: its descriptors were open all along (a popped
            # entry's are closed, and their numbers could go to other files).
            if _pread(entry.counter_fd, COUNTER_BYTES, 0) == counter and entries.get(name) is entry:
                return entry
        except OSError:
            pass
        return None

    def _read_entry(self, location: _Location, map_data: bool = False, counter: bytes | None = None) -> _Entry:
        """Read and remember the committed sidecar. Its directory is reached once, without
        following group symlinks, and ``map_data`` maps the data file through the same
        directory descriptor (one walk for both files). ``counter``: the dataset's change
        counter, even, read before this call (the new entry keeps it)."""
        # Every dataset's first read in a process comes here: kept to few calls and lookups.
        if self._closed:
            self._check_open()
        name = location.name
        directory_fd = None
        try:
            try:
                directory_fd = location.open_directory()
                fd = location.open_file(location.leaf + ".json", _durable.READ_FLAGS, directory_fd)
            except (FileNotFoundError, NotADirectoryError):
                self._drop_entry(name)
                raise self._missing(name) from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise FormatError(f"dataset {name!r}: sidecar is a symlink; refusing to follow it") from None
                if isinstance(exc, PermissionError):
                    raise access_denied(name, "its sidecar", location.sidecar) from None
                raise
            try:
                # Read first: a sidecar that parses needs no fstat() (its identity is found
                # when a recheck first needs it). Whatever fails is first asked whether it is
                # a regular file at all (a directory, a FIFO or a device planted there).
                try:
                    header = self._parse_sidecar(name, _read_fd(fd))
                except (OSError, FormatError):
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise FormatError(f"dataset {name!r}: sidecar is not a regular file") from None
                    raise
            except BaseException:
                os.close(fd)
                raise
            entry = _Entry(header, fd)
            entry.counter = counter
            self._remember(name, entry)
            if map_data:
                try:
                    self._map_data(location, entry, directory_fd)
                except (MissingDataFile, ChecksumMismatch):
                    pass  # changed since we read the sidecar? _map_entry reads it again
        finally:
            if directory_fd is not None:
                os.close(directory_fd)
        return entry

    def _remember(self, name: str, entry: _Entry) -> None:
        entries = self._entries
        old = entries.pop(name, None)
        if old is not None:
            old.close(successor=entry)
        # The descriptor budget is per process: the open stores share it, and the one
        # holding the most entries gives up its least recently used first.
        while self._entries_in_process() >= self._entry_budget:
            largest = max(open_stores(), key=lambda store: len(store._entries), default=self)
            try:
                _oldest, evicted = largest._entries.popitem(last=False)
            except KeyError:  # (empty, or emptied by another thread just now)
                break
            evicted.close()
        # Insert without overwriting: another thread may be remembering the same name
        # (an overwritten entry's descriptor would leak). Whoever pops an entry closes
        # its descriptor, so each is closed exactly once. No lock: these are atomic.
        while entries.setdefault(name, entry) is not entry:
            displaced = entries.pop(name, None)
            if displaced is not None:
                displaced.close()
        if self._closed and entries.get(name) is entry:
            # close() ran meanwhile (it marks the store closed before emptying the cache):
            # nothing may stay cached in a closed store.
            self._drop_entry(name)

    def _entries_in_process(self) -> int:
        if len(_live_stores) == 1 and id(self) in _live_stores:  # the common case
            return len(self._entries)
        return sum(len(store._entries) for store in open_stores())

    def _drop_entry(self, name: str) -> None:
        old = self._entries.pop(name, None)
        if old is not None:
            old.close()

    def header(self, name: str) -> Header:
        """The current parsed header of ``name`` (refreshed if another process committed)."""
        return self._current_entry(self._locate(name)).header
