"""Export a store to one HDF5 file (``mmstore compact``) and import it back.

Conventions (docs/HDF5.md has the full table):

* dataset ``group/sub/name`` becomes the HDF5 dataset ``/group/sub/name``;
* every exported dataset carries ``mmstore.dtype`` (the JSON dtype descr of
  docs/FORMAT.md) and ``mmstore.attrs`` (the attrs as JSON), so an import is
  exact; each attr that HDF5 can hold natively is also written as an HDF5 attr;
* dtypes HDF5 has no type for are stored as integers of the same bytes:
  datetime64/timedelta64 as int64 counts of their unit, fixed-width unicode
  ``<Un`` as uint32 code points with a trailing axis of n (inside a structured
  dtype, as a uint32 sub-array field of n); ``mmstore.dtype`` says how to view
  them back.

The export streams each dataset in ~4 MiB blocks straight from a map of its
data file, dropping each block's pages from the map once written (so the RSS
stays small however large the store). It writes a hidden temp file beside the
output, fsyncs it and renames it into place: a killed export never leaves a
partial output file. The exporter holds a liveness lock on its temp file, so the
next export to the same output can tell a dead exporter's temp file (which it
removes) from a live one's (which it leaves alone).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _durable, _names
from ._dtypes import decode_dtype, encode_dtype
from ._errors import (
    ArgumentTypeError,
    DatasetNotFoundError,
    InvalidArgumentError,
    InvalidNameError,
    MmstoreError,
    UnsupportedDtypeError,
)
from ._format import FORMAT_VERSION
from ._locks import hold_new_file, remove_if_writer_gone
from ._mapping import RowSource
from ._maps import CONTROL_BYTES, MissingDataFile

if TYPE_CHECKING:
    from ._store import Store

DTYPE_ATTR = "mmstore.dtype"
ATTRS_ATTR = "mmstore.attrs"
VERSION_ATTR = "mmstore.format_version"
# Blocks of ~4 MiB: measured faster into h5py than 16 MiB ones.
_BLOCK_BYTES = 4 * 2**20
# The largest chunk an explicit chunk shape may give (docs/HDF5.md "Options").
_MAX_CHUNK_BYTES = 16 * 2**20
_PAGE = mmap.PAGESIZE

Progress = Callable[[str, int, int], None]  # (dataset name, bytes done, bytes total)


def hdf5_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """A dtype of the same size and layout that h5py can store."""
    if dtype.fields is not None:
        names = list(dtype.names or ())
        fields = dtype.fields
        return np.dtype(
            {
                "names": names,
                "formats": [hdf5_dtype(fields[name][0]) for name in names],
                "offsets": [fields[name][1] for name in names],
                "itemsize": dtype.itemsize,
            }
        )
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return np.dtype((hdf5_dtype(base), shape))
    order = ">" if dtype.byteorder == ">" else "<"
    if dtype.kind in "mM":
        return np.dtype(order + "i8")
    if dtype.kind == "U":
        return np.dtype((order + "u4", (dtype.itemsize // 4,)))
    return dtype


def _native_attr(value: Any) -> Any:
    """The value as an HDF5 attribute, or None if HDF5 cannot hold it natively (the exact
    attrs are in ``mmstore.attrs`` anyway: these are only a convenience for other tools)."""
    if isinstance(value, bool) or (isinstance(value, int) and -(2**63) <= value < 2**63):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        return value if _plain_text(value) else None
    numbers = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if numbers and value:
        try:
            array = np.asarray(value)
        except OverflowError:
            return None
        return array if array.dtype.kind in "if" else None  # (ints beyond 64 bits make an object array)
    if isinstance(value, list) and value and all(isinstance(v, str) and _plain_text(v) for v in value):
        return value
    return None


def _plain_text(text: str) -> bool:
    """True if HDF5 can store ``text`` as a string attribute: valid UTF-8, no NUL."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # (lone surrogates)
        return False
    return True


def fit_chunks(requested: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The chunk shape of a dataset of ``shape`` (non-empty, not 0-d) for a requested one.

    The requested sizes are upper bounds for the leading axes, each cut to its axis's
    extent; axes past them are whole, and sizes past the dataset's rank are ignored. So
    ``(1000,)`` means blocks of up to 1000 rows for every dataset, whatever its rank.
    """
    padded = requested[: len(shape)] + shape[len(requested) :]
    return tuple(max(1, min(size, extent)) for size, extent in zip(padded, shape, strict=True))


def _check_chunks(chunks: bool | tuple[int, ...] | None) -> bool | tuple[int, ...] | None:
    if chunks is None or isinstance(chunks, bool):
        return chunks
    try:
        sizes = tuple(chunks)
    except TypeError:  # (chunks=1000: a number, not a shape)
        raise ArgumentTypeError(
            f"chunks must be None, True or a tuple of positive sizes such as (1000,), not {chunks!r}"
        ) from None
    if not sizes or not all(isinstance(size, (int, np.integer)) and size > 0 for size in sizes):
        raise InvalidArgumentError(f"chunks must be None, True or a tuple of positive sizes, not {chunks!r}")
    return tuple(int(size) for size in sizes)


def _check_tree(names: list[str]) -> None:
    """HDF5 cannot have a dataset that is also a group: refuse such stores up front."""
    existing = set(names)
    for name in names:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            group = "/".join(parts[:depth])
            if group in existing:
                raise MmstoreError(
                    f"cannot export: {group!r} is a dataset and also a group of {name!r}, which HDF5 does not allow "
                    f"in one file; export them to separate files: only={group!r} (--only {group}) gives the "
                    f"dataset, only={group + '/'!r} (--only {group}/) the datasets under the group"
                )


def selected_names(store: Store, only: str) -> list[str]:
    """The names ``only`` selects: every dataset if empty; with a trailing slash, the
    datasets under that group; else the dataset of that name and the datasets under
    the group of that name, or only the dataset if there are both (HDF5 cannot hold
    both in one file)."""
    if not only:
        return store.keys()
    group = only.strip("/")
    names = store.keys(group)
    if only.endswith("/"):
        return [name for name in names if name != group]
    return [group] if group in names and len(names) > 1 else names


def export_hdf5(
    store: Store | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    only: str = "",
    compression: str | None = None,
    chunks: bool | tuple[int, ...] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Write every dataset's committed view to the HDF5 file ``path``.

    ``only`` selects a dataset and the datasets under the group of that name, or with a
    trailing slash (``"a/"``) only those under the group; a name that is both a dataset
    and a group selects just the dataset (one HDF5 file cannot hold both).

    ``compression`` is ``"gzip"``, ``"lzf"`` or None; ``chunks`` is None
    (contiguous unless compressed), True (h5py's choice) or a chunk shape,
    fitted to each dataset by ``fit_chunks`` and cut to at most 16 MiB a
    chunk; 0-d and empty datasets are
    always contiguous. Returns the exported names. ``path`` appears only when
    complete. ``store`` is a Store or a store path (opened read-only).
    """
    if isinstance(store, (str, os.PathLike)):
        with _store_class()(store, mode="r") as opened:
            return export_hdf5(opened, path, only=only, compression=compression, chunks=chunks, progress=progress)
    import h5py

    if compression not in (None, "gzip", "lzf"):
        raise InvalidArgumentError(f"compression must be 'gzip', 'lzf' or None, not {compression!r}")
    chunks = _check_chunks(chunks)
    names = selected_names(store, only)
    if only and not names:  # (a typo must not write an empty file and succeed)
        raise DatasetNotFoundError(f"nothing to export: no dataset or group {only!r} in the store")
    _check_tree(names)
    exported: list[str] = []
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    try:
        _remove_dead_exports(directory, os.path.basename(target))
        temp, fd = _create_temp(directory, os.path.basename(target))
    except OSError as exc:
        raise _durable.io_error(exc, f"export to {target!r}") from None
    try:
        try:
            # HDF5's own flock would clash with our liveness lock; nobody else opens the temp file.
            with h5py.File(temp, "w", locking=False) as h5:
                h5.attrs[VERSION_ATTR] = FORMAT_VERSION
                for name in names:
                    if _export_one(store, h5, name, compression, chunks, progress):
                        exported.append(name)
            os.fsync(fd)
            os.replace(temp, target)
        finally:
            os.close(fd)  # drops the liveness lock: the file is renamed (nothing to protect) or failed
        _durable.fsync_dir(directory)
    except OSError as exc:
        _durable.unlink_quietly(temp)
        raise _durable.io_error(exc, f"export to {target!r}") from None
    except BaseException:
        _durable.unlink_quietly(temp)
        raise
    return exported


def _temp_pattern(output_name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(output_name)}\.[0-9a-f]{{{_names.TOKEN_HEX_DIGITS}}}\.tmp", re.DOTALL)


def _remove_dead_exports(directory: str, output_name: str) -> int:
    """Remove the temp files that killed exports to the same output left; return how many.

    A live export holds a liveness lock on its temp file (``_create_temp``), so only the
    files of dead exporters go. (Exports by mmstore before it took that lock were covered
    by HDF5's own flock while writing, only not in the instant of their fsync and rename.)
    """
    pattern = _temp_pattern(output_name)
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return 0  # the export itself will say so
    return sum(remove_if_writer_gone(os.path.join(directory, entry)) for entry in entries if pattern.fullmatch(entry))


def _create_temp(directory: str, output_name: str) -> tuple[str, int]:
    """Create the export's hidden temp file beside the output, holding its liveness lock.

    A concurrent export's ``_remove_dead_exports`` may probe the file between its creation
    and our lock; then it may be removing it, so we start over under a new name.
    """
    for _attempt in range(100):
        temp = os.path.join(directory, f".{output_name}.{_names.new_token()}.tmp")
        fd = os.open(temp, _durable.NEW_FILE_FLAGS, 0o666)
        if hold_new_file(temp, fd, shared=True):
            return temp, fd
    raise MmstoreError(f"export to {os.path.join(directory, output_name)!r}: could not hold a temp file")


def _snapshot(store: Store, name: str) -> tuple[Any, tuple[int, ...], int] | None:
    """(header, shape of the committed view, open data file descriptor), taken together,
    or None if the dataset was deleted since the export listed it. A dataset replaced
    between reading its header and opening its data file is read again."""
    location = store._locate(name)
    for _attempt in range(100):
        try:
            array, header = store._read(name)
        except DatasetNotFoundError:
            return None
        try:
            fd = store._open_data(location, header)
        except MissingDataFile:
            store._drop_entry(name)
            continue
        return header, array.shape, fd
    raise MmstoreError(f"dataset {name!r}: replaced too often to export a consistent generation")


def _export_one(
    store: Store,
    h5: Any,
    name: str,
    compression: str | None,
    chunks: bool | tuple[int, ...] | None,
    progress: Progress | None,
) -> bool:
    snapshot = _snapshot(store, name)
    if snapshot is None:
        return False
    header, shape, fd = snapshot
    try:
        _write_dataset(h5, name, header, shape, fd, compression, chunks, progress)
    finally:
        os.close(fd)
    return True


def _write_dataset(
    h5: Any,
    name: str,
    header: Any,
    shape: tuple[int, ...],
    fd: int,
    compression: str | None,
    chunks: bool | tuple[int, ...] | None,
    progress: Progress | None,
) -> None:
    import h5py

    dtype = header.dtype
    stored = hdf5_dtype(dtype)
    try:
        h5py.h5t.py_create(stored, logical=True)
    except TypeError as exc:
        raise UnsupportedDtypeError(f"dataset {name!r}: HDF5 cannot store dtype {dtype}: {exc}") from None
    extra: tuple[int, ...] = ()
    if stored.subdtype is not None and dtype.fields is None:  # top-level unicode: a trailing axis
        stored, extra = stored.subdtype
    h5_shape = (*shape, *extra)
    options: dict[str, Any] = {}
    # HDF5 cannot chunk (or so compress) a scalar, and an empty dataset has nothing to
    # chunk or compress: both stay contiguous.
    if h5_shape and 0 not in h5_shape and (compression or chunks):
        if isinstance(chunks, tuple):
            options["chunks"] = _cap_chunks((*fit_chunks(chunks, shape), *extra), stored.itemsize, len(extra))
        else:
            options["chunks"] = True
        if compression:
            options["compression"] = compression
    try:
        dataset = h5.create_dataset(name, shape=h5_shape, dtype=stored, **options)
    except (TypeError, ValueError) as exc:
        layout = f"chunks {options['chunks']}, compression {compression}" if options else "contiguous"
        raise MmstoreError(f"dataset {name!r}: HDF5 could not create it (shape {h5_shape}, {layout}): {exc}") from None
    dataset.attrs[DTYPE_ATTR] = json.dumps(encode_dtype(dtype))
    dataset.attrs[ATTRS_ATTR] = json.dumps(header.attrs)
    for key, value in header.attrs.items():
        native = _native_attr(value)
        if native is not None and key and _plain_text(key) and not key.startswith("mmstore."):
            try:
                dataset.attrs[key] = native
            except (TypeError, ValueError, RuntimeError, OSError):
                pass  # HDF5 refused this one: mmstore.attrs holds it exactly
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        if progress is not None:
            progress(name, 0, 0)
        return
    offset = CONTROL_BYTES if header.growable else header.offset
    if not shape:  # 0-d
        raw = os.pread(fd, dtype.itemsize, offset)
        dataset[...] = np.frombuffer(raw, dtype).view(stored).reshape(h5_shape)
        if progress is not None:
            progress(name, nbytes, nbytes)
        return
    chunk_shape = dataset.chunks[: len(shape)] if dataset.chunks else None
    tile = _tile_shape(shape, dtype.itemsize, chunk_shape)
    # Blocks are handed to h5py straight from a read-only map of the data file (no copy
    # unless a tile is strided); each block's pages are dropped from the map once written
    # (MADV_DONTNEED on a clean file mapping), so the RSS stays at about one block.
    mapped = mmap.mmap(fd, offset + nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    try:
        whole = np.frombuffer(mapped, dtype, math.prod(shape), offset).reshape(shape)
        done = 0
        grid = tuple(-(-extent // size) for extent, size in zip(shape, tile, strict=True))
        for index in np.ndindex(*grid):
            starts = [i * size for i, size in zip(index, tile, strict=True)]
            stops = [min(start + size, extent) for start, size, extent in zip(starts, tile, shape, strict=True)]
            where = tuple(slice(start, stop) for start, stop in zip(starts, stops, strict=True))
            block = np.ascontiguousarray(whole[where])
            dataset[where] = block.view(stored).reshape((*block.shape, *extra))
            done += block.nbytes
            del block
            first = offset + int(np.ravel_multi_index(starts, shape)) * dtype.itemsize
            last = offset + (int(np.ravel_multi_index([stop - 1 for stop in stops], shape)) + 1) * dtype.itemsize
            begin = first // _PAGE * _PAGE
            mapped.madvise(mmap.MADV_DONTNEED, begin, min(-(-last // _PAGE) * _PAGE, len(mapped)) - begin)
            if progress is not None:
                progress(name, done, nbytes)
        del whole
    finally:
        try:
            mapped.close()
        except BufferError:
            # An error in flight (h5py's ENOSPC, say) still holds the block viewing the map in
            # its traceback; closing must not replace that error. The map goes with the block.
            pass


def _tile_shape(shape: tuple[int, ...], itemsize: int, chunks: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape of the blocks an export writes: whole chunks only (a partly written
    compressed chunk is read back, inflated and compressed again at every later write to
    it), about _BLOCK_BYTES (at least one chunk), trailing axes whole where they fit. Rows
    larger than a block are cut along later axes, so no block is ever a whole huge row."""
    unit = list(chunks) if chunks else [1] * len(shape)
    budget = max(_BLOCK_BYTES, math.prod(unit) * itemsize)
    tile = list(unit)
    for axis in reversed(range(len(shape))):
        per_index = math.prod(tile) // tile[axis] * itemsize
        fits = budget // per_index
        if fits >= shape[axis]:
            tile[axis] = shape[axis]
            continue
        tile[axis] = max(unit[axis], fits // unit[axis] * unit[axis])
        break
    return tuple(tile)


def _cap_chunks(chunks: tuple[int, ...], itemsize: int, keep: int) -> tuple[int, ...]:
    """Cut a chunk shape, leading axes first (the last ``keep`` axes never), to at most
    _MAX_CHUNK_BYTES: HDF5 holds a whole chunk in memory to compress it (and refuses
    chunks over 4 GiB), so a bounded export needs bounded chunks."""
    capped = list(chunks)
    for axis in range(len(capped) - keep):
        others = math.prod(capped) // capped[axis] * itemsize
        capped[axis] = max(1, min(capped[axis], _MAX_CHUNK_BYTES // max(others, 1)))
    return tuple(capped)


def import_hdf5(
    path: str | os.PathLike[str],
    store: Store | str | os.PathLike[str],
    *,
    only: str = "",
    progress: Progress | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Put every dataset of an HDF5 file (under ``only``) into ``store``, streamed.

    Returns (imported names, {skipped name: reason}) - e.g. variable-length
    strings, which have no fixed-size NumPy dtype. ``store`` is a Store or a
    store path (opened in mode "a").
    """
    if isinstance(store, (str, os.PathLike)):
        with _store_class()(store, mode="a") as opened:
            return import_hdf5(path, opened, only=only, progress=progress)
    import h5py

    with h5py.File(os.fspath(path), "r") as h5:
        selected, skipped = import_selection(h5, only)
        if only.strip("/") and not selected and not skipped:
            raise DatasetNotFoundError(f"nothing to import: no dataset or group {only!r} in {os.fspath(path)}")
        imported: list[str] = []
        for name, dataset in selected:
            try:
                _names.validate_name(name)
                source, attrs = _import_source(name, dataset, progress)
                store.put(name, source, attrs=attrs)
            except (InvalidNameError, UnsupportedDtypeError, ValueError, TypeError) as exc:
                skipped[name] = str(exc)
                continue
            imported.append(name)
            if progress is not None and source.nbytes == 0:
                progress(name, 0, 0)  # (no block was read to report it)
    return imported, skipped


def import_selection(h5: Any, only: str = "") -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """([(name, dataset)], {skipped link: reason}) of an open HDF5 file under ``only``."""
    found, links = _walk(h5)
    prefix = only.strip("/")

    def wanted(name: str) -> bool:
        return not prefix or name == prefix or name.startswith(prefix + "/")

    return [(name, dataset) for name, dataset in found if wanted(name)], {
        name: reason for name, reason in links.items() if wanted(name)
    }


class _ReportingSource(RowSource):
    """A RowSource that reports each block read, so a long import's progress moves
    within a dataset, not only after it."""

    def __init__(self, source: Any, view: np.dtype[Any] | None, name: str, progress: Progress) -> None:
        super().__init__(source, view=view)
        self.name, self.progress, self.done = name, progress, 0

    def block(self, start: int, stop: int) -> np.ndarray:
        rows = super().block(start, stop)
        self.done += rows.nbytes
        self.progress(self.name, self.done, self.nbytes)
        return rows


def _walk(h5: Any) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """([(name, dataset)] under every name, in name order; {name: why it is skipped}).

    Walks links rather than objects: visititems() visits an object once, so a dataset (or
    a group) reachable through two hard links would be imported under one name only. A
    soft or external link is skipped (a soft link's target, if in the file, is imported
    under the target's own name); so is a hard link to a group that holds it (a cycle).
    """
    import h5py

    found: list[tuple[str, Any]] = []
    skipped: dict[str, str] = {}

    def visit(group: Any, prefix: str, ancestors: list[Any]) -> None:
        for key in group:
            name = prefix + key
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.SoftLink):
                skipped[name] = (
                    f"a soft link to {link.path!r}: links are not imported (their target is, under its own name)"
                )
                continue
            if isinstance(link, h5py.ExternalLink):
                skipped[name] = (
                    f"an external link to {link.filename}:{link.path}: links to other files are not imported"
                )
                continue
            if not isinstance(link, h5py.HardLink):
                skipped[name] = f"a {type(link).__name__}: only datasets and groups are imported"
                continue
            target = group.get(key)
            if isinstance(target, h5py.Dataset):
                found.append((name, target))
            elif isinstance(target, h5py.Group):
                if any(target == ancestor for ancestor in ancestors):
                    skipped[name] = "a hard link to a group that holds it: not followed (it would never end)"
                else:
                    visit(target, name + "/", [*ancestors, target])

    visit(h5, "", [h5])
    return found, skipped


def _import_source(name: str, dataset: Any, progress: Progress | None) -> tuple[RowSource, dict[str, Any]]:
    raw_dtype = dataset.attrs.get(DTYPE_ATTR)
    view: np.dtype[Any] | None = None
    if raw_dtype is not None:
        try:
            view = decode_dtype(json.loads(raw_dtype))
        except ValueError as exc:
            raise UnsupportedDtypeError(f"dataset {name!r}: bad {DTYPE_ATTR} attribute: {exc}") from None
    elif np.dtype(dataset.dtype).hasobject:
        raise UnsupportedDtypeError(f"dataset {name!r}: variable-length data ({dataset.dtype}) has no fixed size")
    source = RowSource(dataset, view=view) if progress is None else _ReportingSource(dataset, view, name, progress)
    raw_attrs = dataset.attrs.get(ATTRS_ATTR)
    if raw_attrs is not None:
        attrs = json.loads(raw_attrs)
    else:
        attrs = {}
        for key, value in dataset.attrs.items():
            converted = _json_value(value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value)
            try:
                # allow_nan=False: NaN and infinities are not JSON, and mmstore's attrs are JSON.
                json.dumps(converted, allow_nan=False)
            except (TypeError, ValueError):
                continue  # (docs/HDF5.md: an attribute JSON cannot hold is left out, not the dataset)
            attrs[key] = converted
    return source, attrs


def _json_value(value: Any) -> Any:
    """An attribute value with byte strings (at any depth of a list) decoded as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    return value


def _store_class() -> type[Store]:
    from ._store import Store  # imported late: _store imports this module's callers

    return Store
