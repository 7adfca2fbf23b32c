"""Store.create and Store.open_writer: making a dataset's data file, or reopening it,
and handing its Writer (_growable.py) the dataset's lock.

A new growable data file gets its control block (layout in _growable.py's docstring)
before its sidecar is committed. Until a writer is handed over, a failure releases the
lock here (_abandon), exactly once even against a concurrent Store.close().
"""

from __future__ import annotations

import math
import operator
import os
import struct
import sys
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _durable
from ._dtypes import as_dtype, encode_dtype
from ._errors import DatasetExistsError, InvalidArgumentError
from ._format import Header, encode_attrs, successor_header
from ._growable import Writer, _allocate
from ._locks import mark_alive
from ._maps import CONTROL_BYTES, data_file_error, initial_control_block, row_bytes

if TYPE_CHECKING:
    from ._entries import _Location
    from ._store import Store


def create_dataset(
    store: Store,
    location: _Location,
    dtype: Any,
    shape: Any,
    growable: bool,
    attrs: Any,
    capacity: int | None,
    exist_ok: bool,
) -> Writer:
    """Store.create: make the data file, commit its sidecar, return the writer (holding the lock)."""
    name = location.name
    for flag, value in (("growable", growable), ("exist_ok", exist_ok)):
        if not isinstance(value, (bool, np.bool_)):  # ("no" or "false" would read as true)
            raise InvalidArgumentError(f"dataset {name!r}: {flag} must be True or False, not {value!r}")
    growable, exist_ok = bool(growable), bool(exist_ok)
    dtype = as_dtype(dtype, f"dataset {name!r}")
    encode_dtype(dtype)
    shape = _as_shape(shape, name)
    if growable and (not shape or row_bytes(dtype, shape[1:]) == 0):
        raise InvalidArgumentError(
            f"dataset {name!r}: a growable dataset needs at least one dimension and non-empty rows; got shape {shape}"
        )
    if capacity is not None:
        try:
            capacity = operator.index(capacity)
        except TypeError:
            raise InvalidArgumentError(
                f"dataset {name!r}: capacity must be a whole number of rows or None, not {capacity!r}"
            ) from None
        if capacity < 0:
            raise InvalidArgumentError(f"dataset {name!r}: capacity {capacity} is negative")
    if growable:
        nbytes = CONTROL_BYTES + max(shape[0], capacity or 0, 1) * row_bytes(dtype, shape[1:])
    else:
        nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > sys.maxsize:  # (a file offset, and a map's size, are signed 64-bit numbers)
        raise InvalidArgumentError(
            f"dataset {name!r}: shape {shape}"
            + (f" with capacity {capacity}" if capacity else "")
            + f" needs {nbytes} bytes, more than a file can hold"
        )
    attrs_record = encode_attrs(attrs)
    lock = location.lock
    lock.acquire(store.timeout)
    writer = None
    try:
        lock.drop_held_file()  # a packed file this may replace: do not pin its space
        old_header = store._committed_header(location)
        if old_header is not None and not exist_ok:
            raise DatasetExistsError(f"dataset {name!r} already exists (use open_writer, or exist_ok=True to replace)")
        data_file, fd = location.create_data_file(store.permissions)
        data_path = location.data_path(data_file)
        try:
            mark_alive(fd)
            if growable:
                rows = max(shape[0], capacity or 0)
                _durable.write_all(fd, initial_control_block())
                _allocate(fd, CONTROL_BYTES + max(rows, 1) * row_bytes(dtype, shape[1:]), name)
                if shape[0]:
                    zeros_crc = 0
                    zero_block = bytes(min(shape[0] * row_bytes(dtype, shape[1:]), 1 << 24))
                    remaining = shape[0] * row_bytes(dtype, shape[1:])
                    while remaining:
                        step = min(remaining, len(zero_block))
                        zeros_crc = zlib.crc32(zero_block[:step], zeros_crc)
                        remaining -= step
                    os.pwrite(fd, struct.pack("<QQIIQ", shape[0], 0, zeros_crc, 1, shape[0]), 8)
                offset = CONTROL_BYTES
            else:
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes:
                    _allocate(fd, nbytes, name)
                offset = 0
            header = successor_header(
                old_header, name=name, dtype=dtype, shape=shape, data_file=data_file, offset=offset,
                attrs=attrs_record, checksum=None, growable=growable,
            )  # fmt: skip
            store._write_sidecar_locked(location, header, durable=False)
        except BaseException:
            os.close(fd)
            store._discard_uncommitted(location, data_file)
            raise
        store._mark_dirty(location, data_path)  # Store.flush() makes the new dataset durable
        os.close(fd)  # the writer reopens it; the file is referenced now
        if old_header is not None:
            _durable.unlink_quietly(location.data_path(old_header.data_file))
        writer = _open_locked(store, location, header)
        _register(store, writer, lock)
    except BaseException:
        _abandon(writer, lock)
        raise
    return _handed_over(store, writer)


def open_dataset_writer(store: Store, location: _Location) -> Writer:
    """Store.open_writer: take the dataset's lock and open its data file read-write."""
    lock = location.lock
    lock.acquire(store.timeout)
    writer = None
    try:
        lock.drop_held_file()  # the writer maps the file itself
        header = store._current_entry(location).header
        writer = _open_locked(store, location, header)
        _register(store, writer, lock)
    except BaseException:
        _abandon(writer, lock)
        raise
    return _handed_over(store, writer)


def _open_locked(store: Store, location: _Location, header: Header) -> Writer:
    """The writer of a dataset whose lock the caller holds (and releases if this raises)."""
    try:
        fd = location.open_file(header.data_file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise data_file_error(header, exc, writing=True) from None
    try:
        return Writer(store, location, header, fd)
    except BaseException:
        os.close(fd)
        raise


def _register(store: Store, writer: Writer, lock: Any) -> None:
    """Make a new writer the holder of its dataset's lock, known to its store. (The caller
    has assigned ``writer`` already: if a failure follows, _abandon releases the lock, once.)"""
    writer._owns_lock = True
    lock.holder = f"the writer of {writer.name!r} (not closed yet)"
    store._writers.add(writer)


def _abandon(writer: Writer | None, lock: Any) -> None:
    """On a failure before a new writer was handed over: drop it (if it got that far)
    without its lock, then release the lock, once."""
    if writer is not None:
        writer._store._writers.discard(writer)
        with writer._close_guard:
            if writer._closed or writer._closing:
                return  # a concurrent Store.close() closed it, releasing the lock: once is all
            writer._closed = True
        fd, writer._fd = writer._fd, -1
        try:
            os.close(fd)
        except OSError:
            pass
    lock.release()


def _handed_over(store: Store, writer: Writer) -> Writer:
    """A new writer, which owns its dataset's lock from here; if close() ran meanwhile (it
    marks the store closed before closing the writers it knows), the writer is closed,
    releasing the lock once whoever gets there first, and ClosedError raised."""
    if store._closed:
        writer.close()
        store._check_open()
    return writer


def _as_shape(shape: Any, name: str) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        result = tuple(operator.index(n) for n in shape)
    except TypeError:
        raise InvalidArgumentError(f"dataset {name!r}: shape must be a tuple of integers, not {shape!r}") from None
    if any(n < 0 for n in result):
        raise InvalidArgumentError(f"dataset {name!r}: shape {result} has a negative dimension")
    return result
