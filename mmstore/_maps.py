"""Mapping a dataset's data file for reading: the checks before a map, and the map.

Invariant 6: a header is checked against its data file (type, size) before anything is
mapped, so a corrupt dataset is a FormatError, never a SIGBUS later. Read-only maps keep
no more descriptors than a quarter of the process's limit (``mmap.mmap`` keeps one per
map): past it, a file is mapped over an anonymous map with MAP_FIXED and keeps none.
Growable data files start with a control block (its layout is in _growable.py's
docstring and docs/FORMAT.md, "Growable datasets"); its slots are named here.
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import os
import resource
import stat
import struct
import sys
import weakref
from typing import Any

import numpy as np

from . import _durable
from ._errors import FormatError, ReadOnlyError, access_denied
from ._format import Header
from ._mapping import buffer_digest

CONTROL_BYTES = 4096
MAGIC = b"MMSGROW\x01"
_LENGTH, _PUBLISHED, _CRC_ROWS = 1, 2, 4  # u64 slots of the control block
_CRC, _CRC_KNOWN = 6, 7  # u32 slots
_PUBLISH_OFFSET = 16

_READ, _READ_WRITE = mmap.PROT_READ, mmap.PROT_READ | mmap.PROT_WRITE

# Bound once for _Mapped: a module attribute lookup is a dictionary lookup per call.
_fstat, _S_ISREG, _prod, _mmap, _frombuffer, _asarray = (
    os.fstat, stat.S_ISREG, math.prod, mmap.mmap, np.frombuffer, np.asarray
)  # fmt: skip


def row_bytes(dtype: np.dtype[Any], row_shape: tuple[int, ...]) -> int:
    return math.prod(row_shape) * dtype.itemsize


def initial_control_block() -> bytes:
    block = bytearray(CONTROL_BYTES)
    block[0:8] = MAGIC
    struct.pack_into("<QQIIQ", block, 8, 0, 0, 0, 1, 0)
    return bytes(block)


class MissingDataFile(FormatError):
    """The data file a header names is gone: corrupt, or replaced since the header was read."""


class ChecksumMismatch(FormatError):
    """A packed generation's bytes do not match its header's checksum: corrupt, or a writer
    changed the sidecar (and then the bytes) since the header was read."""


def data_file_error(header: Header, exc: OSError, writing: bool = False) -> Exception:
    """The error for a data file that could not be opened (``writing``: read-write)."""
    if isinstance(exc, FileNotFoundError):
        return MissingDataFile(f"dataset {header.name!r}: data file {header.data_file!r} is missing")
    if isinstance(exc, PermissionError):
        if writing:
            return ReadOnlyError(
                exc.errno, f"dataset {header.name!r}: permission denied opening data file {header.data_file!r} to write"
            )
        return access_denied(header.name, f"its data file {header.data_file!r}")
    if exc.errno == errno.ELOOP:
        return FormatError(
            f"dataset {header.name!r}: data file {header.data_file!r} is a symlink; refusing to follow it"
        )
    return exc


def _fixed_mapping_function() -> Any:
    """The C library's mmap, for _map_without_descriptor (None where unavailable)."""
    if not sys.platform.startswith("linux"):
        return None
    argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    function = _durable.libc_function("mmap", *argtypes)
    if function is not None:
        function.restype = ctypes.c_void_p  # (an address, not the int libc_function sets)
    return function


_c_mmap = _fixed_mapping_function()

_MAP_FIXED = 0x10  # (Linux)

# The live read-only maps that keep a descriptor (weak references, which drop out when a
# map goes). Up to a quarter of the descriptor limit may; beyond, maps keep none.
_maps_with_descriptors: set[weakref.ref[mmap.mmap]] = set()

_track, _untrack, _weak = _maps_with_descriptors.add, _maps_with_descriptors.discard, weakref.ref

# [a quarter of the descriptor limit, maps since it was read]: read again every
# _LIMIT_READS maps (it may be lowered) and before a map goes without a descriptor.
_quarter_limit = [0, 0]

_LIMIT_READS = 256


def _map_read_only(fd: int, size: int) -> mmap.mmap:
    """A read-only shared map of the file's first ``size`` bytes."""
    state = _quarter_limit
    state[1] += 1
    if state[1] >= _LIMIT_READS or len(_maps_with_descriptors) >= state[0]:
        state[0], state[1] = _descriptor_limit() // 4, 0
    if len(_maps_with_descriptors) < state[0]:
        try:
            mapped = _mmap(fd, size, mmap.MAP_SHARED, _READ)
        except OSError as exc:  # (its duplicate descriptor)
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            return _map_without_descriptor(fd, size)
        _track(_weak(mapped, _untrack))
        return mapped
    return _map_without_descriptor(fd, size)


def _map_whole_read_only(fd: int) -> mmap.mmap | None:
    """A read-only shared map of the whole file, sized by mmap.mmap's own fstat() (so the
    caller need not make one), or None where _Mapped's checked path must decide: an empty
    or not regular file (mmap refuses both), the descriptor share used up, any error."""
    state = _quarter_limit
    if state[1] + 1 >= _LIMIT_READS or len(_maps_with_descriptors) + 1 >= state[0]:
        return None  # (time to read the limit again, or near it: the checked path does)
    try:
        mapped = _mmap(fd, 0, mmap.MAP_SHARED, _READ)
    except (OSError, ValueError):
        return None
    state[1] += 1
    _track(_weak(mapped, _untrack))
    return mapped


def _descriptor_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


def _map_without_descriptor(fd: int, size: int) -> mmap.mmap:
    """A read-only shared map of the file's first ``size`` bytes as an mmap object that
    keeps no descriptor.

    mmap.mmap keeps a duplicate of its file's descriptor for as long as it lives, and a
    map lives as long as any array of it: a process holding arrays of more generations
    than it may open files would fail with EMFILE. So, past _map_read_only's share of the
    limit, the file is mapped over an anonymous map (MAP_FIXED replaces its pages at the
    same address): the mmap object holds no descriptor and still unmaps the range when
    the last array of it goes. (It costs ~10 us more than a plain map, so it is not the
    default. Its mmap object's size() fails, having no file; mmstore never calls it.)
    """
    if _c_mmap is None:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    placeholder = mmap.mmap(-1, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    address = np.frombuffer(placeholder, np.uint8).__array_interface__["data"][0]
    if _c_mmap(address, size, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0) != address:
        code = ctypes.get_errno()
        placeholder.close()
        raise OSError(code, os.strerror(code))
    return placeholder


class _Mapped:
    """A map of a data file: the control block (growable datasets) and the rows."""

    __slots__ = ("capacity", "control", "control_u32", "map", "row_bytes", "row_shape", "rows", "size")

    def __init__(self, header: Header, path: str, writable: bool, fd: int | None = None) -> None:
        # (Every dataset's first read in a process comes here: fields are read once.)
        shape, dtype, offset = header.shape, header.dtype, header.offset
        self.row_shape = row_shape = shape[1:]
        self.row_bytes = row_bytes(dtype, row_shape)
        own_fd = fd is None
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC if writable else _durable.READ_FLAGS)
            except OSError as exc:
                raise data_file_error(header, exc, writable) from None
        try:
            # A reader maps the whole file first (its size is then the map's), and checks
            # the size against the header before any array is made of the map.
            mapped = None if writable else _map_whole_read_only(fd)
            if mapped is not None:
                size = len(mapped)
            else:
                st = _fstat(fd)
                if not _S_ISREG(st.st_mode):
                    raise FormatError(f"dataset {header.name!r}: data file {header.data_file!r} is not a regular file")
                size = st.st_size
            self.size = size
            try:
                if header.growable:
                    if offset != CONTROL_BYTES or size < CONTROL_BYTES or self.row_bytes == 0:
                        raise FormatError(f"dataset {header.name!r}: growable data file has no valid control block")
                    self.capacity = (size - CONTROL_BYTES) // self.row_bytes
                else:
                    self.capacity = shape[0] if shape else 1
                    count = _prod(shape)
                    end = offset + count * dtype.itemsize
                    # A packed file may run on past this generation (an unfinished append
                    # of a killed writer); any other data file is exactly its data.
                    if size < end if header.packed else size != end:
                        raise FormatError(f"dataset {header.name!r}: data file is {size} bytes, the header needs {end}")
            except BaseException:
                if mapped is not None:
                    mapped.close()
                raise
            if mapped is not None or not size:
                pass
            elif writable:
                mapped = _mmap(fd, size, mmap.MAP_SHARED, _READ_WRITE)
            else:
                mapped = _map_read_only(fd, size)
            self.map = mapped
        finally:
            if own_fd:
                os.close(fd)
        self.control: np.ndarray | None = None
        self.control_u32: np.ndarray | None = None
        if header.growable:
            assert mapped is not None
            if mapped[0:8] != MAGIC:
                raise FormatError(f"dataset {header.name!r}: bad control block magic")
            self.control = np.frombuffer(mapped, dtype="<u8", count=5)
            self.control_u32 = self.control.view("<u4")
            count = self.capacity * _prod(row_shape)
            rows = _frombuffer(mapped, dtype, count, CONTROL_BYTES).reshape((self.capacity, *row_shape))
        elif mapped is None:
            rows = np.zeros(shape, dtype)
        else:
            rows = _frombuffer(mapped, dtype, count, offset)
            if len(shape) != 1:
                rows = rows.reshape(shape)
            if header.packed and header.checksum is not None:
                # Cheap (a packed generation is small) and the only check that tells a
                # header pointing at another generation of the same file.
                actual = buffer_digest(mapped[offset:end], header.checksum.partition(":")[0])
                if actual != header.checksum:
                    raise ChecksumMismatch(
                        f"dataset {header.name!r}: checksum mismatch (header {header.checksum}, data {actual})"
                    )
        if not writable and mapped is None:
            rows.flags.writeable = False  # (a map made with PROT_READ gives read-only arrays already)
        self.rows = rows

    @property
    def bytes(self) -> memoryview:
        return memoryview(self.map) if self.map is not None else memoryview(b"")

    def committed_length(self, header: Header) -> int:
        if self.control is None:
            return header.shape[0] if header.shape else 0
        return int(self.control[_LENGTH])

    def published(self) -> int:
        return 0 if self.control is None else int(self.control[_PUBLISHED])


def validate_length(header: Header, mapped: _Mapped, length: int) -> int:
    if length > mapped.capacity:
        raise FormatError(
            f"dataset {header.name!r}: committed length {length} exceeds the data file's {mapped.capacity} rows"
        )
    return length
