"""What the CLI reads and writes: its consoles and progress bars, put's sources, get's outputs.

cli.py parses arguments and turns errors into exit statuses; this module does the file
work behind them. ``put`` reads an .npy, .npz or text file, an HDF5 dataset or stdin,
large inputs in row blocks behind a progress bar, and a put that created its store and
then failed removes what it created. ``get -o`` writes to a temp file of its own beside
the output, renamed over it when complete and removed on any failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

import mmstore

from . import _names, _textio
from ._format import MANIFEST_NAME

# Piped output is for scripts: wide lines, never wrapped mid-value.
# emoji=False: a dataset named ":smile:" (or such a value) prints as it is.
out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 240)

err = Console(stderr=True, highlight=False, emoji=False)

options = {"debug": False, "quiet": False}


class UsageError(Exception):
    """A bad option value: exit status 2, like typer's own usage errors."""


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Any]:
    """A progress bar on a terminal (stderr), nothing otherwise. Yields update(done)."""
    if options["quiet"] or not err.is_terminal:
        yield lambda done, total=None: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    # markup=False: descriptions name files and datasets, which may hold brackets.
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, new_total: int | None = None) -> None:
            bar.update(task, completed=done, total=new_total if new_total is not None else total)

        yield update


def missing_directories(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for directory in (path.absolute(), *path.absolute().parents):
        if os.path.lexists(directory):
            break
        missing.append(directory)
    return missing


def remove_unused_store(store: Path, created: list[Path]) -> None:
    """Undo the store a failed put created, if it still holds nothing but its manifest and
    empty group directories. Anything else (another process's dataset, temp or lock file)
    keeps it; so does a file that appears while it goes: the manifest is put back when the
    directory turns out not to be empty. (A process that opened the store before the
    removal and creates its first file after it would find the directory gone.)"""
    with contextlib.suppress(OSError):
        for group, _dirs, _files in os.walk(store, topdown=False):
            if group != str(store):
                os.rmdir(group)  # (refused if it holds anything)
        if os.listdir(store) != [MANIFEST_NAME]:
            return
        manifest = store / MANIFEST_NAME
        saved = manifest.read_bytes()
        os.unlink(manifest)
        try:
            os.rmdir(store)
        except OSError:
            _restore_manifest(store, saved)
            return
        for directory in created[1:]:
            os.rmdir(directory)


def _restore_manifest(store: Path, saved: bytes) -> None:
    """Put the manifest back the way the store creates it: a temp file linked into place
    (never over a manifest another process has made meanwhile)."""
    temp = store / _names.temp_file_name("mmstore", _names.new_token())
    with open(temp, "xb") as stream:
        stream.write(saved)
    try:
        with contextlib.suppress(FileExistsError):
            os.link(temp, store / MANIFEST_NAME)
    finally:
        os.unlink(temp)


TEXT_SUFFIXES = frozenset({".csv", ".txt", ".tsv", ".dat", ""})

SOURCE_SUFFIXES = TEXT_SUFFIXES | {".npy", ".npz"}


def unknown_source(suffix: str) -> str:
    return f"unknown source type {suffix!r}: use .npy, .npz, .csv, .txt, file.h5:/path or -"


def npz_members(source: str, name: str) -> list[str]:
    """The .npy members of an .npz archive, each checked to make a valid dataset name under ``name``."""
    with _npz_errors(source), _open_npz(source) as archive:
        members = [entry for entry in archive.namelist() if entry.endswith(".npy")]
    for entry in members:
        _names.validate_name(f"{name}/{entry[:-4]}")
    return members


def _open_npz(source: str) -> Any:
    import zipfile

    with _npz_errors(source):
        return zipfile.ZipFile(source)


@contextlib.contextmanager
def _npz_errors(label: str) -> Iterator[None]:
    """A damaged archive (zipfile.BadZipFile: a bad CRC, no central directory) is an input
    error with one line naming it, not a traceback."""
    import zipfile

    try:
        yield
    except zipfile.BadZipFile as exc:
        raise _textio.TextFormatError(f"{label}: not a readable .npz archive ({exc})") from None


def split_source(source: str) -> tuple[str, str | None]:
    """(file, HDF5 dataset path) of a put source: ``file.h5:/path`` names a dataset in
    ``file.h5``; anything else is a file (path None)."""
    for marker in (".h5:", ".hdf5:"):
        head, found, path = source.partition(marker)
        if found:
            return head + marker[:-1], path
    return source, None


def check_exists(path: str) -> None:
    """Fail now if ``path`` is missing (a stat, not an open: a FIFO must be opened only once)."""
    os.stat(path)


def put_source(
    store: mmstore.Store,
    name: str,
    source: str,
    dtype: np.dtype[Any] | None,
    delimiter: str | None,
    skip_rows: int,
    attrs: dict[str, Any],
) -> None:
    if source == "-":
        _put_npy_stream(store, name, sys.stdin.buffer, "stdin", attrs)
        return
    h5_file, h5_path = split_source(source)
    if h5_path is not None:
        import h5py

        with h5py.File(h5_file, "r") as h5:
            if h5_path not in h5 or not isinstance(h5[h5_path], h5py.Dataset):
                raise mmstore.DatasetNotFoundError(f"no dataset {h5_path!r} in {h5_file}")
            store.put(name, h5[h5_path], attrs=attrs)
        return
    suffix = Path(source).suffix.lower()
    if suffix == ".npy":
        array = _load_npy(source)
        if array.ndim == 0 or array.shape[0] == 0 or array.nbytes < _PROGRESS_BYTES:
            store.put(name, array, attrs=attrs)
        else:  # the same bytes, in row blocks of the map, so that a progress bar can follow
            rows = max(1, _PROGRESS_BYTES // 4 // max(array[:1].nbytes, 1))
            row_blocks = (array[start : start + rows] for start in range(0, array.shape[0], rows))
            counted = _counting(row_blocks, f"reading {source}", array.nbytes)
            store.put_blocks(name, counted, dtype=array.dtype, attrs=attrs)
    elif suffix == ".npz":
        members = npz_members(source, name)  # every name checked before the first commit
        with _open_npz(source) as archive:  # each member streamed, never loaded whole
            for entry in members:
                label = f"{source}:{entry[:-4]}"
                with _npz_errors(label), archive.open(entry) as stream:
                    _put_npy_stream(store, f"{name}/{entry[:-4]}", stream, label, attrs)
    elif suffix in TEXT_SUFFIXES:
        if delimiter is None:
            delimiter = {".csv": ",", ".tsv": "\t"}.get(suffix)
        with open(source, encoding="utf-8", newline="") as stream:
            size = os.fstat(stream.fileno()).st_size
            blocks = _textio.text_blocks(stream, source, dtype or np.dtype("f8"), delimiter, skip_rows)
            store.put_blocks(
                name, _counting(blocks, f"parsing {source}", size, stream), dtype=dtype or "f8", attrs=attrs
            )
    else:
        raise UsageError(unknown_source(suffix))


_PROGRESS_BYTES = 64 * 2**20  # inputs at least this large are stored in blocks, with a progress bar


def _load_npy(source: str) -> np.ndarray:
    """An .npy file mapped read-only, after checking its header and size (np.load's own
    errors speak of pickles for a text file and of mmap lengths for a truncated one)."""
    with open(source, "rb") as stream:
        kind, shape, _blocks = _textio.npy_stream(stream, source)
        needed = stream.tell() + math.prod(shape) * kind.itemsize
        size = os.fstat(stream.fileno()).st_size
    if size < needed:
        raise _textio.TextFormatError(f"{source}: truncated .npy file ({size} bytes, its header needs {needed})")
    return np.load(source, mmap_mode="r", allow_pickle=False)  # type: ignore[no-any-return]


def _put_npy_stream(store: mmstore.Store, name: str, stream: Any, label: str, attrs: dict[str, Any]) -> None:
    """Store an .npy read from a stream in row blocks (0-d and empty arrays whole)."""
    kind, shape, blocks = _textio.npy_stream(stream, label)
    if not shape or shape[0] == 0:
        whole = next(blocks).reshape(()) if shape == () else np.empty(shape, kind)
        store.put(name, whole, attrs=attrs)
        return
    total = math.prod(shape) * kind.itemsize
    store.put_blocks(name, _counting(blocks, f"reading {label}", total), dtype=kind, attrs=attrs)


def _counting(blocks: Iterator[np.ndarray], label: str, total: int | None, stream: Any = None) -> Iterator[np.ndarray]:
    """Pass blocks through, advancing a progress bar (by file position, or by bytes)."""
    done = 0
    with progress(label, total) as update:
        for block in blocks:
            done = stream.buffer.tell() if stream is not None and hasattr(stream, "buffer") else done + block.nbytes
            update(done)
            yield block


def write_output(array: np.ndarray, output: Path) -> None:
    suffix = output.suffix.lower()
    if suffix not in (".npy", ".csv", ".txt", ".tsv"):
        raise UsageError(f"unknown output type {suffix!r}: use .npy, .csv or .txt")
    # A temp file of our own (random name, created exclusively) beside the output, renamed
    # over it when complete: two gets to one output never write into each other's file.
    # Whatever stops the write (an error, Ctrl-C, SIGTERM) removes the temp file.
    with _sigterm_raises():
        temp = _partial_name(output)
        try:  # (from before the file exists: a signal may come the moment it does)
            while True:
                try:
                    fd = os.open(temp, _PARTIAL_FLAGS, 0o666)
                    break
                except FileExistsError:  # (a token collision: draw another)
                    temp = _partial_name(output)
                except OSError as exc:  # (a missing directory, say: the user named the output, not our temp)
                    raise OSError(exc.errno, exc.strerror, str(output)) from None
            with progress(f"writing {output}", array.nbytes) as update:
                if suffix == ".npy":
                    with os.fdopen(fd, "wb") as stream:
                        _textio.write_npy(stream, array)
                else:
                    delimiter = {".csv": ",", ".tsv": "\t"}.get(suffix, " ")
                    with os.fdopen(fd, "w", encoding="utf-8") as stream:
                        _textio.write_text(stream, array, delimiter, label=str(output))
                update(array.nbytes)
            try:
                os.replace(temp, output)
            except OSError as exc:  # (the output is a directory, say)
                raise OSError(exc.errno, exc.strerror, str(output)) from None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):  # (gone if the signal came after the rename)
                os.unlink(temp)
            raise


class _Terminated(SystemExit):
    """SIGTERM during a write, raised so that cleanup runs (exit status 128 + 15, as if killed)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception for a while: Python's default dies without cleanup."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # (only the main thread may set handlers)
        yield
        return

    def terminate(signum: int, _frame: Any) -> None:
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_PARTIAL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _partial_name(output: Path) -> Path:
    """``.{name}.{token}.partial`` beside ``output``, to be created exclusively."""
    return output.with_name(f".{output.name}.{_names.new_token()}.partial")
