"""mmstore datasets as Dask arrays, and Dask arrays written into a store.

Install with ``pip install 'mmstore[dask]'``.

``to_dask(store, name)`` builds a dask array whose tasks carry only the store
path, the dataset's header and the identity of its data file (a few hundred
bytes, whatever the array's size). Each worker process maps the data file
read-only once and slices it: no chunk is pickled or sent between processes,
only what the computation returns. The graph is pinned to the generation it
was built from, so a concurrent ``put`` never mixes two versions in one result.

``from_dask(darr, store, name)`` writes a dask array into a new data file in
parallel: every task writes its own region of a preallocated file, then one
atomic commit makes the whole array visible. A failed or killed computation
leaves the previous value untouched.

See docs/DASK.md for schedulers, clusters and benchmarks.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("mmstore.dask needs dask: pip install 'mmstore[dask]'") from exc

from . import _durable
from ._entries import _close_quietly
from ._errors import ArgumentTypeError, FormatError, GenerationGoneError, InvalidArgumentError, MmstoreError
from ._format import Header
from ._maps import _Mapped, data_file_error, validate_length
from ._store import Store

__all__ = ["GenerationGoneError", "PinnedDataset", "from_dask", "pin", "to_dask"]

_MAPS_KEPT = 64  # datasets each process keeps mapped for pinned arrays (a map costs address space only)
# (store root, dataset name) -> ((device, inode, offset) of the mapped generation, its rows); the
# offset tells apart generations of one packed data file (docs/FORMAT.md). One generation per
# dataset: mapping a newer one drops the older map, so a long-lived worker does not keep the
# disk space of replaced generations alive.
_maps: OrderedDict[tuple[str, str], tuple[tuple[int, int, int], np.ndarray]] = OrderedDict()
_maps_guard = threading.Lock()


def _remember_map(key: tuple[str, str], identity: tuple[int, int, int], rows: np.ndarray) -> np.ndarray:
    with _maps_guard:
        kept = _maps.get(key)
        if kept is not None and kept[0] == identity:
            return kept[1]  # another thread mapped it meanwhile: share one map
        _maps[key] = (identity, rows)
        _maps.move_to_end(key)
        while len(_maps) > _MAPS_KEPT:
            _maps.popitem(last=False)  # arrays still in use keep their own map alive
    return rows


def _forget_maps_after_fork() -> None:
    # A forked child would otherwise share the parent's guard in whatever state it was in.
    global _maps_guard
    _maps_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_maps_after_fork)


class PinnedDataset:
    """One committed generation of a dataset, as an array-like that dask slices.

    It pickles to the store path, the header, the data file's path and its
    identity (device, inode), plus the (pid, fd) of the pin held open by the
    process that built it. A process that unpickles it maps the data file
    once, read-only, and checks that it is the same file; if the dataset was
    replaced since and its old file unlinked, the builder's open descriptor
    (``/proc/PID/fd/FD``, checked the same way) still reaches that generation.
    When neither does, :class:`mmstore.GenerationGoneError` says so: a graph
    never reads a newer generation than it was built from.
    """

    def __init__(self, root: str, header: Header, data_path: str, fd: int, length: int) -> None:
        st = os.fstat(fd)
        self.root = root
        self.header = header
        self.data_path = data_path
        self.identity = (st.st_dev, st.st_ino)
        self.shape: tuple[int, ...] = (length, *header.shape[1:]) if header.growable else header.shape
        self.dtype = header.dtype
        self.ndim = len(self.shape)
        self.owner = (os.getpid(), fd)
        # The pin lives as long as this object does in the building process.
        weakref.finalize(self, _close_quietly, fd)

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def generation(self) -> int:
        return self.header.generation

    @property
    def generation_identity(self) -> tuple[int, int, int]:
        """Data file identity and offset: generations of a packed file share the file."""
        return (*self.identity, self.header.offset)

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # a copy: no finalizer, the pin belongs to the builder

    def __dask_tokenize__(self) -> Any:
        return ("mmstore", self.root, self.header.name, self.header.generation, self.identity, self.shape)

    def __repr__(self) -> str:
        return (
            f"<mmstore pinned dataset {self.header.name!r} generation {self.header.generation} "
            f"shape={self.shape} dtype={self.dtype}>"
        )

    def __getitem__(self, key: Any) -> np.ndarray:
        view: np.ndarray = self.array()[key]
        return view

    def __len__(self) -> int:
        if not self.shape:
            raise ArgumentTypeError("len() of a 0-d dataset")
        return self.shape[0]

    def array(self) -> np.ndarray:
        """The whole pinned generation, mapped read-only in this process (no copy)."""
        key = (self.root, self.header.name)
        with _maps_guard:
            kept = _maps.get(key)
            if kept is not None and kept[0] == self.generation_identity:
                _maps.move_to_end(key)
                rows = kept[1]
            else:
                rows = None
        if rows is None:
            rows = _remember_map(key, self.generation_identity, self._map())
        return rows[: self.shape[0]] if self.header.growable else rows

    def _map(self) -> np.ndarray:
        fd = self._open()
        try:
            mapped = _Mapped(self.header, self.data_path, writable=False, fd=fd)
        finally:
            os.close(fd)
        if self.header.growable:
            validate_length(self.header, mapped, self.shape[0])
        return mapped.rows

    def _open(self) -> int:
        """A descriptor of exactly the pinned data file, or GenerationGoneError."""
        for path, flags in (
            (self.data_path, _durable.READ_FLAGS),  # O_NONBLOCK: a FIFO planted there cannot hang us
            ("/proc/{}/fd/{}".format(*self.owner), _durable.READ_FLAGS & ~os.O_NOFOLLOW),  # a magic link
        ):
            try:
                fd = os.open(path, flags)
            except OSError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == self.identity:
                return fd
            os.close(fd)
        raise GenerationGoneError(
            f"dataset {self.header.name!r} in {self.root!r}: generation {self.header.generation}, which this "
            "dask array was built from, is gone (the dataset was replaced or deleted and the process that "
            "built the array no longer holds it); build the array again with to_dask(). (A worker on another "
            "machine never sees the store's files: see docs/DASK.md for clusters.)"
        )


def pin(store: Store | str | os.PathLike[str], name: str) -> PinnedDataset:
    """Pin the committed generation of ``name``: a picklable array-like (see PinnedDataset)."""
    if isinstance(store, Store):
        return _pin(store, name)
    with Store(store, mode="r") as opened:
        return _pin(opened, name)


def _pin(store: Store, name: str) -> PinnedDataset:
    location = store._locate(name)
    missing: Header | None = None
    for _attempt in range(1000):
        header = store.header(name)
        if missing is not None and (header.generation, header.data_file) == (missing.generation, missing.data_file):
            raise data_file_error(header, FileNotFoundError())  # gone under an unchanged header: corrupt
        path = location.data_path(header.data_file)
        try:
            # Relative to the dataset's directory reached without following symlinks, as get() does.
            fd = location.open_file(header.data_file, _durable.READ_FLAGS)
        except FileNotFoundError:
            missing = header  # replaced between reading the header and opening its file: read it again
            continue
        except OSError as exc:
            raise data_file_error(header, exc) from None
        try:
            mapped = _Mapped(header, path, writable=False, fd=fd)
            length = validate_length(header, mapped, mapped.committed_length(header))
            pinned = PinnedDataset(store.path, header, path, fd, length)
        except BaseException:
            os.close(fd)
            raise
        _remember_map((pinned.root, name), pinned.generation_identity, mapped.rows)
        return pinned
    raise FormatError(f"dataset {name!r}: replaced too often to pin a consistent generation")


def to_dask(
    store: Store | str | os.PathLike[str],
    name: str,
    chunks: Any = "auto",
    *,
    name_prefix: str = "mmstore",
) -> da.Array:
    """A dask array of dataset ``name``'s committed value, pinned to its current generation.

    ``store`` is a :class:`mmstore.Store` or a store path (opened read-only).
    ``chunks`` is anything ``dask.array.from_array`` accepts ("auto", a block
    shape, per-axis tuples ...). Tasks map the data file inside the worker and
    return views of it, so a reduction moves only its results between
    processes. Works with the threaded, multiprocessing and distributed
    schedulers on one machine (workers must see the store's file system and,
    for a replaced dataset, the building process's ``/proc``).
    """
    pinned = pin(store, name)
    token = dask.base.tokenize(pinned, chunks)
    graph_name = f"{name_prefix}-{name.replace('/', '.')}-g{pinned.generation}-{token}"
    meta = np.empty((0,) * pinned.ndim, dtype=pinned.dtype)
    return da.from_array(  # type: ignore[no-any-return,no-untyped-call]
        pinned,
        chunks=chunks,
        name=graph_name,
        lock=False,
        asarray=True,
        fancy=False,
        meta=meta,
        inline_array=False,
    )


class _StagingFile:
    """The target ``dask.array.store`` writes into: one region of the new data file per task.

    Pickles to a path, a dtype, a shape and the file's identity; a task opens
    the file, checks it is the staging file it was given, and writes its block
    with one pwrite when the block is contiguous on disk, through a shared map
    of the rows it spans otherwise.
    """

    def __init__(self, path: str, dtype: np.dtype[Any], shape: tuple[int, ...], identity: tuple[int, int]) -> None:
        self.path = path
        self.dtype = dtype
        self.shape = shape
        self.identity = identity

    def __setitem__(self, key: Any, value: Any) -> None:
        block = np.asarray(value, dtype=self.dtype, order="C")  # (ascontiguousarray would make 0-d 1-d)
        region = _region(key, self.shape)
        if tuple(stop - start for start, stop in region) != block.shape:
            raise ValueError(f"block of shape {block.shape} for region {region} of {self.shape}")
        if block.size == 0:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MmstoreError(
                f"staging file {self.path!r} is gone: the write was abandoned, or this worker runs on another "
                "machine (from_dask needs workers on the store's machine; see docs/DASK.md)"
            ) from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self.identity:
                raise MmstoreError(f"staging file {self.path!r} was replaced while the dask array was being written")
            row = math.prod(self.shape[1:]) * self.dtype.itemsize
            first = region[0][0] if region else 0
            if all(region[axis] == (0, self.shape[axis]) for axis in range(1, len(self.shape))):
                _durable.write_all(fd, block.reshape(-1).view(np.uint8), first * row)
            else:
                self._write_through_map(fd, region, block, row)
        finally:
            os.close(fd)

    def _write_through_map(self, fd: int, region: list[tuple[int, int]], block: np.ndarray, row: int) -> None:
        first, stop = region[0]
        start = first * row - (first * row) % mmap.ALLOCATIONGRANULARITY
        length = stop * row - start
        with mmap.mmap(fd, length, flags=mmap.MAP_SHARED, offset=start) as view:
            rows = np.frombuffer(view, self.dtype, (stop - first) * row // self.dtype.itemsize, first * row - start)
            rows = rows.reshape((stop - first, *self.shape[1:]))
            rows[(slice(None), *(slice(a, b) for a, b in region[1:]))] = block
            del rows  # the map closes only once no array uses it


def _region(key: Any, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) per axis of a tuple of unit-step slices, as dask.array.store passes."""
    key = key if isinstance(key, tuple) else (key,)
    if len(key) != len(shape):
        raise ValueError(f"region {key!r} does not match shape {shape}")
    region = []
    for part, size in zip(key, shape, strict=True):
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise ValueError(f"region {key!r}: only unit-step slices can be written")
        start, stop, _step = part.indices(size)
        region.append((start, max(start, stop)))
    return region


def from_dask(
    darr: da.Array,
    store: Store | str | os.PathLike[str],
    name: str,
    *,
    attrs: Any = None,
    durable: bool = False,
    **compute_kwargs: Any,
) -> None:
    """Compute ``darr`` in parallel into dataset ``name`` (create or replace), atomically.

    Every task writes its block straight into a preallocated new data file
    (no block travels back to this process); when all are done, the file's
    checksum is taken and one commit makes the new value visible. If the
    computation fails or this process is killed, the previous value stays
    and the new file is removed (now, or by recovery). ``compute_kwargs`` go
    to ``dask.array.store`` (``scheduler="processes"``, ...); an active
    ``distributed.Client`` is used as usual. ``store`` is a writable
    :class:`mmstore.Store` or a store path (opened in mode "a").
    """
    if not isinstance(darr, da.Array):
        raise ArgumentTypeError(f"from_dask wants a dask array, not {type(darr).__name__}")
    if any(math.isnan(size) for sizes in darr.chunks for size in sizes):
        raise InvalidArgumentError(
            f"dataset {name!r}: the dask array has unknown chunk sizes; call darr.compute_chunk_sizes() first"
        )
    if isinstance(store, Store):
        _from_dask(darr, store, name, attrs, durable, compute_kwargs)
        return
    with Store(store, mode="a") as opened:
        _from_dask(darr, opened, name, attrs, durable, compute_kwargs)


def _from_dask(
    darr: da.Array, store: Store, name: str, attrs: Any, durable: bool, compute_kwargs: dict[str, Any]
) -> None:
    shape = tuple(int(n) for n in darr.shape)

    def fill(path: str) -> None:
        st = os.stat(path, follow_symlinks=False)
        target = _StagingFile(path, darr.dtype, shape, (st.st_dev, st.st_ino))
        if math.prod(shape):
            da.store(darr, target, lock=False, compute=True, **compute_kwargs)  # type: ignore[arg-type]

    store._put_filled(name, darr.dtype, shape, fill, attrs, durable=durable)
