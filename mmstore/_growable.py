"""Writer handles: appends, in-place edits, flush and close.

Store.create and Store.open_writer make and hand over a Writer in _create.py; values
that are not already rows of the dataset's dtype are converted (or refused) in _rows.py.

A growable dataset's data file starts with a 4096-byte control block, then the
rows (docs/FORMAT.md, "Growable datasets")::

    0   8  magic  b"MMSGROW\\x01"
    8   8  committed length (rows), u64 little-endian: what readers may see
    16  8  publish count, u64: +1 on every flush
    24  4  CRC-32 of the first `checksummed rows` rows
    28  4  1 if that CRC is valid, 0 once rows were edited in place
    32  8  checksummed rows, u64

The CRC is brought up to date by flush(durable=True) and close(), not by every
flush: a CRC per single-row flush would cost as much as the append itself.

Invariant 3: appended rows are written into the file beyond the committed
length (readers never look there), and only then does flush() store the new
length, an aligned 8-byte store that readers see whole. The publish count is
written with pwrite(), which both orders it after the rows and length (a
system call is a full barrier) and wakes followers through inotify
(_notify.py). The file only grows (posix_fallocate, so in-place writes through
the map can never hit ENOSPC as a SIGBUS), so a reader's map never loses pages.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _durable
from ._errors import (
    ArgumentTypeError,
    ClosedError,
    FsyncError,
    InvalidArgumentError,
)
from ._format import XXH3_ALGORITHM, Header, timestamp_now
from ._mapping import buffer_digest
from ._maps import (
    _CRC,
    _CRC_KNOWN,
    _CRC_ROWS,
    _LENGTH,
    _PUBLISH_OFFSET,
    CONTROL_BYTES,
    _Mapped,
    validate_length,
)
from ._rows import as_rows, check_spread, converted

if TYPE_CHECKING:
    from ._entries import _Location
    from ._store import Store

# Appends up to this size are copied through the map (no system call); larger
# ones use pwrite(), which avoids a page fault per fresh page.
_MAPPED_APPEND_BYTES = 64 * 1024
_MIN_GROWTH_BYTES = 1 << 20
_PACK_U64 = struct.Struct("<Q").pack


def _allocate(fd: int, size: int, name: str) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise _durable.io_error(exc, f"dataset {name!r}: reserving {size} bytes") from None


def _edited_dtype(dtype: np.dtype[Any], index: Any) -> tuple[np.dtype[Any], str]:
    """The dtype of what ``index`` picks from records of ``dtype`` (a field's for a name,
    several fields' for a list of names, the records' own for rows), and the words that
    say what a refusal refused."""
    if isinstance(index, str) or (isinstance(index, list) and index and all(isinstance(i, str) for i in index)):
        try:
            return dtype[index], f"store values (field {index!r})"
        except (KeyError, ValueError) as exc:
            raise InvalidArgumentError(f"no field {index!r} in dtype {dtype}: {exc}") from None
    return dtype, "store values"


class Writer:
    """The one writer of a dataset: appends (growable), in-place edits, flush.

    Holds the dataset's writer lock until close(); a second writer (or a put)
    waits for the store's timeout, then raises LockTimeout. close() flushes.
    A writer dropped without close() (a create() whose result is not kept, a
    handle that goes out of scope) publishes its rows and releases the lock when
    it is collected, with a ResourceWarning, as an unclosed file does.
    """

    def __init__(self, store: Store, location: _Location, header: Header, fd: int) -> None:
        # Set by create()/open_writer() once the writer is handed the lock; until then a
        # failed open releases the lock itself, and a collected half-made writer must not.
        self._owns_lock = False
        self._store = store
        self._location = location
        self._header = header
        self._fd = fd
        self._closed = False
        # One close, whichever thread comes first (Store.close() may race the owner). Reentrant,
        # with _closing, so a close from a signal handler during a close returns at once.
        self._close_guard = threading.RLock()
        self._closing = False
        # Held across every use of the descriptor and of the writable map (append, an edit,
        # flush, grow, close), so close() -- from Store.close() in another thread, say --
        # cannot close the descriptor in the middle of one: its number could name another
        # file by the time the write lands. Taken after any slow conversion of the values
        # (a close waits for a write, not for a caller's array). Reentrant, as _close_guard:
        # a close from a signal handler or a finalizer in the same thread must not deadlock
        # (the interrupted write then finds the descriptor -1 and fails with ClosedError).
        self._use_guard = threading.RLock()
        self._closed_reason = "closed"
        self._failed = False
        self.name = header.name
        self.dtype = header.dtype
        self.growable = header.growable
        self._mapped = _Mapped(header, location.data_path(header.data_file), writable=True, fd=fd)
        self._length = self._mapped.committed_length(header)
        validate_length(header, self._mapped, self._length)
        self._committed = self._length
        halves = self._mapped.control_u32
        self._crc = int(halves[_CRC]) if halves is not None else 0
        self._crc_known = bool(halves[_CRC_KNOWN]) if halves is not None else False
        self._crc_rows = int(self._mapped.control[_CRC_ROWS]) if self._mapped.control is not None else 0
        if self._crc_rows > self._length:
            self._crc_known = False
        self._published = self._mapped.published()
        self._row_shape = self._mapped.row_shape
        self._sidecar_durable = False  # flush(durable=True) syncs the sidecar and directory once
        self._edited = False  # in-place edits since the last flush
        self._unsynced = False  # published changes no fsync has covered (Store.flush() after close)
        self._rehash_on_close = False  # a packed generation whose checksum an edit cleared

    # --- shape and data ---------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._length, *self._mapped.row_shape) if self._header.shape else ()

    @property
    def committed_length(self) -> int:
        return self._committed

    def __len__(self) -> int:
        if not self._header.shape:
            raise ArgumentTypeError("len() of a 0-d dataset")
        return self._length

    @property
    def array(self) -> np.ndarray:
        """A writable view of every row written so far (flushed or not). Edits through it
        are in place: readers see them at once, and the data checksum becomes unknown."""
        with self._use_guard:
            self._check_open()
            self._note_edit()
            return self._mapped.rows[: self._length] if self._header.shape else self._mapped.rows

    def __getitem__(self, index: Any) -> Any:
        self._check_open()
        rows = self._mapped.rows[: self._length] if self._header.shape else self._mapped.rows
        return rows[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        self._check_open()
        names = self.dtype.names
        if names is None:
            if not (type(value) is np.ndarray and value.dtype == self.dtype):
                value = converted(value, self.dtype, self.name, "store values")
        elif isinstance(value, (np.ndarray, np.void)) and value.dtype.names not in (None, names):
            # (NumPy assigns records by position.)
            raise InvalidArgumentError(
                f"cannot store records with fields {value.dtype.names} in dataset {self.name!r} with fields {names} "
                "(records match by field name, in order)"
            )
        else:  # the checks append makes, of what the index picks: records, one field or several
            target, what = _edited_dtype(self.dtype, index)
            spread = target.names is not None and not isinstance(value, (tuple, list, np.void))
            if spread and not (isinstance(value, np.ndarray) and value.dtype.names is not None):
                check_spread(value, target, self.name, what)  # NumPy stores each value into every field
            elif not (type(value) is np.ndarray and value.dtype == target):
                value = converted(value, target.base, self.name, what)
        with self._use_guard:
            self._check_open()  # (again: close() may have run while the value was converted)
            self._note_edit()
            rows = self._mapped.rows[: self._length] if self._header.shape else self._mapped.rows
            try:
                rows[index] = value
            except ValueError as exc:  # (a value of another shape: NumPy cannot broadcast it)
                raise InvalidArgumentError(f"cannot store values in dataset {self.name!r}: {exc}") from None

    def _note_edit(self) -> None:
        """Before the first in-place edit: the sidecar's data checksum (a dataset made by
        put) stops being true, so a sidecar without it is committed first (same data file
        and generation). Readers check a packed generation's checksum when they map it,
        so a packed one gets its checksum back at close()."""
        self._crc_known = False
        self._edited = True
        halves = self._mapped.control_u32
        if halves is not None and halves[_CRC_KNOWN]:
            halves[_CRC_KNOWN] = 0  # now, not at close: a writer killed after the edit leaves no stale CRC
        if self._header.checksum is not None and not self.growable:
            self._rewrite_sidecar(checksum=None)
            self._rehash_on_close = self._header.packed

    def _rewrite_sidecar(self, **changes: Any) -> None:
        """Commit the sidecar again with ``changes`` (same data file and generation)."""
        self._header = self._header._replace(modified=timestamp_now(), **changes)
        self._store._write_sidecar_locked(self._location, self._header, durable=False)
        self._store._mark_dirty(self._location)  # Store.flush() makes it durable
        # And so does this writer's next durable flush: the sidecar it synced is replaced (one
        # with a checksum that the edit made untrue would come back after a power loss).
        self._sidecar_durable = False

    def append(self, rows: Any) -> None:
        """Append one row or a block of rows; they become visible to readers at flush()."""
        if self._closed or self._failed:
            raise ClosedError(f"writer of dataset {self.name!r} is {self._closed_reason}")
        if not self.growable:
            raise InvalidArgumentError(f"dataset {self.name!r} is not growable; create it with growable=True to append")
        if type(rows) is np.ndarray and rows.shape == self._row_shape and rows.dtype == self.dtype:
            # One row of the right dtype: the hot path of a producer appending sample by sample.
            with self._use_guard:
                if self._closed:
                    self._check_open()
                start = self._length
                if start >= self._mapped.capacity:
                    self._grow(start + 1)
                mapped = self._mapped
                mapped.rows[start] = rows
                self._length = start + 1
            return
        block = as_rows(rows, self.dtype, self._mapped.row_shape, self.name)
        count = block.shape[0]
        if count == 0:
            return
        nbytes = count * self._mapped.row_bytes
        mapped_copy = nbytes <= _MAPPED_APPEND_BYTES
        if not mapped_copy:
            block = np.ascontiguousarray(block, dtype=self.dtype)
        with self._use_guard:
            self._check_open()  # (again: close() may have run while the rows were converted)
            start = self._length
            end = start + count
            if end > self._mapped.capacity:
                self._grow(end)
            if mapped_copy:
                if block.dtype == self.dtype and block.flags.c_contiguous:
                    # Byte copy: NumPy's structured-dtype assignment costs ~2 us even for one row.
                    offset = CONTROL_BYTES + start * self._mapped.row_bytes
                    self._mapped.map[offset : offset + nbytes] = block.reshape(-1).view(np.uint8).data  # type: ignore[index]
                else:
                    self._mapped.rows[start:end] = block
            else:
                try:
                    position = CONTROL_BYTES + start * self._mapped.row_bytes
                    _durable.write_all(self._fd, block.reshape(-1).view(np.uint8), position)
                except OSError as exc:
                    self._check_open()  # closed from a signal handler meanwhile: EBADF
                    raise _durable.io_error(exc, f"dataset {self.name!r}: appending {count} rows") from None
            self._length = end

    def _grow(self, needed: int) -> None:
        """Reserve room for ``needed`` rows and map the file again (under _use_guard)."""
        capacity = self._mapped.capacity
        minimum = max(1, _MIN_GROWTH_BYTES // max(self._mapped.row_bytes, 1))
        new_capacity = max(needed, capacity + capacity // 2, capacity + minimum)
        _allocate(self._fd, CONTROL_BYTES + new_capacity * self._mapped.row_bytes, self.name)
        # The old map stays valid for whoever holds arrays from it: the file only grew.
        self._mapped = _Mapped(self._header, "", writable=True, fd=self._fd)

    # --- publishing -------------------------------------------------------------

    def flush(self, durable: bool = False) -> None:
        """Publish every appended row to readers; ``durable=True`` also fsyncs first and after."""
        with self._use_guard:
            self._flush(durable)

    def _flush(self, durable: bool) -> None:
        if self._closed or self._failed:
            raise ClosedError(f"writer of dataset {self.name!r} is {self._closed_reason}")
        control = self._mapped.control
        try:
            if durable:
                self._fsync()  # rows reach the disk before the length that covers them
            # A new commit for readers (wait() returns, followers wake): new rows or in-place
            # edits since the last flush. A durable flush of nothing new only syncs.
            changed = self._length != self._committed or self._edited
            if control is not None and (changed or durable):
                if durable:
                    self._update_checksum(control)
                control[_LENGTH] = self._length  # one aligned 8-byte store: readers see it whole
                if changed:
                    self._published += 1
                    os.pwrite(self._fd, _PACK_U64(self._published), _PUBLISH_OFFSET)  # orders, wakes followers
                if durable:
                    self._fsync()
            if durable and not self._sidecar_durable:
                self._sync_sidecar()
        except OSError as exc:
            raise _durable.io_error(exc, f"dataset {self.name!r}: flush") from None
        if durable:
            self._unsynced = False
        elif self._length != self._committed or self._edited:
            self._unsynced = True
        self._committed = self._length
        self._edited = False

    def _update_checksum(self, control: np.ndarray) -> None:
        """Extend the CRC over rows written since it was last brought up to date."""
        halves = self._mapped.control_u32
        assert halves is not None
        if self._crc_known and self._length > self._crc_rows:
            start = CONTROL_BYTES + self._crc_rows * self._mapped.row_bytes
            end = CONTROL_BYTES + self._length * self._mapped.row_bytes
            view = self._mapped.bytes
            for chunk_start in range(start, end, 1 << 26):
                self._crc = zlib.crc32(view[chunk_start : min(end, chunk_start + (1 << 26))], self._crc)
            self._crc_rows = self._length
        crc, known, rows = self._crc & 0xFFFFFFFF, int(self._crc_known), self._crc_rows
        if halves[_CRC] == crc and halves[_CRC_KNOWN] == known and control[_CRC_ROWS] == rows:
            return
        # A kill between any two of these stores leaves fields that verify() accepts: the
        # CRC is marked unknown before it and the rows it covers change, and marked known
        # only after both. (Checksummed rows past the committed length, left by a kill
        # before flush() stores the length, read as "CRC unknown" too.)
        halves[_CRC_KNOWN] = 0
        halves[_CRC] = crc
        control[_CRC_ROWS] = rows
        halves[_CRC_KNOWN] = known

    def close(self) -> None:
        """Flush, record the committed length in the sidecar, release the writer lock.
        (Store.close() may close a writer while its owner does: one of them does it.)"""
        with self._close_guard:
            if self._closed or self._closing:
                return
            self._closing = True
            try:
                with self._use_guard:  # (waits for a write under way in another thread)
                    self._close()
            finally:
                self._closing = False  # (an interrupt before _close ran: a retry can close)

    def _close(self) -> None:
        try:
            if self._failed:
                return  # nothing more is published after an fsync error; the lock is released below
            self.flush()
            if self._mapped.control is not None:
                self._update_checksum(self._mapped.control)
            if self._rehash_on_close:
                data = self._mapped.rows.reshape(-1).view(np.uint8)
                self._rewrite_sidecar(checksum=buffer_digest(data, XXH3_ALGORITHM))
            if self.growable and self._committed != self._header.shape[0]:
                self._rewrite_sidecar(shape=(self._committed, *self._mapped.row_shape))  # the committed length
            self._mark_unsynced_dirty()
        finally:
            self._closed = True
            fd, self._fd = self._fd, -1  # a late use fails with EBADF, never reaches a reused number
            try:
                os.close(fd)
            finally:
                self._location.lock.release()
                self._store._writers.discard(self)

    def _mark_unsynced_dirty(self) -> None:
        """Leave the data file to Store.flush() if published rows or edits are not yet
        durable (it syncs open writers itself, but not closed ones)."""
        if self._unsynced:
            data_path = self._location.data_path(self._header.data_file)
            self._store._mark_dirty(self._location, data_path, sidecar=False)

    def __del__(self) -> None:
        # Collected without close(): do what close() does that matters, with a ResourceWarning.
        if not self.__dict__.get("_owns_lock") or self._closed:
            return
        try:
            warnings.warn(
                f"writer of dataset {self.name!r} was not closed; closing it now (use close() or a with block)",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
        except Exception:  # (interpreter shutdown)
            pass
        try:
            self._close_collected()
        except Exception:  # nothing can report it here; the lock is released either way
            pass

    def _close_collected(self) -> None:
        """close() for a collected writer: publish the rows, bring the CRC up to date and
        release the lock. A collection can run this anywhere, even inside this package's
        own critical sections, so it takes only reentrant guards (the store's dirty set,
        the idle locks) and commits no sidecar: the sidecar keeps its older recorded
        length, readers take the committed length from the control block, and the next
        writer's close() records it."""
        with self._close_guard, self._use_guard:  # (nobody else can hold them: the writer is unreachable)
            if self._closed or self._closing:
                return
            self._closing = True
            try:
                if not self._failed:
                    self.flush()
                    if self._mapped.control is not None:
                        self._update_checksum(self._mapped.control)  # (as close() does)
                    self._mark_unsynced_dirty()
            finally:
                self._closed = True
                self._closing = False
                fd, self._fd = self._fd, -1
                try:
                    os.close(fd)
                finally:
                    self._location.lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"writer of dataset {self.name!r} is {self._closed_reason}")

    def _sync_sidecar(self) -> None:
        """fsync the sidecar that names this data file, then its directories (once per
        writer: rows made durable are only reachable after a power loss if the sidecar
        pointing at their file is durable too, e.g. right after create())."""
        location = self._location
        try:
            fd = os.open(location.sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise _durable.io_error(exc, f"dataset {self.name!r}: opening its sidecar to sync it") from None
        try:
            self._fsync(lambda: _durable.fsync(fd, f"dataset {self.name!r}"))
        finally:
            os.close(fd)
        self._fsync(lambda: _durable.fsync_dir_chain(location.directory, self._store.path))
        self._sidecar_durable = True

    def _sync_committed(self) -> None:
        """Make the flushed rows durable (Store.flush); pending rows stay unpublished.

        Called from whichever thread flushes the store, while the owner may close the
        writer: the fsync goes through a duplicate of the descriptor, taken under
        _use_guard, so it never reaches a closed (perhaps reused) number, and close()
        need not wait for it. A writer closed first is left to Store.flush(): its close
        marked its unsynced data file dirty (_mark_unsynced_dirty)."""
        with self._use_guard:
            if self._closed or self._failed:
                return
            fd = os.dup(self._fd)
        try:
            self._fsync(lambda: _durable.fsync(fd, f"dataset {self.name!r}"))
        finally:
            os.close(fd)

    def _fsync(self, sync: Callable[[], None] | None = None) -> None:
        """fsync the data file (or run ``sync``, another fsync); after a failure this writer
        refuses to publish anything more."""
        try:
            if sync is None:
                _durable.fsync(self._fd, f"dataset {self.name!r}")
            else:
                sync()
        except FsyncError:
            self._closed_reason = "unusable after an fsync error (reopen it to go on)"
            self._failed = True
            raise

    def _forget_after_fork(self) -> None:
        """In a forked child: this handle is the parent's. Close our copy of the
        descriptor (the parent's lock stays held) and refuse further use."""
        self._close_guard = threading.RLock()  # (another thread may have held it at the fork)
        self._use_guard = threading.RLock()
        if not self._closed:
            self._closed = True
            self._closed_reason = "owned by the parent process (writers are not inherited across fork)"
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._committed} committed, {self._length} written"
        return f"<mmstore.Writer {self.name!r} {state}>"
