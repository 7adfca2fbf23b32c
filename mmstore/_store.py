"""The Store: a directory of datasets shared through the page cache.

Commit protocol for ``put`` (see _durable.py for the ordering and
docs/FORMAT.md for the files):

1. Outside any lock: create ``<leaf>.<token>.dat`` exclusively, hold a liveness
   flock on it (so recovery knows its writer is alive), write the bytes and
   their CRC-32.
2. Under the dataset's writer lock: read the current header (for the next
   generation number), write the new sidecar to a temp file, swap it in.
3. After the lock: drop the liveness lock and unlink the old generation's data
   file. Readers that still map it keep a consistent old snapshot.

With ``Store(..., pack_small=True)``, small arrays (at most PACK_MAX_NBYTES) are
packed instead (an opt-in: it trades invariant 2's file per generation for a
region per generation, see docs/FORMAT.md): under the dataset's
lock, the new generation is appended to the dataset's current packed data file
after the committed generation (never over it), and the sidecar is swapped in.
That saves the creation of a data file and the unlink of the old one, the two
most expensive system calls of a small put. A packed file rolls over to a new
one (and the old is unlinked) once the next generation would end beyond
PACK_FILE_BYTES, which bounds the space that replaced generations hold.
"""

from __future__ import annotations

import copy
import errno
import math
import os
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np

from . import _durable, _mapping, _names
from ._entries import (
    _close_quietly,
    _collect_names,
    _descriptor_budget,
    _Entry,
    _first_symlink,
    _Location,
    _read_fd,
    _with_parents,
)
from ._errors import (
    ClosedError,
    DatasetNotFoundError,
    FormatError,
    FsyncError,
    InvalidArgumentError,
    InvalidNameError,
    MmstoreError,
    ReadOnlyError,
    StoreExistsError,
    StoreIOError,
    StoreNotFoundError,
)
from ._format import (
    MANIFEST_NAME,
    MAX_SIDECAR_BYTES,
    PACKED_ALIGNMENT,
    XXH3_ALGORITHM,
    Header,
    as_dtype,
    encode_attrs,
    encode_dtype,
    manifest_bytes,
    parse_header,
    parse_manifest,
    successor_header,
)
from ._growable import ChecksumMismatch, MissingDataFile, Reader, Writer, _Mapped, data_file_error, validate_length
from ._locks import COUNTER_BYTES, DatasetLock, mark_alive
from ._names import validate_name

if TYPE_CHECKING:
    from ._recovery import VerifyReport

_MODES = ("r", "r+", "a", "w-", "x")


_MAX_CACHED_DATASETS = _descriptor_budget()

_VANISHED = object()

_pread = os.pread  # (a module global: the repeated get's one system call)

# Data files at least this large get their blocks reserved before the write (_durable.preallocate).
PREALLOCATE_BYTES = 1 << 20

# Small-put packing (see the module docstring and docs/FORMAT.md, "Packed data files").
PACK_MAX_NBYTES = 16 * 1024
PACK_FILE_BYTES = 64 * 1024

# The open stores of this process, by id (a store leaves at close() or when collected).
# A dict rather than a WeakSet: "is this the only open store?" is asked on every
# dataset's first read, and a WeakSet's len() and membership test are Python code.
_live_stores: dict[int, weakref.ref[Store]] = {}
_warmed_up = False  # Store._warm_up has run in this process
_REQUIRED: Any = object()  # Store.get without a default
_T = TypeVar("_T")


# Two sidecars in the form put writes, for _warm_up: the commonest dtype with every optional
# field set, and the manifest's bytes seen as a dataset of that many bytes. Constants, not
# Header.to_json(): encoding dtypes is the writers' cold path, which readers never need.
_WARM_UP_SIDECAR = (
    b'{"format":"mmstore-dataset","version":1,"name":"warm-up","dtype":"<f8","shape":[1],"byteorder":"<",'
    b'"data_file":"mmstore.json","offset":0,"generation":1,"growable":false,"checksum":"xxh3_64:0000000000000000",'
    b'"attrs":{"unit":"s"},"created":1.5,"modified":1.5}\n'
)
_WARM_UP_MANIFEST = (
    b'{"format":"mmstore-dataset","version":1,"name":"warm-up","dtype":"|u1","shape":[%d],"byteorder":"|",'
    b'"data_file":"mmstore.json","offset":0,"generation":1,"growable":false,"checksum":null,'
    b'"attrs":{},"created":1.5,"modified":1.5}\n'
)


_MANIFEST_LEAF = MANIFEST_NAME.removesuffix(".json")


def _as_timeout(value: Any, what: str) -> float:
    """A lock wait in seconds: None (or a negative number) is -1, wait forever."""
    if value is None:
        return -1.0
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a number of seconds or None, not {value!r}") from None
    if math.isnan(seconds):
        raise InvalidArgumentError(f"{what} must be a number of seconds or None, not NaN")
    return seconds


def _manifest_as_sidecar(name: str, raw: bytes) -> Header:
    """For _warm_up: the manifest seen as the sidecar of a byte array of its own size."""
    return parse_header(name, _WARM_UP_MANIFEST % len(raw))


def _open_stores() -> list[Store]:
    return [store for store in (ref() for ref in list(_live_stores.values())) if store is not None]


def _after_fork_in_child() -> None:
    for store in _open_stores():
        store._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Store:
    """A directory of NumPy datasets, shared zero-copy between processes.

    ``mode`` follows h5py: ``"r"`` read-only (needs no write permission
    anywhere), ``"r+"`` read/write on an existing store, ``"a"`` read/write,
    creating the store if needed (the default), ``"w-"`` (or ``"x"``) create,
    failing if it exists. ``timeout`` bounds every writer-lock wait (seconds;
    None or negative waits forever). Files are created with 0o666 less the umask, or
    with exactly ``permissions`` (e.g. 0o660 for a store shared by a group;
    directories get the matching search bits). As a shorthand, an integer
    ``mode`` (``Store(path, mode=0o660)``) means mode ``"a"`` with those
    permissions.

    ``pack_small=True`` makes this handle's puts of arrays up to 16 KiB append
    to the dataset's packed data file instead of creating a new file per
    generation: about 2x faster small puts, and a replaced generation keeps
    ~its size on disk until the packed file (at most 64 KiB) rolls over.
    Readers need nothing: every handle reads packed datasets (docs/FORMAT.md).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: str | int = "a",
        *,
        timeout: float | None = 10.0,
        permissions: int | None = None,
        pack_small: bool = False,
    ) -> None:
        if isinstance(mode, int) and not isinstance(mode, bool):
            if permissions is not None and permissions != mode:
                raise InvalidArgumentError(f"mode={mode:#o} and permissions={permissions!r} disagree; give one of them")
            permissions = mode
            mode = "a"
        if mode not in _MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(map(repr, _MODES))}, not {mode!r}")
        if permissions is not None and not (isinstance(permissions, int) and 0 <= permissions <= 0o777):
            raise InvalidArgumentError(f"permissions must be file mode bits like 0o660, not {permissions!r}")
        self.permissions = permissions
        self.path = os.path.abspath(os.fspath(path))
        self.mode = "w-" if mode == "x" else mode
        self.timeout = _as_timeout(timeout, "timeout")
        self.readonly = mode == "r"
        self.pack_small = bool(pack_small)
        self._closed = False
        self._pid = os.getpid()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._entry_budget = _descriptor_budget()  # read now: the limit may have changed since import
        self._locations: dict[str, _Location] = {}
        self._locations_guard = threading.Lock()
        # What flush() must fsync, in this order: data files, sidecars, directories.
        self._dirty: tuple[set[str], set[str], set[str]] = (set(), set(), set())
        self._dirty_guard = threading.RLock()
        self._writers: weakref.WeakSet[Writer] = weakref.WeakSet()
        self._fsync_failure: FsyncError | None = None
        self._parse_sidecar = parse_header  # (_warm_up swaps it for a moment)
        self._open_manifest()
        self._warm_up()
        if not self.readonly:
            from ._filesystems import warn_if_unsafe
            from ._recovery import recover_on_open

            warn_if_unsafe(self.path)
            recover_on_open(self)
        _live_stores[id(self)] = weakref.ref(self)

    # --- opening --------------------------------------------------------------

    def _warm_up(self) -> None:
        """Run get()'s code once per process, on the store's own manifest.

        A fresh interpreter runs new code several times slower than warm code, so
        the first get() of a process costs ~2.5x the next ones. Doing that work
        here moves it out of the first get() (for a long-lived process, the first
        request's latency) into the first open. It moves more than it saves: the
        first open plus first get of a process take ~130 us longer with the
        warm-up than without (docs/PERFORMANCE.md). The manifest is read as a
        byte array by get() itself, through every step of a dataset's first read
        (its leaf name is reserved, so it names no dataset; only the header parse
        is swapped, for one that describes the manifest's bytes); nothing is kept.
        """
        global _warmed_up
        if _warmed_up:
            return
        _warmed_up = True
        _names.validate_name("warm-up/sample")
        parse_header(_MANIFEST_LEAF, _WARM_UP_SIDECAR)  # (the commonest dtype, and attrs to decode)
        # The manifest's leaf name is reserved (never a dataset), and "<leaf>.json" is the
        # manifest: get() reads it as a sidecar, through every step of a first read.
        key = _MANIFEST_LEAF
        self._locations[key] = _Location(self.path, key)
        self._parse_sidecar = _manifest_as_sidecar
        try:
            self.get(key)
        except (OSError, MmstoreError):
            pass  # only a warm-up: real reads report real problems
        finally:
            self._parse_sidecar = parse_header
            self._drop_entry(key)
            self._locations.pop(key, None)

    def _open_manifest(self) -> None:
        manifest = os.path.join(self.path, MANIFEST_NAME)
        if self.mode in ("r", "r+"):
            self.format_version = self._read_manifest(manifest)
            if self.mode == "r+" and not os.access(self.path, os.W_OK):
                raise ReadOnlyError(f"store {self.path!r} is not writable; open it with mode='r'")
            return
        try:
            _durable.make_directories(self.path, self.permissions)
        except FileExistsError:
            raise StoreNotFoundError(f"{self.path!r} exists and is not a directory") from None
        except PermissionError as exc:
            raise ReadOnlyError(f"cannot create store {self.path!r}: {exc.strerror or exc}") from None
        if self.mode == "a" and os.path.exists(manifest):
            self.format_version = self._read_manifest(manifest)
            if not os.access(self.path, os.W_OK):
                raise ReadOnlyError(f"store {self.path!r} is not writable; open it with mode='r'")
            return
        if os.path.lexists(manifest):
            raise StoreExistsError(f"store {self.path!r} already exists (mode 'w-' creates a new one)")
        if any(not entry.startswith(".") for entry in os.listdir(self.path)):
            raise StoreNotFoundError(
                f"{self.path!r} is a non-empty directory without {MANIFEST_NAME}; refusing to turn it into a store"
            )
        try:
            self._create_manifest(manifest)
        except PermissionError as exc:
            raise ReadOnlyError(f"cannot create store {self.path!r}: {exc.strerror or exc}") from None
        self.format_version = self._read_manifest(manifest)

    def _create_manifest(self, manifest: str) -> None:
        temp = os.path.join(self.path, _names.temp_file_name("mmstore", _names.new_token()))
        fd = _durable.create_new(temp, self.permissions)
        try:
            _durable.write_all(fd, manifest_bytes(time.time()))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, manifest)  # link, not rename: never replace a manifest
        except FileExistsError:
            if self.mode == "w-":
                raise StoreExistsError(f"store {self.path!r} already exists") from None
        finally:
            os.unlink(temp)
        _durable.fsync_dir(self.path)

    def _read_manifest(self, manifest: str) -> int:
        try:
            fd = os.open(manifest, _durable.READ_FLAGS)
        except FileNotFoundError:
            raise StoreNotFoundError(f"no mmstore store at {self.path!r} ({MANIFEST_NAME} not found)") from None
        except NotADirectoryError:
            raise StoreNotFoundError(f"no mmstore store at {self.path!r} (not a directory)") from None
        try:
            raw = _read_fd(fd)
        finally:
            os.close(fd)
        return parse_manifest(self.path, raw)

    # --- small helpers --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"store {self.path!r} is closed")

    def _check_writable(self) -> None:
        if self._closed:
            raise ClosedError(f"store {self.path!r} is closed")
        if self.readonly:
            raise ReadOnlyError(f"store {self.path!r} was opened read-only (mode='r')")
        if self._fsync_failure is not None:
            raise StoreIOError(
                errno.EIO,
                f"store {self.path!r} refuses further commits after an fsync error ({self._fsync_failure}); "
                "what it wrote may not be on disk: check the disk, then reopen the store",
            )

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
            location = self._locations.setdefault(name, _Location(self.path, name, self.permissions))
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

    def _locate_for_writing(self, name: str) -> _Location:
        """_locate, and (once per name) refuse group directories that are symlinks or not
        directories: writing through one would create files outside the store."""
        location = self._locate(name)
        if not location.inside:
            current = self.path
            for part in name.split("/")[:-1]:
                current += "/" + part
                try:
                    mode = os.lstat(current).st_mode
                except FileNotFoundError:
                    break  # the rest is created by us, as real directories
                if not stat.S_ISDIR(mode):
                    raise InvalidNameError(
                        f"dataset {name!r}: {current!r} is a symlink or not a directory; refusing to write through it"
                    )
            location.inside = True
        return location

    def _lock(self, name: str) -> DatasetLock:
        return self._locate(name).lock

    def _forget_after_fork(self) -> None:
        """In a forked child: drop inherited lock descriptors and cached sidecar fds.

        Writer handles are not inherited: the child's copy is closed without
        releasing the parent's lock (the child must open its own writer).
        """
        for writer in list(self._writers):
            writer._forget_after_fork()
        self._writers = weakref.WeakSet()
        for location in self._locations.values():
            if location._lock is not None:
                location._lock.forget_after_fork()
        self._locations_guard = threading.Lock()
        self._dirty_guard = threading.RLock()
        for entry in self._entries.values():
            entry.close()
        self._entries = OrderedDict()
        self._pid = os.getpid()

    def _missing(self, name: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(f"no dataset {name!r} in store {self.path!r}")

    # --- reading --------------------------------------------------------------

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
        mapped_before: tuple[_Entry, int] | None = None
        mapped = entry.mapped  # (read once: another thread may replace the entry's map)
        for _attempt in range(1000):
            if mapped is None:
                entry, mapped = self._map_entry(location, entry)
            header = entry.header
            if not header.growable:
                return mapped.rows[...], header
            length = int(mapped.control[1])  # type: ignore[index]
            if length <= mapped.capacity or mapped_before == (entry, mapped.size):
                break  # it fits; or a new map of the same, unchanged file does not: corrupt
            mapped_before = (entry, mapped.size)
            # The writer grew the file since we mapped it (or a newer generation's writer
            # grew that one before we read its length): map it again.
            mapped = None
        if mapped is None:
            raise FormatError(f"dataset {name!r}: its data file grew too often to read a consistent length")
        return mapped.rows[: validate_length(header, mapped, length)], header

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
            if entries.get(name) is not entry:
                counter = None  # (its descriptor may have been closed before the read)
            elif st.st_ino == entry.inode and st.st_dev == entry.device:
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
                raise
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise FormatError(f"dataset {name!r}: sidecar is not a regular file")
                header = self._parse_sidecar(name, _read_fd(fd))
            except BaseException:
                os.close(fd)
                raise
            entry = _Entry(header, fd, st)
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
            entry.take_counter(old)
            old.close()
        # The descriptor budget is per process: the open stores share it, and the one
        # holding the most entries gives up its least recently used first.
        while self._entries_in_process() >= self._entry_budget:
            largest = max(_open_stores(), key=lambda store: len(store._entries), default=self)
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
        return sum(len(store._entries) for store in _open_stores())

    def _drop_entry(self, name: str) -> None:
        old = self._entries.pop(name, None)
        if old is not None:
            old.close()

    def header(self, name: str) -> Header:
        """The current parsed header of ``name`` (refreshed if another process committed)."""
        return self._current_entry(self._locate(name)).header

    def info(self, name: str) -> dict[str, Any]:
        """A description of the dataset: name, dtype, shape, nbytes, attrs, generation, times ..."""
        location = self._locate(name)
        header = self._current_entry(location).header
        shape = header.shape
        if header.growable:
            # The sidecar's length is the one recorded at the writer's last close; the
            # committed length is the control block's, which flush() publishes.
            array, header = self._read(name)
            shape = array.shape
        return {
            "name": header.name,
            "dtype": header.dtype,
            "shape": shape,
            "ndim": len(shape),
            "size": math.prod(shape),
            "itemsize": header.dtype.itemsize,
            "nbytes": math.prod(shape) * header.dtype.itemsize,
            "attrs": copy.deepcopy(header.attrs),  # (nested values too: the cached header is shared)
            "generation": header.generation,
            "created": header.created,
            "modified": header.modified,
            "growable": header.growable,
            "checksum": header.checksum,
            "data_file": location.data_path(header.data_file),
        }

    def attrs(self, name: str) -> dict[str, Any]:
        """The dataset's JSON attributes (a copy)."""
        return copy.deepcopy(self.header(name).attrs)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            location = self._locate(name)
        except InvalidNameError:
            return False
        # As listed by keys(): any sidecar entry but a directory (a symlink or a special
        # file is a corrupt dataset: get() says why), in group directories that are not symlinks.
        try:
            if stat.S_ISDIR(os.lstat(location.sidecar).st_mode):
                return False
        except OSError:
            return False
        return not location.groups or location.group_symlink() is None

    def keys(self, prefix: str = "") -> list[str]:
        """Sorted names of every dataset (under ``prefix``, a group path, if given)."""
        self._check_open()
        start = self.path
        if prefix:
            prefix = prefix.strip("/")
            _names.validate_name(prefix)
            start = os.path.join(self.path, prefix)
        names: list[str] = []
        # A group that is a symlink is never entered, not even when named as the prefix.
        if not prefix or _first_symlink(self.path, prefix.split("/")) is None:
            _collect_names(self.path, start, names)
        if prefix and prefix in self:
            names.append(prefix)
        return sorted(names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    def values(self, prefix: str = "") -> Iterator[np.ndarray]:
        """Each dataset's array (under ``prefix``), in name order, read as the loop gets to it."""
        for _name, array in self.items(prefix):
            yield array

    def items(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) of each dataset (under ``prefix``), in name order, read as the loop
        gets to it; a dataset deleted meanwhile is skipped."""
        for name in self.keys(prefix):
            array = self.get(name, None)
            if array is not None:
                yield name, array

    # --- writing --------------------------------------------------------------

    def put(
        self,
        name: str,
        array: Any,
        attrs: Mapping[str, Any] | None = None,
        *,
        durable: bool = False,
    ) -> None:
        """Atomically create or replace dataset ``name`` with a copy of ``array``.

        Readers see the old value or the new one, never a mix. ``durable=True``
        also fsyncs the data, the sidecar and the directory before returning.
        h5py, zarr and dask arrays are read in bounded row blocks.
        """
        self._check_writable()
        location = self._locate_for_writing(name)
        source = _mapping.as_source(array)
        encode_dtype(source.dtype)
        attrs_record = encode_attrs(attrs) if attrs else {}

        if self.pack_small and isinstance(source, np.ndarray) and 0 < source.nbytes <= PACK_MAX_NBYTES:
            for _attempt in range(3):
                if self._put_packed(location, source, attrs_record, durable):
                    return
            raise StoreIOError(errno.EIO, f"dataset {name!r}: could not commit (its new data file kept vanishing)")

        def write(fd: int, _path: str) -> tuple[np.dtype[Any], tuple[int, ...], str]:
            if source.nbytes >= PREALLOCATE_BYTES:
                _durable.preallocate(fd, source.nbytes)
            return source.dtype, source.shape, _mapping.write_and_digest(fd, source)

        for _attempt in range(3):
            if self._write_and_commit(location, write, attrs_record, durable):
                return
        raise StoreIOError(errno.EIO, f"dataset {name!r}: could not commit (its new data file kept vanishing)")

    def put_blocks(
        self,
        name: str,
        blocks: Iterable[Any],
        *,
        dtype: Any = None,
        attrs: Mapping[str, Any] | None = None,
        durable: bool = False,
    ) -> int:
        """Atomically create or replace ``name`` with the concatenation of row ``blocks``.

        For data that does not fit in memory or whose length is not known in
        advance (a text file parsed in chunks, a stream). Every block must have
        the same row shape; with ``dtype`` blocks are converted to it (needed if
        there may be no block at all). Nothing is visible until the last block
        is written. Returns the number of rows.
        """
        self._check_writable()
        location = self._locate_for_writing(name)
        target = as_dtype(dtype, f"dataset {name!r}") if dtype is not None else None
        if target is not None:
            encode_dtype(target)
        attrs_record = encode_attrs(attrs) if attrs else {}

        def write(fd: int, _path: str) -> tuple[np.dtype[Any], tuple[int, ...], str]:
            hasher, rows = _mapping.new_hasher(), 0
            row_shape: tuple[int, ...] | None = None
            kind = target
            for raw in blocks:
                _mapping.refuse_masked(raw)
                block = np.asarray(raw, dtype=kind)
                if block.ndim == 0:
                    raise InvalidArgumentError(f"dataset {name!r}: blocks must have at least one dimension (rows)")
                if row_shape is None:
                    kind, row_shape = block.dtype, block.shape[1:]
                    encode_dtype(kind)
                elif block.shape[1:] != row_shape:
                    raise InvalidArgumentError(
                        f"dataset {name!r}: block of rows {block.shape[1:]} after rows {row_shape}"
                    )
                _mapping.write_array(fd, block, hasher)
                rows += block.shape[0]
            if kind is None:
                raise InvalidArgumentError(f"dataset {name!r}: no blocks, and no dtype given")
            return kind, (rows, *(row_shape or ())), f"{XXH3_ALGORITHM}:{hasher.hexdigest()}"

        if not self._write_and_commit(location, write, attrs_record, durable):
            raise StoreIOError(errno.EIO, f"dataset {name!r}: its new data file vanished before the commit")
        return self.header(name).shape[0]

    def _put_filled(
        self,
        name: str,
        dtype: Any,
        shape: tuple[int, ...],
        fill: Any,
        attrs: Mapping[str, Any] | None = None,
        *,
        durable: bool = False,
    ) -> None:
        """Create or replace ``name`` with a new data file that ``fill(path)`` writes in place.

        The file is preallocated to its full size first, so a full disk fails
        before any work is done; ``fill`` may hand the path to other processes
        (mmstore.dask.from_dask does). Nothing is visible until ``fill`` has
        returned and the checksum of the whole file is taken; if ``fill`` raises,
        the new file is removed and the committed value is untouched.
        """
        self._check_writable()
        location = self._locate_for_writing(name)
        kind = as_dtype(dtype, f"dataset {name!r}")
        encode_dtype(kind)
        dims = tuple(int(n) for n in shape)
        if any(n < 0 for n in dims):
            raise InvalidArgumentError(f"dataset {name!r}: negative dimension in shape {dims}")
        nbytes = math.prod(dims) * kind.itemsize
        attrs_record = encode_attrs(attrs) if attrs else {}

        def write(fd: int, path: str) -> tuple[np.dtype[Any], tuple[int, ...], str]:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
            fill(path)
            size = os.fstat(fd).st_size
            if size != nbytes:
                raise StoreIOError(
                    errno.EIO, f"dataset {name!r}: data file is {size} bytes after filling, not {nbytes}"
                )
            reader = os.open(path, _durable.READ_FLAGS)  # ``fd`` is write-only
            try:
                return kind, dims, _mapping.file_digest(reader, 0, nbytes, XXH3_ALGORITHM)
            finally:
                os.close(reader)

        if not self._write_and_commit(location, write, attrs_record, durable):
            raise StoreIOError(errno.EIO, f"dataset {name!r}: its new data file vanished before the commit")

    def _write_and_commit(self, location: _Location, write: Any, attrs: dict[str, Any], durable: bool) -> bool:
        """Write a new data file with ``write(fd, path) -> (dtype, shape, checksum)`` and commit it."""
        name = location.name
        data_file = _names.data_file_name(location.leaf, _names.new_token())
        data_path = location.data_path(data_file)
        try:
            fd = _durable.create_new(data_path, self.permissions)
        except OSError as exc:
            raise _durable.io_error(exc, f"dataset {name!r}: creating its data file") from None
        old_header: Header | None = None
        committed = False
        try:
            mark_alive(fd)
            try:
                dtype, shape, checksum = write(fd, data_path)
                if durable:
                    self._fsync(fd, f"dataset {name!r}")
            except OSError as exc:
                raise _durable.io_error(exc, f"dataset {name!r}: writing its data") from None

            def make_header(old: Header | None) -> Header:
                return successor_header(
                    old, name=name, dtype=dtype, shape=shape, data_file=data_file, offset=0, attrs=attrs,
                    checksum=checksum,
                )  # fmt: skip

            outcome = self._commit(location, fd, make_header, durable)
            if outcome is _VANISHED:
                return False  # recovery judged our unfinished file abandoned: write it again
            old_header = outcome
            committed = True
        finally:
            os.close(fd)  # drops the liveness lock, after the commit
            if not committed:
                self._discard_uncommitted(location, data_file)
        self._after_commit(location, old_header, data_file, durable)
        return True

    def _discard_uncommitted(self, location: _Location, data_file: str) -> None:
        """Remove a new data file after a failure, unless the sidecar names it: an error
        (an interrupt, say) can come after the commit point, and the commit stands. A
        sidecar that is missing or not a valid header is not our commit (we write valid
        ones); one we cannot read at all (EMFILE, say) might be, so the file is left for
        recovery (it removes unreferenced data files of dead writers)."""
        try:
            committed = self._current_entry(location, counted=False).header.data_file
        except (DatasetNotFoundError, FormatError):
            committed = None
        except (OSError, MmstoreError):
            return
        if committed != data_file:
            _durable.unlink_quietly(location.data_path(data_file))

    def _put_packed(self, location: _Location, array: np.ndarray, attrs: dict[str, Any], durable: bool) -> bool:
        """Commit a small array as a packed generation (see the module docstring);
        False if a new data file vanished before the commit (write it again)."""
        name = location.name
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)  # (0-d stays 0-d)
        data = array.reshape(-1).view(np.uint8)
        checksum = _mapping.buffer_digest(data, XXH3_ALGORITHM)
        old_header: Header | None = None
        entry = None
        lock = location.lock
        lock.acquire(self.timeout)
        try:
            old_header = self._committed_header(location)
            fd, data_file, offset, created = self._packed_target(location, old_header, data.size)
            committed = False
            try:
                try:
                    _durable.write_all(fd, data, offset)
                    if durable:
                        self._fsync(fd, f"dataset {name!r}")
                except OSError as exc:
                    raise _durable.io_error(exc, f"dataset {name!r}: writing its data") from None
                if created and os.fstat(fd).st_nlink == 0:
                    return False  # recovery judged our new file abandoned before we locked it
                header = successor_header(
                    old_header, name=name, dtype=array.dtype, shape=array.shape, data_file=data_file,
                    offset=offset, attrs=attrs, checksum=checksum, packed=True,
                )  # fmt: skip
                entry = self._write_sidecar_locked(location, header, durable)
                committed = True
            finally:
                if created:  # (an existing file's descriptor stays with the lock)
                    os.close(fd)
                    if not committed:
                        self._discard_uncommitted(location, data_file)
        finally:
            released = lock.release()
            if entry is not None:
                entry.counter = released
        self._after_commit(location, old_header, data_file, durable)
        return True

    def _packed_target(self, location: _Location, old: Header | None, nbytes: int) -> tuple[int, str, int, bool]:
        """Where a packed generation of ``nbytes`` goes (the caller holds the dataset lock):
        (write descriptor, data file name, offset, whether the file is new).

        After the committed generation in its packed data file if it fits within
        PACK_FILE_BYTES: those bytes are either unused or an unfinished append of a
        killed writer, never part of a committed generation. Otherwise a new file.
        """
        lock = location.lock
        if old is not None and old.packed:
            # Never below the committed generation's end: bytes of committed generations
            # are never written again. (Empty arrays are not packed: put() stores them in
            # a file of their own.)
            offset = -(-(old.offset + old.nbytes) // PACKED_ALIGNMENT) * PACKED_ALIGNMENT
            if offset + nbytes <= PACK_FILE_BYTES:
                held = lock.held_file
                # The name identifies the file (data file names are never reused), unless the
                # file was replaced behind the store's back (a restore): then it is unlinked.
                if held is not None and held[0] == old.data_file and os.fstat(held[1]).st_nlink:
                    return held[1], old.data_file, offset, False
                lock.drop_held_file()
                try:
                    fd = location.open_file(old.data_file, _durable.WRITE_EXISTING_FLAGS)
                except OSError:
                    fd = -1  # missing or not a plain file (a corrupt dataset): start a new file
                if fd >= 0:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        # Kept open for the next puts (the name identifies the file: data
                        # file names are never reused).
                        lock.held_file = (old.data_file, fd)
                        return fd, old.data_file, offset, False
                    os.close(fd)
        lock.drop_held_file()
        data_file = _names.data_file_name(location.leaf, _names.new_token())
        try:
            fd = _durable.create_new(location.data_path(data_file), self.permissions)
        except OSError as exc:
            raise _durable.io_error(exc, f"dataset {location.name!r}: creating its data file") from None
        mark_alive(fd)
        return fd, data_file, 0, True

    def _after_commit(self, location: _Location, old_header: Header | None, data_file: str, durable: bool) -> None:
        """What follows a commit: cleanup and durability, never a reason to undo it."""
        if old_header is not None and old_header.data_file != data_file:
            _durable.unlink_quietly(location.data_path(old_header.data_file))
        if durable:
            try:
                _durable.fsync_dir_chain(location.directory, self.path)
            except FsyncError as exc:
                self._fsync_failure = exc
                raise
        else:
            self._mark_dirty(location, location.data_path(data_file))

    def _mark_dirty(self, location: _Location, data_path: str | None = None, sidecar: bool = True) -> None:
        """Remember what a commit without fsync changed, for flush(): the data file
        (if given), the sidecar (if ``sidecar``) and the dataset's directory.

        The guard is reentrant: a writer closed from a signal handler or by the garbage
        collector may come here while its own thread holds it (adding to the sets that
        thread is filling or that flush() has just taken, both of which it then syncs)."""
        with self._dirty_guard:
            dirty = self._dirty
            if data_path is not None:
                dirty[0].add(data_path)
            if sidecar:
                dirty[1].add(location.sidecar)
            dirty[2].add(location.directory)

    def _commit(self, location: _Location, data_fd: int, make_header: Any, durable: bool) -> Any:
        """Swap in a new sidecar under the dataset lock and return the old header
        (None if there was none), or _VANISHED if the new data file was unlinked
        before we got the lock (recovery in another process judged it abandoned).
        """
        lock = location.lock
        lock.acquire(self.timeout)
        entry = None
        try:
            lock.drop_held_file()  # a packed file this commit replaces: do not pin its space
            if os.fstat(data_fd).st_nlink == 0:
                return _VANISHED
            old_header = self._committed_header(location)
            entry = self._write_sidecar_locked(location, make_header(old_header), durable)
        finally:
            released = lock.release()  # (never raises OSError: a done commit is never undone)
            if entry is not None:
                entry.counter = released
        return old_header

    def _fsync(self, fd: int, what: str) -> None:
        try:
            _durable.fsync(fd, what)
        except FsyncError as exc:
            self._fsync_failure = exc
            raise

    def _write_sidecar_locked(self, location: _Location, header: Header, durable: bool) -> _Entry | None:
        """Commit ``header`` as the dataset's sidecar (the caller holds the dataset lock).

        Returns the new cached entry (None if it could not be made). A caller that releases
        the lock right after may set the entry's counter to the value the release wrote:
        until another writer takes the lock, the entry is current without a stat()."""
        content = header.to_json()
        if len(content) > MAX_SIDECAR_BYTES:  # (readers refuse larger ones: never commit one)
            raise InvalidArgumentError(
                f"dataset {location.name!r}: its header would be {len(content)} bytes, over the "
                f"{MAX_SIDECAR_BYTES}-byte limit of a sidecar; keep large values in datasets, not attrs"
            )
        try:
            sidecar_fd = _durable.write_file_atomically(
                location.sidecar, location.temp_path(), content, durable=durable, permissions=self.permissions
            )
        except FsyncError as exc:
            self._fsync_failure = exc
            raise
        except OSError as exc:
            raise _durable.io_error(exc, f"dataset {location.name!r}: committing its header") from None
        try:
            entry = _Entry(header, sidecar_fd, os.fstat(sidecar_fd))
        except OSError:
            _close_quietly(sidecar_fd)
            self._drop_entry(location.name)
            return None
        self._remember(location.name, entry)
        return entry

    def _committed_header(self, location: _Location) -> Header | None:
        """The committed header (callers hold the lock), or None if there is none.

        An unreadable header counts as none: put is create-or-replace, and the
        old data file is left for recovery to remove. A cached entry whose change
        counter is the one found when the lock was taken is current (no writer has
        taken the lock since it was found so): no system call.
        """
        entry = self._entries.get(location.name)
        if entry is not None:
            counter = entry.counter
            if counter is not None and counter == location.lock.found_counter:
                return entry.header
        try:
            return self._current_entry(location, counted=False).header
        except DatasetNotFoundError:
            return None
        except FormatError:
            self._drop_entry(location.name)
            return None

    # --- checking and repairing ---------------------------------------------

    def verify(self, progress: Any = None) -> VerifyReport:
        """Check every header, data file and known checksum; return a report (changes nothing)."""
        self._check_open()
        from ._recovery import verify_store

        return verify_store(self, progress)

    def recover(self) -> VerifyReport:
        """Remove dead writers' leftovers and move unreadable datasets to ``.quarantine/``
        (never deleting them); return what was found and done."""
        self._check_writable()
        from ._recovery import recover_store

        return recover_store(self)

    # --- writer handles and readers -------------------------------------------

    def create(
        self,
        name: str,
        dtype: Any,
        shape: Any,
        *,
        growable: bool = False,
        attrs: Mapping[str, Any] | None = None,
        capacity: int | None = None,
        exist_ok: bool = False,
    ) -> Writer:
        """Create a dataset of zeros, commit it at once, and return its writer.

        A growable dataset starts with ``shape[0]`` rows and grows with
        ``append``; ``capacity`` preallocates rows. The writer holds the
        dataset's lock until closed. An existing dataset raises
        DatasetExistsError unless ``exist_ok`` (then it is replaced).
        """
        self._check_writable()
        from ._growable import create_dataset

        return create_dataset(self, self._locate_for_writing(name), dtype, shape, growable, attrs, capacity, exist_ok)

    def open_writer(self, name: str) -> Writer:
        """Reopen an existing dataset for appends and in-place edits (waits for its lock)."""
        self._check_writable()
        from ._growable import open_dataset_writer

        return open_dataset_writer(self, self._locate_for_writing(name))

    def open_reader(self, name: str) -> Reader:
        """A reader that follows the dataset: ``array``, ``refresh()``, ``wait()``, ``follow()``."""
        self._check_open()
        return Reader(self, self._locate(name))

    def __setitem__(self, name: str, array: Any) -> None:
        self.put(name, array)

    def delete(self, name: str) -> None:
        """Remove dataset ``name``; arrays already returned by ``get`` stay valid."""
        self._check_writable()
        location = self._locate_for_writing(name)
        lock = location.lock
        lock.acquire(self.timeout)
        try:
            lock.drop_held_file()
            old_header = self._committed_header(location)
            try:
                os.unlink(location.sidecar)
            except FileNotFoundError:
                raise self._missing(name) from None
            self._drop_entry(name)
        finally:
            lock.release()
        if old_header is not None:
            _durable.unlink_quietly(location.data_path(old_header.data_file))
        self._mark_dirty(location, sidecar=False)

    def __delitem__(self, name: str) -> None:
        self.delete(name)

    # --- durability and lifetime ---------------------------------------------

    def flush(self) -> None:
        """Make every change committed through this store durable.

        fsyncs the data files, then the sidecars, then their directories (and
        each parent up to the store root, for directories created on the way),
        and the data files of this store's open writers (their flushed rows;
        rows appended but not flushed stay unpublished). Commits of other
        processes are made durable by their own flush().
        """
        self._check_open()
        if self.readonly:
            return  # nothing was committed through a read-only handle
        self._check_writable()  # refuses after an fsync error: a second fsync could lie
        for writer in list(self._writers):
            writer._sync_committed()
        with self._dirty_guard:
            data_files, sidecars, directories = self._dirty
            self._dirty = (set(), set(), set())
        for path in [*sorted(data_files), *sorted(sidecars)]:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # replaced or deleted since: nothing of it left to make durable
            try:
                self._fsync(fd, repr(path))
            finally:
                os.close(fd)
        for path in _with_parents(self.path, directories):
            try:
                _durable.fsync_dir(path)
            except FileNotFoundError:
                continue
            except FsyncError as exc:
                self._fsync_failure = exc
                raise

    def close(self) -> None:
        """Release descriptors and locks. Arrays already returned stay valid."""
        if self._closed:
            return
        # Closed first: a writer, location or entry another thread adds after this point is
        # dropped by the code adding it (_handed_over, _locate, _remember).
        self._closed = True
        error: BaseException | None = None
        for writer in list(self._writers):
            try:
                writer.close()  # (releases its lock even if its last sidecar write fails)
            except BaseException as exc:  # every writer is closed; the first error is raised below
                error = error or exc
        # Only now: until its writers are closed, a fork must still find this store.
        _live_stores.pop(id(self), None)
        # close() drops bookkeeping only; durability is flush()'s job (DESIGN invariant 4).
        with self._dirty_guard:
            self._dirty = (set(), set(), set())
        while self._entries:  # popped one by one: whoever pops an entry closes it (threads)
            try:
                _name, entry = self._entries.popitem()
            except KeyError:
                break
            entry.close()
        for location in list(self._locations.values()):
            if location._lock is not None:
                location._lock.close_when_released()  # (a commit under way in another thread keeps it)
        self._locations.clear()
        if error is not None:
            raise error

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                _live_stores.pop(id(self), None)
                for entry in self._entries.values():
                    entry.close()
                for location in self._locations.values():
                    if location._lock is not None:
                        # A lock a writer of this store holds (collected with it, its own
                        # finalizer still to run) closes at that writer's release.
                        location._lock.close_when_released()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"mode={self.mode!r}"
        return f"<mmstore.Store {self.path!r} {state}>"
