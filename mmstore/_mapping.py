"""Moving array bytes between NumPy and data files: zero-copy maps and streamed writes."""

from __future__ import annotations

import math
import mmap
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import _durable
from ._errors import FormatError
from ._format import Header, crc32_update

# Above this size the checksum runs in a helper thread while the main thread
# writes: zlib.crc32 and os.write both release the GIL, so on two cores the
# checksum costs no wall time.
_PARALLEL_CHECKSUM_BYTES = 8 * 2**20
_STREAM_CHUNK_BYTES = 32 * 2**20
_checksum_pool: ThreadPoolExecutor | None = None

_MMAP_EXTRA: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def map_readonly(header: Header, data_path: str, length: int | None = None) -> np.ndarray:
    """Map the dataset's data file read-only and return it as a read-only array.

    ``length`` overrides the first dimension (growable datasets map only their
    committed prefix). The file is checked against the header first, so a short
    file raises FormatError instead of a SIGBUS on first touch.
    """
    shape = header.shape if length is None else (length, *header.shape[1:])
    nbytes = math.prod(shape) * header.dtype.itemsize
    try:
        fd = os.open(data_path, _durable.READ_FLAGS)
    except FileNotFoundError:
        raise FormatError(f"dataset {header.name!r}: data file {header.data_file!r} is missing") from None
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise
        raise FormatError(
            f"dataset {header.name!r}: cannot open data file {header.data_file!r} ({exc.strerror})"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"dataset {header.name!r}: data file {header.data_file!r} is not a regular file")
        needed = header.offset + nbytes
        if st.st_size < needed or (not header.growable and st.st_size != needed):
            raise FormatError(
                f"dataset {header.name!r}: data file {header.data_file!r} is {st.st_size} bytes, "
                f"the header needs {needed} (offset {header.offset} + {nbytes})"
            )
        if nbytes == 0:
            empty = np.empty(shape, header.dtype)
            empty.flags.writeable = False
            return empty
        mapped = mmap.mmap(fd, needed, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, **_MMAP_EXTRA)
    finally:
        os.close(fd)
    array = np.frombuffer(mapped, dtype=header.dtype, count=math.prod(shape), offset=header.offset)
    return array.reshape(shape)


def _pool() -> ThreadPoolExecutor:
    global _checksum_pool
    if _checksum_pool is None:
        _checksum_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmstore-crc")
    return _checksum_pool


def _forget_pool_after_fork() -> None:
    global _checksum_pool
    _checksum_pool = None  # the child has no thread behind the parent's pool


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _byte_chunks(array: np.ndarray) -> Any:
    """Yield the array's C-order bytes as buffers of at most ~_STREAM_CHUNK_BYTES."""
    if array.size == 0:
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


def write_array(fd: int, array: np.ndarray) -> int:
    """Write the array's bytes in C order to ``fd`` and return their CRC-32."""
    crc = 0
    if array.nbytes < _PARALLEL_CHECKSUM_BYTES:
        for chunk in _byte_chunks(array):
            _durable.write_all(fd, chunk)
            crc = crc32_update(crc, chunk)
        return crc
    pool = _pool()
    pending = None
    for chunk in _byte_chunks(array):
        # Checksum of chunk k runs while chunk k is written; chain the CRCs in order.
        future = pool.submit(crc32_update, 0 if pending is None else pending.result(), chunk)
        _durable.write_all(fd, chunk)
        pending = future
    return 0 if pending is None else pending.result()


def checksum_file(path: str, offset: int, nbytes: int) -> int:
    """CRC-32 of ``nbytes`` at ``offset`` in ``path``, read in bounded chunks."""
    crc = 0
    fd = os.open(path, _durable.READ_FLAGS)
    try:
        position = offset
        end = offset + nbytes
        while position < end:
            chunk = os.pread(fd, min(_STREAM_CHUNK_BYTES, end - position), position)
            if not chunk:
                raise FormatError(f"data file {path!r} ended at byte {position}, expected {end}")
            crc = crc32_update(crc, chunk)
            position += len(chunk)
    finally:
        os.close(fd)
    return crc
