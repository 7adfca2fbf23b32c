"""Committing to a store: put() and its relatives.

Commit protocol for ``put`` (see _durable.py for the ordering and
docs/FORMAT.md for the files):

1. Outside any lock: create ``<leaf>.<token>.dat`` exclusively, hold a liveness
   flock on it (so recovery knows its writer is alive), write the bytes and
   their checksum.
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

StoreWrites is a base class of Store (_store.py), which sets the attributes
declared below.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import xxhash

from . import _durable, _mapping
from ._dtypes import as_dtype, encode_dtype
from ._entries import _Entry, _Location
from ._errors import (
    ClosedError,
    DatasetNotFoundError,
    FormatError,
    FsyncError,
    InvalidArgumentError,
    InvalidNameError,
    MmstoreError,
    ReadOnlyError,
    StoreIOError,
    UnsupportedDtypeError,
)
from ._format import (
    MAX_SIDECAR_BYTES,
    PACKED_ALIGNMENT,
    XXH3_ALGORITHM,
    Header,
    encode_attrs,
    successor_header,
)
from ._locks import mark_alive, names_file
from ._reads import StoreReads

_VANISHED = object()

# Data files at least this large get their blocks reserved before the write (_durable.preallocate).
PREALLOCATE_BYTES = 1 << 20

# Small-put packing (see the module docstring and docs/FORMAT.md, "Packed data files").
PACK_MAX_NBYTES = 16 * 1024
PACK_FILE_BYTES = 64 * 1024


class StoreWrites(StoreReads):
    """Store's committing half: put(), put_blocks(), the commit under the dataset lock."""

    timeout: float
    readonly: bool
    pack_small: bool
    _dirty: tuple[set[str], set[str], set[str]]
    _dirty_guard: threading.RLock
    _fsync_failure: FsyncError | None

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
        try:
            encode_dtype(source.dtype)
        except UnsupportedDtypeError as exc:
            raise UnsupportedDtypeError(f"dataset {name!r}: {exc}") from None
        attrs_record = encode_attrs(attrs)

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
        attrs_record = encode_attrs(attrs)

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
        attrs_record = encode_attrs(attrs)

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
        data_file, fd = location.create_data_file(self.permissions)
        data_path = location.data_path(data_file)
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

            outcome = self._commit(location, data_path, fd, make_header, durable)
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
        data: Any = array.reshape(-1).view(np.uint8)  # (a buffer)
        checksum = f"{XXH3_ALGORITHM}:{xxhash.xxh3_64_hexdigest(data)}"
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
                    written = os.pwrite(fd, data, offset)  # (the usual case: all of it)
                    if written != data.size:
                        _durable.write_all(fd, data[written:], offset + written)
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
        data_file, fd = location.create_data_file(self.permissions)
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

    def _commit(self, location: _Location, data_path: str, data_fd: int, make_header: Any, durable: bool) -> Any:
        """Swap in a new sidecar under the dataset lock and return the old header
        (None if there was none), or _VANISHED if ``data_path`` no longer names the new
        data file: recovery in another process judged it abandoned in the instant between
        its creation and its liveness lock, and unlinked it (a writable open) or moved it
        to the quarantine (recover(), which moves files under this same lock).
        """
        lock = location.lock
        lock.acquire(self.timeout)
        entry = None
        try:
            lock.drop_held_file()  # a packed file this commit replaces: do not pin its space
            if not names_file(data_path, data_fd):
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

    def _write_sidecar_locked(self, location: _Location, header: Header, durable: bool) -> _Entry:
        """Commit ``header`` as the dataset's sidecar (the caller holds the dataset lock).

        Returns the new cached entry. A caller that releases
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
        entry = _Entry(header, sidecar_fd)
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
            # A stat(), not the entry's own counter check: that reads the lock file through
            # the entry's descriptor, which may be an orphan if the lock file was replaced
            # (the held lock's descriptor is checked at acquire; see DatasetLock._still_named).
            return self._recheck_entry(location, counted=False).header
        except DatasetNotFoundError:
            return None
        except FormatError:
            self._drop_entry(location.name)
            return None
