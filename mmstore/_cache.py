"""A persistent, cross-process cache of NumPy results on top of a Store.

Layout inside the cache directory (itself a store):

    e/<h2>/<h>                 one entry: the array, or an empty marker whose attrs
                               list the parts of a tuple/list/dict result or of an
                               array larger than _DIRECT_MAX_BYTES (kind "large")
    e/<h2>/..shared.lock       the lock file (writer lock and change counter) that all
                               entries of e/<h2> share: at most 256, however many keys
                               were ever stored (docs/FORMAT.md, "Shared lock files").
                               Caches made before (control-file version 2) keep a
                               .<h>.lock per key: lock files are never unlinked, and a
                               store's reader trusts the change counter of the one it
                               opened, so they stay after their entry goes
    p/<h2>/<h>/<token>/<i>     the parts of such a result (written before the marker)
    p/<h2>/<h>/<token>/.writing  held (flock) by the set writing those parts until its
                               marker is committed: see _cache_values.py
                               (a <token> directory goes with its parts, and <h>
                               with its last <token>)
    .mmstore-cache             shared control file: byte accounting, counters, and an
                               access-time table used to pick the least recently used
    .mmstore-cache-lock        the lock that serialises byte accounting and eviction
    .compute/<stripe>.lock     compute locks: one process computes a missing key while
                               the others wait (a dead computer's flock is released)

``h`` is a BLAKE2b digest of the key. The byte bound (``max_bytes``) works by
reservation: see _cache_eviction.py.

Parts that no entry names and no live set is writing (a set killed before its commit,
a delete or eviction killed before deleting them) are swept by clear() and resync() and
when eviction alone cannot make room; opening a cache sweeps those of killed sets.

The control file's layout is in _cache_control.py; how a value is laid out as entries
and parts in _cache_values.py; every commit and removal of an entry under the cache
lock, with the byte accounting, eviction, expiry and resync() they keep, in
_cache_eviction.py (a base class of Cache).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import numbers
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _keys
from ._cache_control import (
    _CONTROL_NAME,
    _EVICTIONS,
    _HEADER_BYTES,
    _HITS,
    _MISSES,
    _RESERVED,
    _SHARED_LOCKS_SINCE,
    _SLOTS,
    _VERSION_SLOT,
    ENTRY_GROUP,
    _entry_of,
    _open_control,
    shared_lock_groups,
)
from ._cache_eviction import CacheEviction
from ._cache_values import (
    _delete_parts,
    _fresh,
    _hold_part_directory,
    _items_of,
    _let_go_of_part_directory,
    _split,
    _sweep_part_sets,
)
from ._dtypes import encode_dtype
from ._errors import DatasetNotFoundError, FormatError, InvalidArgumentError
from ._locks import DatasetLock
from ._store import Store, _as_timeout

_PUBLISH_SECONDS = 1.0  # a busy process adds its hit/miss counts to the shared ones at least this often
_STRIPES = 4096
# Arrays up to this size are committed as the entry itself, under the cache lock; larger
# ones are written as a part first (outside it) so the lock is never held for long.
_DIRECT_MAX_BYTES = 1 << 20
_MISSING = object()

_live_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


class _TooLargeError(InvalidArgumentError):
    """A value larger than the whole cache: memoize hands such a result back uncached
    (any other refusal of a result is raised, as set() raises it)."""


def _after_fork_in_child() -> None:
    for cache in list(_live_caches):
        cache._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _publish_counts_at_exit() -> None:
    # A process that never closes its cache still adds its hits and misses to stats().
    for cache in list(_live_caches):
        try:
            cache._publish_counts()
        except Exception:
            pass  # exiting: a store already closed or a lock out of reach loses a few counts


class Cache(CacheEviction):
    """A cache of NumPy results shared by every process on the machine, surviving restarts.

    ``max_bytes`` bounds the bytes of cached values (least recently used go
    first): their arrays' bytes, and the JSON text of the Python values kept
    beside them (a str result, a tuple's numbers); ``ttl`` (seconds) is the default time to live. ``lock_timeout``
    bounds how long a process waits for another one computing the same key.
    Hits return read-only arrays mapped from the cache, never copies.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int | None = None,
        ttl: float | None = None,
        *,
        lock_timeout: float | None = 600.0,
        timeout: float | None = 10.0,
        permissions: int | None = None,
    ) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise InvalidArgumentError(f"max_bytes must be positive, not {max_bytes!r}")
        _check_ttl(ttl)
        self.lock_timeout = _as_timeout(lock_timeout, "lock_timeout")
        # Entries share their directory's lock file unless an older cache is there (one
        # made now gets a control file of this version; _open_control checks below).
        try:
            groups = shared_lock_groups(os.path.abspath(os.fspath(path)))
        except OSError as exc:
            raise FormatError(f"cache {os.fspath(path)!r}: cannot read {_CONTROL_NAME}: {exc.strerror}") from None
        self.store = Store(
            path, "a", timeout=timeout, permissions=permissions,
            _shared_lock_groups=(ENTRY_GROUP,) if groups is None else groups,
        )  # fmt: skip
        self.path = self.store.path
        # What the open made is closed again if a later step fails (a control file that
        # is not a cache's, a sweep that meets an unreadable directory ...): the store's
        # descriptors and locks would otherwise stay open, and a fork would still see it.
        try:
            self.max_bytes = max_bytes
            self.ttl = ttl
            self._control = _open_control(self.path, self.store.permissions)
            self._header = np.frombuffer(self._control, dtype="<u8", count=8)
            if (int(self._header[_VERSION_SLOT]) >= _SHARED_LOCKS_SINCE) != bool(self.store._shared_lock_groups):
                # (an older mmstore made the control file between our look and its creation)
                raise FormatError(f"cache {self.path!r}: an older mmstore made it just now; open it again")
            self._access = np.frombuffer(self._control, dtype="<u8", count=_SLOTS, offset=_HEADER_BYTES)
            # The hit path writes through a memoryview (cheaper than a NumPy scalar store)
            # and counts hits and misses locally, adding them to the shared counters in batches.
            self._access_slots = memoryview(self._control)[_HEADER_BYTES : _HEADER_BYTES + _SLOTS * 8].cast("Q")
            self._changes = memoryview(self._control)[_HEADER_BYTES + _SLOTS * 8 :].cast("Q")
            self._views = (self._access_slots, self._changes)  # (released by close())
            # name -> (change counter seen before reading it, value, expiry); least recently used first
            self._hot: OrderedDict[str, tuple[int, Any, float | None]] = OrderedDict()
            self._hot_limit = max(16, self.store._entry_budget // 2)
            self._hits = 0
            self._misses = 0
            self._published_at = time.time()
            self._lock = DatasetLock(
                os.path.join(self.path, _CONTROL_NAME + "-lock"),
                f"cache {self.path!r}",
                self.store.permissions,
                counted=False,
            )
            self._compute_locks: dict[int, DatasetLock] = {}
            self._held = threading.local()
            self._names: dict[Any, tuple[str, int]] = {}
            _sweep_part_sets(self.store, thorough=False)  # (like the store's recovery: killed sets' leftovers)
        except BaseException:
            self._close_failed_open()
            raise
        _live_caches.add(self)

    # --- keys -------------------------------------------------------------------

    def _locate(self, key: Any) -> tuple[str, int]:
        """(entry name, access slot) of a key: a str or bytes, or any value memoize can key
        by value (numbers, None, tuples/lists/dicts of them, NumPy scalars and arrays)."""
        is_str = isinstance(key, str)
        if not is_str and not isinstance(key, bytes):
            # Keyed by value, never remembered: 1, 1.0, True and np.int64(1) are equal
            # dict keys but different cache keys, the same in every process.
            return _entry_of(b"v" + _keys.digest(key).encode())  # ArgumentTypeError if it cannot
        found = self._names.get(key)  # equal strs (or bytes) always encode alike: safe to remember
        if found is None:
            found = _entry_of(b"s" + key.encode("utf-8", "surrogatepass") if is_str else b"b" + bytes(key))
            if len(self._names) > 65536:
                self._names.clear()
            self._names[key] = found
        return found

    # --- reading ----------------------------------------------------------------

    def get(self, key: Any, default: Any = None) -> Any:
        """The cached value (read-only, zero-copy arrays), or ``default`` on a miss."""
        value = self._lookup(key)
        return default if value is _MISSING else value

    def _lookup(self, key: Any, count: bool = True) -> Any:
        """The value, or _MISSING; ``count`` adds the outcome to the hit/miss counts."""
        name, slot = self._locate(key)
        try:
            seen = self._changes[slot]  # read before the entry: a change after it shows up next time
        except ValueError:  # (released by close(): no check on the hit path, which this costs nothing)
            self.store._check_open()
            raise
        hot = self._hot.get(name)
        if hot is not None and hot[0] == seen and not seen & 1:
            expires = hot[2]
            now = time.time()
            if expires is not None and now >= expires:
                self._count(False, count)
                return _MISSING
            self._hot.move_to_end(name)
            self._touch(slot, now, count)
            return _fresh(hot[1])
        value: Any = _MISSING
        for _attempt in range(3):
            try:
                array, entry = self.store._read(name)
            except DatasetNotFoundError:
                break
            attrs = entry.attrs
            now = time.time()
            expires = attrs.get("expires")
            if expires is not None and now >= expires:
                self._count(False, count)
                return _MISSING
            kind = attrs.get("kind", "array")
            value = array if kind == "array" else self._assemble(kind, attrs, array)
            if value is not _MISSING:
                break
            # A part of the entry we read is gone: a set() replacing it deletes the old
            # parts after its commit (or an eviction ran). Read the entry again.
            seen = self._changes[slot]
        if value is _MISSING:
            self._hot.pop(name, None)
            self._count(False, count)
            return _MISSING
        if not seen & 1:
            self._hot[name] = (seen, value, expires)
            self._hot.move_to_end(name)
            while len(self._hot) > self._hot_limit:
                self._hot.popitem(last=False)
        self._touch(slot, now, count)
        return _fresh(value)

    def _touch(self, slot: int, now: float, count: bool = True) -> None:
        """A hit: stamp the entry's access time (LRU, seen by every process) and count it."""
        self._access_slots[slot] = int(now * 1000)
        if count:
            self._hits += 1
            if self._hits >= 1024 or now - self._published_at >= _PUBLISH_SECONDS:
                self._publish_counts()

    def _count(self, hit: bool, count: bool = True) -> None:
        """Count one hit or miss (in this process; added to the shared counters in batches,
        at least every _PUBLISH_SECONDS while the process is busy, and at exit)."""
        if not count:
            return
        if hit:
            self._hits += 1
        else:
            self._misses += 1
        if self._hits + self._misses >= 1024 or time.time() - self._published_at >= _PUBLISH_SECONDS:
            self._publish_counts()

    def _publish_counts(self) -> None:
        """Add this process's hits and misses to the shared counters."""
        self._published_at = time.time()
        if not (self._hits or self._misses) or self.store.closed:
            return
        hits, misses, self._hits, self._misses = self._hits, self._misses, 0, 0
        self._lock.acquire(self.store.timeout)
        try:
            self._header[_HITS] += hits
            self._header[_MISSES] += misses
        finally:
            self._lock.release()

    def _assemble(self, kind: str, attrs: dict[str, Any], array: np.ndarray) -> Any:
        if kind == "scalar":
            return array[()]
        if kind == "float":
            return float(array[()])
        if kind == "json":
            return attrs.get("value")
        parts: list[Any] = []
        for part in attrs.get("parts", ()):
            try:
                parts.append(self.store.get(part))
            except DatasetNotFoundError:
                return _MISSING  # evicted or replaced while we read it
        items = attrs.get("items")
        if items is not None:
            parts = _items_of(items, parts)
        else:  # (an entry written before "items": its scalars all come back as NumPy scalars)
            scalars = attrs.get("scalars") or [False] * len(parts)
            parts = [part[()] if scalar else part for part, scalar in zip(parts, scalars, strict=True)]
        if kind == "large":
            return parts[0]
        if kind == "tuple":
            return tuple(parts)
        if kind == "list":
            return parts
        if kind == "dict":
            return dict(zip(attrs.get("keys", ()), parts, strict=True))
        raise FormatError(f"cache entry of unknown kind {kind!r}")

    def __contains__(self, key: Any) -> bool:
        name, _slot = self._locate(key)
        try:
            _array, entry = self.store._read(name)
        except DatasetNotFoundError:
            return False
        expires = entry.attrs.get("expires")
        return expires is None or time.time() < expires

    def __len__(self) -> int:
        """The number of live entries (expired ones are removed on the way: expiry is lazy,
        but an expired entry is never counted, found or returned)."""
        return self._purge_expired()

    # --- writing ----------------------------------------------------------------

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        """Cache ``value``: an array, a NumPy or Python scalar, or a tuple/list/dict of them."""
        _check_ttl(ttl)
        self.store._check_open()  # (before the shared byte count is touched)
        name, slot = self._locate(key)
        kind, arrays, extra = _split(value)
        for array in arrays:
            encode_dtype(array.dtype)  # UnsupportedDtypeError (object arrays ...) before anything is written
        # Python values kept in the entry's attrs (a str result, a tuple's numbers and
        # strs, a dict's keys) count as the JSON text they are stored as: a cache of str
        # results counted 0 bytes and grew past max_bytes without ever evicting.
        nbytes = sum(array.nbytes for array in arrays) + (len(json.dumps(extra)) if extra else 0)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise _TooLargeError(f"a value of {nbytes} bytes cannot fit in a cache of max_bytes={self.max_bytes}")
        ttl = self.ttl if ttl is None else ttl
        attrs: dict[str, Any] = {"kind": kind, "nbytes": nbytes, "expires": time.time() + ttl if ttl else None}
        if isinstance(key, str) and len(key) <= 512:
            attrs["key"] = key
        attrs.update(extra)
        if kind == "array" and nbytes > _DIRECT_MAX_BYTES:
            attrs["kind"] = kind = "large"
        self._reserve(nbytes)
        base, writing = "", -1
        try:
            if kind in ("tuple", "list", "dict", "large"):
                # Held until the commit: a sweep leaves the parts of a live set alone.
                base, writing = _hold_part_directory(self.path, name, self.store.permissions)
                attrs["parts"] = [f"{base}/{index}" for index in range(len(arrays))]
                for part, array in zip(attrs["parts"], arrays, strict=True):
                    self.store.put(part, array)  # (outside the cache lock: the bulk of the bytes)
                old = self._commit_entry(name, np.zeros(0, np.uint8), attrs)
            else:
                old = self._commit_entry(name, arrays[0] if arrays else np.zeros(0, np.uint8), attrs)
        except BaseException:
            if "parts" in attrs:  # (first: the release below may itself time out on a busy lock)
                _delete_parts(self.store, attrs["parts"])
            self._release(nbytes)
            raise
        finally:
            if writing >= 0:
                _let_go_of_part_directory(self.path, base, writing)
        self._access_slots[slot] = int(time.time() * 1000)
        if old is not None:
            _delete_parts(self.store, old.get("parts", ()))

    def get_or_compute(self, key: Any, compute: Callable[[], Any], ttl: float | None = None) -> Any:
        _check_ttl(ttl)  # (now: set() would refuse it only after the computation, which then goes uncached)
        """The cached value, or ``compute()`` stored and returned. When several processes
        miss the same key at once, one computes and the others wait for its result; a call
        made while this thread computes another key waits for no one (it computes the value
        itself if the key's stripe is taken), so nested computations never deadlock."""
        value = self._lookup(key, count=False)
        if value is not _MISSING:
            self._count(True)
            return value
        name, _slot = self._locate(key)
        stripe = int(name[-8:], 16) % _STRIPES
        held = self._held.__dict__.setdefault("stripes", set())
        if stripe in held:  # a memoized function calling another: this thread already holds it
            self._count(False)
            return self._compute_and_store(key, compute, ttl)
        lock = self._compute_lock(stripe)
        if not held:
            lock.acquire(self.lock_timeout)
        elif not lock.try_acquire():
            # A memoized call inside another, whose stripe someone else holds. Waiting
            # while holding our own stripe could deadlock with a thread or process doing
            # the reverse (stripes are taken in no global order): compute it ourselves.
            self._count(False)
            return self._compute_and_store(key, compute, ttl)
        held.add(stripe)
        try:
            value = self._lookup(key, count=False)
            if value is not _MISSING:
                self._count(True)
                return value  # another process computed it while we waited
            self._count(False)
            return self._compute_and_store(key, compute, ttl)
        finally:
            held.discard(stripe)
            lock.release()

    def _compute_and_store(self, key: Any, compute: Callable[[], Any], ttl: float | None) -> Any:
        result = compute()
        try:
            self.set(key, result, ttl)
        except _TooLargeError:
            return result  # larger than the whole cache: hand it back uncached
        value = self._lookup(key, count=False)
        return result if value is _MISSING else value

    def delete(self, key: Any) -> bool:
        """Remove ``key``; True if it was there."""
        name, _slot = self._locate(key)
        removed = self._remove_entry(name)
        if removed is None:
            return False
        _delete_parts(self.store, removed.get("parts", ()))
        return True

    def clear(self) -> int:
        """Remove every entry; return how many there were. A set in flight keeps its parts
        (deleting them would make it commit a marker naming nothing): its entry comes after."""
        count = 0
        for name in self.store.keys("e"):
            removed = self._remove_entry(name)
            if removed is not None:
                count += 1
                _delete_parts(self.store, removed.get("parts", ()))
        _sweep_part_sets(self.store)
        return count

    def stats(self) -> dict[str, Any]:
        """hits, misses and evictions of all processes (one hit or one miss per get or
        memoized call; each process adds its counts at least once a second while busy, on
        close and at exit, so a running process's last second may not show yet), bytes
        (reserved), live entries (expired ones are removed here), max_bytes."""
        self._publish_counts()
        entries = self._purge_expired()
        return {
            "hits": int(self._header[_HITS]),
            "misses": int(self._header[_MISSES]),
            "evictions": int(self._header[_EVICTIONS]),
            "bytes": int(self._header[_RESERVED]),
            "entries": entries,
            "max_bytes": self.max_bytes,
            "path": self.path,
        }

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's locks and pending counts are not ours."""
        self._lock.forget_after_fork()
        for lock in self._compute_locks.values():
            lock.forget_after_fork()
        self._compute_locks = {}
        self._held = threading.local()
        self._hits = self._misses = 0

    def _compute_lock(self, stripe: int) -> DatasetLock:
        lock = self._compute_locks.get(stripe)
        if lock is None:
            path = os.path.join(self.path, ".compute", f"{stripe:03x}.lock")
            lock = self._compute_locks[stripe] = DatasetLock(
                path,
                f"computation of a cache key in {self.path!r}",
                self.store.permissions,
                keep_open=False,
                counted=False,
            )
        return lock

    # --- memoize --------------------------------------------------------------------

    def memoize(
        self,
        function: Callable[..., Any] | None = None,
        *,
        ttl: float | None = None,
        key: Callable[..., Any] | None = None,
        version: Any = None,
    ) -> Any:
        """Decorator: cache a function's results by its qualified name, ``version`` and arguments.

        Arguments are keyed by value (arrays by dtype, shape and content), bound to the
        function's signature with defaults applied, so ``f(x)``, ``f(x, 3)`` and
        ``f(x, k=3)`` share a result when 3 is ``k``'s default; pass
        ``key=`` (a function of the same arguments) for arguments that have no
        canonical value. Bump ``version`` when the function's code changes.
        A result larger than ``max_bytes`` is returned uncached; one that cannot be
        cached at all (an object array, say) raises the error ``set`` would.
        Functions that share a qualified name share results: closures made by one
        factory (the values they close over are not part of the key) and lambdas
        need a ``version`` or ``key`` of their own.
        """

        _check_ttl(ttl)

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            # A script's functions live in "__main__", but in "__mp_main__" in its spawned
            # workers: key them alike so that workers hit what the parent computed.
            module = "__main__" if func.__module__ == "__mp_main__" else func.__module__
            prefix = f"memo:{module}.{func.__qualname__}:{version!r}:"
            call_digest = _keys.call_digester(func)

            def key_for(*args: Any, **kwargs: Any) -> str:
                if key is not None:
                    return prefix + _keys.digest(key(*args, **kwargs))
                return prefix + call_digest(args, kwargs)

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return self.get_or_compute(key_for(*args, **kwargs), lambda: func(*args, **kwargs), ttl)

            wrapper.cache = self  # type: ignore[attr-defined]
            wrapper.key_for = key_for  # type: ignore[attr-defined]
            return wrapper

        return decorate(function) if function is not None else decorate

    # --- lifetime ---------------------------------------------------------------------

    def _close_failed_open(self) -> None:
        """Close what a failed __init__ opened (the store, the control file's map)."""
        for view in ("_access_slots", "_changes"):
            if view in self.__dict__:
                self.__dict__.pop(view).release()
        self.__dict__.pop("_header", None)
        self.__dict__.pop("_access", None)
        control = self.__dict__.pop("_control", None)
        try:
            if control is not None:
                control.close()
        finally:
            self.store.close()

    def close(self) -> None:
        if self.store.closed:
            return
        self._publish_counts()
        self._hot.clear()
        for view in self._views:
            view.release()
        self.store.close()
        self._lock.close_when_released()
        for lock in list(self._compute_locks.values()):
            lock.close_when_released()
        # The control file's map (and the descriptor it keeps) goes now, not when this
        # object does: a closed cache a decorated function still refers to held it open.
        self._header = self._access = np.zeros(0, "<u8")
        try:
            self._control.close()
        except BufferError:
            pass  # (another thread is inside an operation on it: the map goes with its last array)

    def __del__(self) -> None:
        # A cache dropped without close() still adds its hits and misses to stats().
        try:
            if (self._hits or self._misses) and not self.store.closed:
                self._publish_counts()
        except Exception:
            pass

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mmstore.Cache {self.path!r} max_bytes={self.max_bytes} ttl={self.ttl}>"


def _check_ttl(ttl: Any) -> None:
    """A time to live is None (the default) or a positive, finite number of seconds (0 or
    less would be a mistake, not "forever"; infinity cannot be recorded)."""
    if ttl is None:
        return
    if isinstance(ttl, bool) or not isinstance(ttl, numbers.Real) or not 0 < float(ttl) < math.inf:
        raise InvalidArgumentError(f"ttl must be a positive, finite number of seconds or None, not {ttl!r}")
