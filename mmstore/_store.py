"""The Store: a directory of datasets shared through the page cache.

Store opens (or creates) the store and owns its lifetime; its base classes do
the rest: StoreReads (_reads.py) locates datasets and reads them, StoreWrites
(_writes.py) commits them. Writer handles are in _growable.py (made by create() and
open_writer() through _create.py, their values converted in _rows.py), readers of
growable datasets in _reader.py, checking and repair in _recovery.py.
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
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import _durable, _names
from ._cache_control import shared_lock_groups
from ._entries import _collect_names, _descriptor_budget, _Entry, _first_symlink, _Location, _read_fd, _with_parents
from ._errors import (
    AccessDeniedError,
    FsyncError,
    InvalidArgumentError,
    InvalidNameError,
    MmstoreError,
    ReadOnlyError,
    StoreExistsError,
    StoreIOError,
    StoreNotFoundError,
    access_denied,
)
from ._format import MANIFEST_NAME, Header, manifest_bytes, parse_header, parse_manifest
from ._growable import Writer
from ._locks import DatasetLock, as_seconds
from ._reader import Reader
from ._reads import _live_stores, open_stores
from ._writes import StoreWrites

if TYPE_CHECKING:
    from ._recovery import VerifyReport

_MODES = ("r", "r+", "a", "w-", "x")


_MAX_CACHED_DATASETS = _descriptor_budget()

_warmed_up = False  # Store._warm_up has run in this process


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
    """A lock wait in seconds: None, infinity (or a negative number) is -1, wait forever."""
    seconds = as_seconds(value, what)
    return -1.0 if seconds is None else seconds


def _manifest_as_sidecar(name: str, raw: bytes) -> Header:
    """For _warm_up: the manifest seen as the sidecar of a byte array of its own size."""
    return parse_header(name, _WARM_UP_MANIFEST % len(raw))


def _after_fork_in_child() -> None:
    for store in open_stores():
        cast(Store, store)._forget_after_fork()  # (only Stores register)


os.register_at_fork(after_in_child=_after_fork_in_child)


class Store(StoreWrites):
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
        _shared_lock_groups: tuple[str, ...] | None = None,
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
        # Datasets whose names start with one of these share their directory's lock file
        # (a cache's entries: docs/FORMAT.md, "Shared lock files"), as the cache control
        # file in the root says; a Cache opening (or making) its store passes them.
        if _shared_lock_groups is None:
            try:
                _shared_lock_groups = shared_lock_groups(self.path) or ()
            except OSError as exc:
                if not self.readonly:  # (a writer must lock as the cache's other handles do)
                    error = AccessDeniedError if isinstance(exc, PermissionError) else StoreIOError
                    problem = f"store {self.path!r}: cannot read its cache control file: {exc.strerror}"
                    raise error(exc.errno, problem) from None
                _shared_lock_groups = ()  # (readers finding no counter file check sidecars: never stale)
        self._shared_lock_groups = _shared_lock_groups
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
        self._readers: weakref.WeakSet[Reader] = weakref.WeakSet()  # (close() closes them)
        self._fsync_failure: FsyncError | None = None
        self._parse_sidecar = parse_header  # (_warm_up swaps it for a moment)
        self._removed_at_open: list[str] = []  # leftovers the recovery below removed, for recover()'s report
        self._open_manifest()
        self._warm_up()
        if not self.readonly:
            from ._filesystems import warn_if_unsafe
            from ._recovery import recover_on_open

            warn_if_unsafe(self.path)
            self._removed_at_open = recover_on_open(self)
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
        except OSError as exc:
            if not _durable.refused_write(exc):
                raise
            raise ReadOnlyError(f"cannot create store {self.path!r}: {exc.strerror or exc}") from None
        if self.mode == "a" and os.path.exists(manifest):
            self._open_existing(manifest)
            return
        # The listing comes before the last look for a manifest: another process creating
        # this store at the same time writes its manifest before anything else visible, so
        # an entry seen here with no manifest after it is not a store's.
        visible = any(not entry.startswith(".") for entry in os.listdir(self.path))
        if os.path.lexists(manifest):  # (made by another process since the first look, in mode "a")
            if self.mode != "a":
                raise StoreExistsError(f"store {self.path!r} already exists (mode 'w-' creates a new one)")
            self._open_existing(manifest)
            return
        if visible:
            raise StoreNotFoundError(
                f"{self.path!r} is a non-empty directory without {MANIFEST_NAME}; refusing to turn it into a store"
            )
        try:
            self._create_manifest(manifest)
        except OSError as exc:
            if not _durable.refused_write(exc):
                raise
            raise ReadOnlyError(f"cannot create store {self.path!r}: {exc.strerror or exc}") from None
        self.format_version = self._read_manifest(manifest)

    def _open_existing(self, manifest: str) -> None:
        self.format_version = self._read_manifest(manifest)
        if not os.access(self.path, os.W_OK):
            raise ReadOnlyError(f"store {self.path!r} is not writable; open it with mode='r'")

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
        except PermissionError:
            raise AccessDeniedError(
                errno.EACCES, f"store {self.path!r}: permission denied reading its manifest ({manifest})"
            ) from None
        try:
            raw = _read_fd(fd)
        finally:
            os.close(fd)
        return parse_manifest(self.path, raw)

    # --- small helpers --------------------------------------------------------

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

    # --- reading --------------------------------------------------------------

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
        from ._create import create_dataset

        return create_dataset(self, self._locate_for_writing(name), dtype, shape, growable, attrs, capacity, exist_ok)

    def open_writer(self, name: str) -> Writer:
        """Reopen an existing dataset for appends and in-place edits (waits for its lock)."""
        self._check_writable()
        from ._create import open_dataset_writer

        return open_dataset_writer(self, self._locate_for_writing(name))

    def open_reader(self, name: str) -> Reader:
        """A reader that follows the dataset: ``array``, ``refresh()``, ``wait()``, ``follow()``."""
        self._check_open()
        reader = Reader(self, self._locate(name))
        self._readers.add(reader)
        if self._closed:  # close() ran meanwhile and did not see it
            reader.close()
            self._check_open()
        return reader

    def __setitem__(self, name: str, array: Any) -> None:
        self.put(name, array)

    def delete(self, name: str) -> None:
        """Remove dataset ``name``; arrays already returned by ``get`` stay valid."""
        self._check_writable()
        location = self._locate_for_writing(name)
        try:
            # Before locking: taking the lock would create the lock file (and its groups).
            os.lstat(location.sidecar)
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(name) from None
        except PermissionError:  # (a group this process may not search: not "missing")
            raise access_denied(name, "its sidecar", location.sidecar) from None
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
        # A reader's wait() blocked in another thread wakes now, and raises ClosedError.
        for reader in list(self._readers):
            reader.close()
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
