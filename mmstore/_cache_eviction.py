"""The cache's byte bound: every commit and removal of an entry, reservation, eviction,
expiry and resync.

The byte bound works by *reservation*: an insert reserves its bytes (evicting
least-recently-used entries first, under the cache lock) before it writes, and a
removal releases them after it deletes, so the committed entries never exceed
``max_bytes``. A process killed between the two steps leaves bytes reserved that
nothing uses; that errs on the safe side, and ``Cache.resync()`` recounts when no
other process is writing.

Every commit, deletion and eviction of an entry is made under the cache lock, which
also reads the attrs of the entry it replaces or removes and releases that entry's
bytes: so each entry's bytes are released exactly once, however many processes
replace or delete it at once. The bulk of a large value (its parts) is written
before, outside the lock; only a small entry is committed under it.

CacheEviction is a base class of Cache (_cache.py), which sets the attributes
declared below.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ._cache_control import _EVICTIONS, _RESERVED, _Change, _slot_of
from ._cache_values import _delete_parts, _sweep_part_sets
from ._errors import DatasetNotFoundError, FormatError, MmstoreError
from ._locks import DatasetLock
from ._store import Store


class CacheEviction:
    """Cache's byte accounting: entries committed and removed under the cache lock,
    bytes reserved and released, least-recently-used eviction, expiry, resync()."""

    store: Store
    path: str
    max_bytes: int | None
    _lock: DatasetLock
    _header: np.ndarray
    _access: np.ndarray
    _changes: memoryview

    def _entry_attrs(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.store.header(name).attrs)
        except (DatasetNotFoundError, FormatError):
            return None

    def _commit_entry(self, name: str, array: np.ndarray, attrs: dict[str, Any]) -> dict[str, Any] | None:
        """Commit entry ``name`` (its bytes reserved) and release the bytes of the entry it
        replaces, whose attrs are read under the same cache lock: each replaced byte is
        released exactly once, however many processes set the key at once. Returns the
        replaced entry's attrs (its parts are the caller's to delete), or None."""
        self._lock.acquire(self.store.timeout)
        try:
            old = self._entry_attrs(name)
            change = self._changing(name)
            change.begin()
            try:
                self.store.put(name, array, attrs=attrs)
            finally:
                change.end()
            if old is not None:
                self._header[_RESERVED] = max(0, int(self._header[_RESERVED]) - int(old.get("nbytes", 0)))
            return old
        finally:
            self._lock.release()

    def _remove_entry(self, name: str, expired_at: float | None = None) -> dict[str, Any] | None:
        """Delete entry ``name`` and release its bytes, reading its attrs under the same
        cache lock (so a concurrent set or delete cannot make us release another entry's
        bytes, or the same ones twice); its attrs, or None if it was not there. With
        ``expired_at``, only an entry expired by then is deleted. Parts are the caller's."""
        self._lock.acquire(self.store.timeout)
        try:
            attrs = self._entry_attrs(name)
            if expired_at is not None:
                expires = None if attrs is None else attrs.get("expires")
                if expires is None or expired_at < expires:
                    return None  # replaced by a live entry since it was listed
            if not self._delete_entry(name):
                return None
            attrs = attrs or {}
            self._header[_RESERVED] = max(0, int(self._header[_RESERVED]) - int(attrs.get("nbytes", 0)))
            return attrs
        finally:
            self._lock.release()

    def _delete_entry(self, name: str) -> bool:
        """Delete entry ``name`` (its marker or array), bracketed by its change counter;
        True if it was there. The caller holds the cache lock; parts and byte accounting
        are its own."""
        change = self._changing(name)
        change.begin()
        try:
            self.store.delete(name)
        except DatasetNotFoundError:
            return False
        finally:
            change.end()
        return True

    def _changing(self, name: str) -> _Change:
        """Bracket a change of entry ``name`` with two bumps of its change counter (the
        caller holds the cache lock)."""
        return _Change(self._changes, _slot_of(name))

    def _purge_expired(self) -> int:
        """Delete every expired entry, releasing its bytes; return how many live ones remain."""
        live = 0
        for used, name, _nbytes, _parts in self._entries():
            if used >= 0:
                live += 1
                continue
            removed = self._remove_entry(name, expired_at=time.time())
            if removed is not None:
                _delete_parts(self.store, removed.get("parts", ()))
        return live

    def _reserve(self, nbytes: int) -> None:
        """Reserve room for ``nbytes``, evicting least-recently-used entries first."""
        self._lock.acquire(self.store.timeout)
        try:
            if self.max_bytes is not None and int(self._header[_RESERVED]) + nbytes > self.max_bytes:
                self._evict(int(self._header[_RESERVED]) + nbytes - self.max_bytes)
                if int(self._header[_RESERVED]) + nbytes > self.max_bytes:
                    self._resync_locked()
                    if int(self._header[_RESERVED]) + nbytes > self.max_bytes:
                        raise MmstoreError(
                            f"cache {self.path!r} is full: {int(self._header[_RESERVED])} bytes are reserved "
                            f"by writes in progress; cannot add {nbytes}"
                        )
            self._header[_RESERVED] += nbytes
        finally:
            self._lock.release()

    def _release(self, nbytes: int) -> None:
        if not nbytes:
            return
        self._lock.acquire(self.store.timeout)
        try:
            self._header[_RESERVED] = max(0, int(self._header[_RESERVED]) - nbytes)
        finally:
            self._lock.release()

    def _entries(self) -> list[tuple[float, str, int, Any]]:
        """(last use, name, nbytes, parts) of every entry; expired ones sort first."""
        now = time.time()
        found = []
        for name in self.store.keys("e"):
            try:
                header = self.store.header(name)
            except (DatasetNotFoundError, FormatError):
                continue
            attrs = header.attrs
            expires = attrs.get("expires")
            slot = _slot_of(name)
            used = max(header.modified, int(self._access[slot]) / 1000)
            if expires is not None and now >= expires:
                used = -1.0
            found.append((used, name, int(attrs.get("nbytes", 0)), attrs.get("parts", ())))
        found.sort()
        return found

    def _evict(self, needed: int) -> None:
        """Delete least-recently-used entries (expired first) until ``needed`` bytes are free."""
        freed = 0
        for _used, name, nbytes, parts in self._entries():
            if freed >= needed:
                break
            if not self._delete_entry(name):
                continue
            _delete_parts(self.store, parts)
            freed += nbytes
            self._header[_RESERVED] = max(0, int(self._header[_RESERVED]) - nbytes)
            self._header[_EVICTIONS] += 1

    def _resync_locked(self) -> None:
        _sweep_part_sets(self.store)
        self._header[_RESERVED] = sum(nbytes for _used, _name, nbytes, _parts in self._entries())

    def resync(self) -> int:
        """Recount the reserved bytes from the entries (use when no other process is
        writing, e.g. after a crash left bytes reserved) and delete the parts of values
        whose set or deleter was killed; return the new figure."""
        self._lock.acquire(self.store.timeout)
        try:
            self._resync_locked()
            return int(self._header[_RESERVED])
        finally:
            self._lock.release()
