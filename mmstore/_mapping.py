"""Streaming array bytes into data files (hashing them on the way) and checksumming them back."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xxhash

from . import _durable
from ._errors import FormatError, InvalidArgumentError
from ._format import XXH3_ALGORITHM, crc32_update, format_checksum

# Above this size the hash runs in a helper thread while the main thread writes.
_PARALLEL_CHECKSUM_BYTES = 8 * 2**20
_STREAM_CHUNK_BYTES = 32 * 2**20
_checksum_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _checksum_pool
    if _checksum_pool is None:
        _checksum_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmstore-crc")
    return _checksum_pool


def _forget_pool_after_fork() -> None:
    global _checksum_pool
    _checksum_pool = None  # the child has no thread behind the parent's pool


os.register_at_fork(after_in_child=_forget_pool_after_fork)


# Array-likes that put() reads in row blocks instead of loading whole: a 50 GB
# HDF5 dataset can be stored without 50 GB of memory.
_LAZY_MODULES = frozenset({"h5py", "zarr", "dask"})


class RowSource:
    """An array-like read in row blocks: ``shape``, ``dtype`` and ``source[a:b]``.

    ``view`` reinterprets each block's bytes (HDF5 import of datetime64 or unicode
    columns stored as integers).
    """

    def __init__(self, source: Any, view: np.dtype[Any] | None = None) -> None:
        if source.shape is None:  # (h5py's null dataspace: a dataset that holds no array at all)
            raise InvalidArgumentError(f"{_describe(source)} has a null dataspace: it holds no array, not even empty")
        self.source = source
        self.source_dtype = np.dtype(source.dtype)
        self.dtype = view if view is not None else self.source_dtype
        if self.dtype.itemsize != self.source_dtype.itemsize:
            # Unicode stored as (..., n) code units: the last axis folds into the item.
            self.shape = tuple(source.shape)[:-1]
        else:
            self.shape = tuple(source.shape)
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize

    def block(self, start: int, stop: int) -> np.ndarray:
        raw = np.ascontiguousarray(np.asarray(self.source[start:stop] if self.shape else self.source[...]))
        return raw.view(self.dtype).reshape((stop - start, *self.shape[1:]) if self.shape else ())


def _describe(source: Any) -> str:
    """How an error names a lazy source: an HDF5 dataset by its path."""
    name = getattr(source, "name", None)
    return f"HDF5 dataset {name!r}" if isinstance(name, str) else f"this {type(source).__name__}"


def refuse_masked(obj: Any) -> None:
    """Masked arrays (and containers of them) cannot be stored: the mask would be lost."""
    if isinstance(obj, np.ma.MaskedArray) or (
        isinstance(obj, (tuple, list, dict))
        and any(isinstance(item, np.ma.MaskedArray) for item in (obj.values() if isinstance(obj, dict) else obj))
    ):
        raise InvalidArgumentError(
            "masked arrays cannot be stored (the mask would be lost): store array.filled(value), "
            "and array.mask as a second dataset if it matters"
        )


def as_source(obj: Any) -> np.ndarray | RowSource:
    """An ndarray, or a RowSource for large lazy array-likes (h5py, zarr, dask)."""
    if type(obj) is np.ndarray:  # (the usual case, first)
        return obj
    refuse_masked(obj)
    if isinstance(obj, (np.ndarray, RowSource)):
        return obj
    if type(obj).__module__.partition(".")[0] in _LAZY_MODULES and hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return RowSource(obj)
    try:
        return np.asarray(obj)
    except (TypeError, ValueError) as exc:  # a ragged list, an object NumPy cannot convert
        raise InvalidArgumentError(f"cannot make an array of this {type(obj).__name__}: {exc}") from None


def _byte_chunks(array: np.ndarray | RowSource) -> Any:
    """Yield the array's C-order bytes as buffers of at most ~_STREAM_CHUNK_BYTES."""
    if array.size == 0:
        return
    if isinstance(array, RowSource):
        if not array.shape:
            yield array.block(0, 1).reshape(-1).view(np.uint8)
            return
        row_bytes = max(array.nbytes // array.shape[0], 1)
        rows_per_chunk = max(_STREAM_CHUNK_BYTES // row_bytes, 1)
        for start in range(0, array.shape[0], rows_per_chunk):
            yield array.block(start, min(start + rows_per_chunk, array.shape[0])).reshape(-1).view(np.uint8)
        return
    if array.flags.c_contiguous:
        flat = array.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, _STREAM_CHUNK_BYTES):
            yield flat[start : start + _STREAM_CHUNK_BYTES]
        return
    if array.ndim == 0:  # pragma: no cover - 0-d arrays are always contiguous
        yield np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        return
    row_bytes = max(array.nbytes // array.shape[0], 1)
    rows_per_chunk = max(_STREAM_CHUNK_BYTES // row_bytes, 1)
    for start in range(0, array.shape[0], rows_per_chunk):
        block = np.ascontiguousarray(array[start : start + rows_per_chunk])
        yield block.reshape(-1).view(np.uint8)


def write_array(fd: int, array: np.ndarray | RowSource, hasher: Any) -> None:
    """Write the array's bytes in C order to ``fd``, feeding them to ``hasher`` too."""
    if isinstance(array, np.ndarray) and array.flags.c_contiguous and array.nbytes <= _STREAM_CHUNK_BYTES:
        if array.nbytes:
            data = array.reshape(-1).view(np.uint8)
            _durable.write_all(fd, data)
            hasher.update(data)
        return
    if isinstance(array, np.ndarray) and array.flags.c_contiguous and array.nbytes >= _PARALLEL_CHECKSUM_BYTES:
        # Hash the whole buffer in the helper thread while this one writes it in one go:
        # os.write releases the GIL for the whole copy, so the two overlap completely
        # (a chunked pipeline would hand the GIL back and forth at every chunk).
        data = array.reshape(-1).view(np.uint8)
        future = _pool().submit(hasher.update, data)
        try:
            _durable.write_all(fd, data)
        finally:
            future.result()
        return
    if array.nbytes < _PARALLEL_CHECKSUM_BYTES:
        for chunk in _byte_chunks(array):
            _durable.write_all(fd, chunk)
            hasher.update(chunk)
        return
    pool = _pool()
    previous = None
    for chunk in _byte_chunks(array):
        # Chunk k is hashed in the helper thread while the kernel copies it into the
        # page cache (os.write releases the GIL). One worker keeps the updates in order;
        # waiting for chunk k-1 bounds the memory held by pending chunks.
        future = pool.submit(hasher.update, chunk)
        _durable.write_all(fd, chunk)
        if previous is not None:
            previous.result()
        previous = future
    if previous is not None:
        previous.result()


def write_and_digest(fd: int, array: np.ndarray | RowSource) -> str:
    """write_array() to ``fd`` with a new hasher; return the checksum string (``xxh3_64:hex``)."""
    if isinstance(array, np.ndarray) and 0 < array.nbytes <= _STREAM_CHUNK_BYTES and array.flags.c_contiguous:
        # The usual small put: one write, one hash call, both of the byte view (a buffer).
        data: Any = array.reshape(-1).view(np.uint8)
        written = os.write(fd, data)
        if written != data.size:  # (a short write: write the rest)
            _durable.write_all(fd, data[written:])
        return f"{XXH3_ALGORITHM}:{xxhash.xxh3_64_hexdigest(data)}"
    hasher = new_hasher()
    write_array(fd, array, hasher)
    return f"{XXH3_ALGORITHM}:{hasher.hexdigest()}"


def new_hasher() -> Any:
    """The hash of put's data files (docs/FORMAT.md: ``xxh3_64``, ~9 GB/s against zlib CRC-32's ~3)."""
    return xxhash.xxh3_64()


def file_digest(fd: int, offset: int, nbytes: int, algorithm: str) -> str:
    """The checksum string (``algorithm:hex``) of ``nbytes`` at ``offset`` in open file ``fd``."""
    if algorithm == "crc32":
        return format_checksum(crc32_file(fd, offset, nbytes))
    hasher = new_hasher()
    _read_chunks(fd, offset, nbytes, hasher.update)
    return f"{XXH3_ALGORITHM}:{hasher.hexdigest()}"


def buffer_digest(data: Any, algorithm: str) -> str:
    """The checksum string (``algorithm:hex``) of the bytes in ``data``."""
    if algorithm == "crc32":
        return format_checksum(crc32_update(0, data))
    return f"{XXH3_ALGORITHM}:{xxhash.xxh3_64_hexdigest(data)}"


def crc32_file(fd: int, offset: int, nbytes: int) -> int:
    """CRC-32 of ``nbytes`` at ``offset`` in open file ``fd``, read in bounded chunks."""
    state = [0]

    def update(chunk: bytes) -> None:
        state[0] = crc32_update(state[0], chunk)

    _read_chunks(fd, offset, nbytes, update)
    return state[0]


def _read_chunks(fd: int, offset: int, nbytes: int, consume: Any) -> None:
    # The caller opened the file (through Store._open_data: never through a symlink).
    position = offset
    end = offset + nbytes
    while position < end:
        chunk = os.pread(fd, min(_STREAM_CHUNK_BYTES, end - position), position)
        if not chunk:
            raise FormatError(f"data file ended at byte {position}, expected {end}")
        consume(chunk)
        position += len(chunk)
