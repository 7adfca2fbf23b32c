"""The `mmstore` command: a thin typer layer over the library.

Each command parses its arguments, calls mmstore, and reports. Errors are
turned into one line on stderr in one place (`_errors_to_exit`): exit status 1
for a library or I/O error, 2 for a usage error (typer's own, or a bad option
value). `--debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.text import Text

import mmstore

from . import _names, _textio
from ._format import MANIFEST_NAME, encode_dtype
from ._hdf5 import selected_names

app = typer.Typer(
    name="mmstore",
    help="Share NumPy arrays between processes through memory-mapped files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output is for scripts: wide lines, never wrapped mid-value.
# emoji=False: a dataset named ":smile:" (or such a value) prints as it is.
_out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 240)
_err = Console(stderr=True, highlight=False, emoji=False)
_options = {"debug": False, "quiet": False}

StoreArg = Annotated[Path, typer.Argument(help="Store directory.", show_default=False)]
NameArg = Annotated[str, typer.Argument(help="Dataset name (group/sub/name).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter.")] = False,
) -> None:
    _options["debug"] = debug
    _options["quiet"] = quiet


class UsageError(Exception):
    """A bad option value: exit status 2, like typer's own usage errors."""


@contextlib.contextmanager
def _errors_to_exit() -> Iterator[None]:
    """The one place where errors become a message and an exit status."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except UsageError as exc:
        if _options["debug"]:
            raise
        print(f"mmstore: usage error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    except (mmstore.MmstoreError, OSError, ValueError) as exc:
        if _options["debug"]:
            raise
        print(f"mmstore: error: {_one_line(exc)}", file=sys.stderr)
        raise typer.Exit(getattr(exc, "exit_code", 1)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, mmstore.MmstoreError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    text = " ".join(str(exc).split("\n"))
    # (The library's advice names its API; at the shell, the reading commands need no mode.)
    return text.replace("open it with mode='r'", "ls, info, get and verify can still read it")


@contextlib.contextmanager
def _progress(description: str, total: int | None) -> Iterator[Any]:
    """A progress bar on a terminal (stderr), nothing otherwise. Yields update(done)."""
    if _options["quiet"] or not _err.is_terminal:
        yield lambda done, total=None: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    # markup=False: descriptions name files and datasets, which may hold brackets.
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_err, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def update(done: int, new_total: int | None = None) -> None:
            progress.update(task, completed=done, total=new_total if new_total is not None else total)

        yield update


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return {
        **info,
        "dtype": _textio.dtype_text(info["dtype"]),
        "descr": encode_dtype(info["dtype"]),
        "shape": list(info["shape"]),
    }


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _open(store: Path, mode: str = "r") -> mmstore.Store:
    return mmstore.Store(store, mode)


# --- put ------------------------------------------------------------------------


def _parse_attrs(pairs: list[str]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--attr needs key=value, got {pair!r}")
        try:
            attrs[key] = json.loads(value)
        except ValueError:
            attrs[key] = value
    return attrs


@app.command()
def put(
    store: Annotated[Path, typer.Argument(help="Store directory (created if missing).", show_default=False)],
    name: NameArg,
    source: Annotated[
        str,
        typer.Argument(
            help="An .npy, .npz, .csv/.txt file, an HDF5 dataset (file.h5:/path), or - for .npy on stdin.",
            show_default=False,
        ),
    ],
    dtype: Annotated[str | None, typer.Option(help="dtype of text rows, e.g. 'f8' or 'chr:S10,pos:i4,pct:f4'.")] = None,
    delimiter: Annotated[
        str | None, typer.Option(help="Text column delimiter (default: ',' for .csv, whitespace).")
    ] = None,
    skip_rows: Annotated[int, typer.Option(help="Text lines to skip first (a header).", min=0)] = 0,
    attr: Annotated[
        list[str], typer.Option("--attr", help="key=value attribute (value parsed as JSON if it can be).")
    ] = [],  # noqa: B006
) -> None:
    """Store an array from a file or stdin (atomically: readers see all of it or none)."""
    with _errors_to_exit():
        attrs = _parse_attrs(attr)
        try:
            parsed_dtype = _textio.parse_dtype(dtype) if dtype else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        # Checked before the store is opened (it may be created): a put that cannot work
        # leaves no new, empty store behind.
        _names.validate_name(name)
        if source != "-":
            source_file, h5_path = _split_source(source)
            if h5_path is None and Path(source).suffix.lower() not in _SOURCE_SUFFIXES:
                raise UsageError(_unknown_source(Path(source).suffix.lower()))
            _check_exists(source_file)
            if Path(source).suffix.lower() == ".npz":
                _npz_members(source, name)
        created = _missing_directories(store)
        try:
            with _open(store, "a") as opened:
                _put(opened, name, source, parsed_dtype, delimiter, skip_rows, attrs)
        except BaseException:
            if created:
                _remove_unused_store(store, created)
            raise


def _missing_directories(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for directory in (path.absolute(), *path.absolute().parents):
        if os.path.lexists(directory):
            break
        missing.append(directory)
    return missing


def _remove_unused_store(store: Path, created: list[Path]) -> None:
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


_TEXT_SUFFIXES = frozenset({".csv", ".txt", ".tsv", ".dat", ""})
_SOURCE_SUFFIXES = _TEXT_SUFFIXES | {".npy", ".npz"}


def _unknown_source(suffix: str) -> str:
    return f"unknown source type {suffix!r}: use .npy, .npz, .csv, .txt, file.h5:/path or -"


def _npz_members(source: str, name: str) -> list[str]:
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


def _split_source(source: str) -> tuple[str, str | None]:
    """(file, HDF5 dataset path) of a put source: ``file.h5:/path`` names a dataset in
    ``file.h5``; anything else is a file (path None)."""
    for marker in (".h5:", ".hdf5:"):
        head, found, path = source.partition(marker)
        if found:
            return head + marker[:-1], path
    return source, None


def _check_exists(path: str) -> None:
    """Fail now if ``path`` is missing (a stat, not an open: a FIFO must be opened only once)."""
    os.stat(path)


def _put(
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
    h5_file, h5_path = _split_source(source)
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
        members = _npz_members(source, name)  # every name checked before the first commit
        with _open_npz(source) as archive:  # each member streamed, never loaded whole
            for entry in members:
                label = f"{source}:{entry[:-4]}"
                with _npz_errors(label), archive.open(entry) as stream:
                    _put_npy_stream(store, f"{name}/{entry[:-4]}", stream, label, attrs)
    elif suffix in _TEXT_SUFFIXES:
        if delimiter is None:
            delimiter = {".csv": ",", ".tsv": "\t"}.get(suffix)
        with open(source, encoding="utf-8", newline="") as stream:
            size = os.fstat(stream.fileno()).st_size
            blocks = _textio.text_blocks(stream, source, dtype or np.dtype("f8"), delimiter, skip_rows)
            store.put_blocks(
                name, _counting(blocks, f"parsing {source}", size, stream), dtype=dtype or "f8", attrs=attrs
            )
    else:
        raise UsageError(_unknown_source(suffix))


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
    with _progress(label, total) as update:
        for block in blocks:
            done = stream.buffer.tell() if stream is not None and hasattr(stream, "buffer") else done + block.nbytes
            update(done)
            yield block


# --- get ------------------------------------------------------------------------


def _parse_slice(text: str) -> slice:
    try:
        parts = [int(p) if p.strip() else None for p in text.split(":")]
    except ValueError:
        raise UsageError(f"--slice takes START:STOP[:STEP] of integers, got {text!r}") from None
    if len(parts) == 1 and parts[0] is not None:
        return slice(parts[0], parts[0] + 1 if parts[0] != -1 else None)
    if not 2 <= len(parts) <= 3:
        raise UsageError(f"--slice takes START:STOP[:STEP], got {text!r}")
    if len(parts) == 3 and parts[2] == 0:
        raise UsageError(f"--slice STEP cannot be zero, got {text!r}")
    return slice(*parts)


@app.command()
def get(
    store: StoreArg,
    name: NameArg,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write .npy, .csv or .txt (by suffix).")] = None,
    rows: Annotated[str | None, typer.Option("--slice", help="Rows START:STOP[:STEP] (read nothing else).")] = None,
) -> None:
    """Write a dataset to a file, to stdout as .npy when piped, or preview it on a terminal."""
    with _errors_to_exit():
        selection = _parse_slice(rows) if rows else None
        with _open(store) as opened:
            array = opened.get(name)
            if selection is not None:
                if array.ndim == 0:
                    raise UsageError("--slice needs a dataset with at least one dimension")
                array = array[selection]
            if output is not None:
                _write_output(array, output)
            elif not sys.stdout.isatty():
                _textio.write_npy(sys.stdout.buffer, array)
                sys.stdout.buffer.flush()
            else:
                _preview(name, array)


def _write_output(array: np.ndarray, output: Path) -> None:
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
            with _progress(f"writing {output}", array.nbytes) as update:
                if suffix == ".npy":
                    with os.fdopen(fd, "wb") as stream:
                        _textio.write_npy(stream, array)
                else:
                    delimiter = {".csv": ",", ".tsv": "\t"}.get(suffix, " ")
                    with os.fdopen(fd, "w", encoding="utf-8") as stream:
                        _textio.write_text(stream, array, delimiter, label=str(output))
                update(array.nbytes)
            os.replace(temp, output)
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


def _preview(name: str, array: np.ndarray) -> None:
    # Text, not markup: names and dtypes hold brackets ("<M8[s]", "runs[2]").
    _out.print(Text.assemble((name, "bold"), f"  dtype {array.dtype}  shape {array.shape}  {_human(array.nbytes)}"))
    with np.printoptions(threshold=40, edgeitems=5, linewidth=_out.width):
        head = array[:10] if array.ndim else array
        _out.print(str(head), markup=False)
    if array.ndim and len(array) > 10:
        _out.print(f"... {len(array) - 10} more rows")


# --- looking at a store ------------------------------------------------------------


@app.command("ls")
def list_datasets(
    store: Annotated[Path, typer.Argument(help="Store directory.")] = Path("."),
    prefix: Annotated[str, typer.Argument(help="Only datasets under this group.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """List datasets: name, dtype, shape, size, modified."""
    with _errors_to_exit():
        infos, broken = [], []
        with _open(store) as opened:
            for name in opened.keys(prefix):
                try:
                    infos.append(opened.info(name))
                except mmstore.MmstoreError as exc:
                    broken.append(_one_line(exc))
        if as_json:
            print(json.dumps([_jsonable(info) for info in infos], indent=2))
        else:
            from rich.table import Table

            table = Table("name", "dtype", "shape", "size", "modified", box=None)
            for column in table.columns:
                column.no_wrap = True
            for info in infos:
                modified = _local_time(info["modified"], "seconds")
                shape = str(info["shape"]) + (" +" if info["growable"] else "")
                cells = (info["name"], _textio.dtype_text(info["dtype"]), shape, _human(info["nbytes"]), modified)
                table.add_row(*map(Text, cells))  # (not markup: "<M8[s]" must keep its "[s]")
            _out.print(table)
        for message in broken:
            print(f"mmstore: warning: {message}", file=sys.stderr)


def _local_time(timestamp: Any, timespec: str) -> str:
    """A sidecar's timestamp as local time, or as the number itself if it is no date
    datetime can show (1e300 or -1e13 are finite floats, so the library keeps them)."""
    try:
        return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec=timespec)
    except (OverflowError, OSError, ValueError, TypeError):
        return str(timestamp)


@app.command()
def info(store: StoreArg, name: NameArg, as_json: JsonOpt = False) -> None:
    """Show a dataset's header: dtype, shape, attrs, generation, times, checksum."""
    with _errors_to_exit(), _open(store) as opened:
        record = _jsonable(opened.info(name))
        if as_json:
            print(json.dumps(record, indent=2))
            return
        for key, value in record.items():
            if key in ("created", "modified"):
                value = _local_time(value, "microseconds")
            _out.print(f"[bold]{key}[/bold]: ", end="")
            _out.print(str(value), markup=False, soft_wrap=True)


@app.command()
def rm(
    store: StoreArg,
    names: Annotated[list[str], typer.Argument(help="Dataset names.", show_default=False)],
) -> None:
    """Delete datasets (readers that hold them keep their arrays)."""
    names = list(dict.fromkeys(names))  # (a name given twice is deleted once)
    with _errors_to_exit(), _open(store, "r+") as opened:
        for name in names:  # all or nothing: a missing name deletes none of them
            if name not in opened:
                opened.info(name)  # raises the usual one-line error (bad name, missing, corrupt)
        for name in names:
            opened.delete(name)


@app.command()
def verify(store: StoreArg) -> None:
    """Check every header and checksum; exit 1 if any dataset has a problem."""
    with _errors_to_exit(), _open(store) as opened:
        total = len(opened.keys())
        done = 0
        with _progress("verifying", total) as update:

            def step(_name: str) -> None:
                nonlocal done
                done += 1
                update(done)

            report = opened.verify(progress=step)
        _out.print(str(report), markup=False, soft_wrap=True)
        if not report.ok:
            raise typer.Exit(1)


@app.command()
def recover(store: StoreArg) -> None:
    """Remove dead writers' leftovers; quarantine (never delete) unreadable datasets."""
    with _errors_to_exit(), _open(store, "r+") as opened:
        report = opened.recover()
        _out.print(str(report), markup=False, soft_wrap=True)


@app.command()
def tail(
    store: StoreArg,
    name: NameArg,
    last: Annotated[int, typer.Option("--last", "-n", help="Rows to show before following.", min=0)] = 10,
    count: Annotated[int | None, typer.Option(help="Stop after this many new rows.", min=1)] = None,
    idle_timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds without new rows.")] = None,
) -> None:
    """Print a growable dataset's last rows, then new rows as they are flushed (Ctrl-C stops).
    A fixed-size dataset gets no new rows: its last rows are printed and tail exits."""
    with _errors_to_exit(), _open(store) as opened, opened.open_reader(name) as reader:
        if reader.array.ndim == 0:
            raise mmstore.InvalidArgumentError(f"dataset {name!r} is a 0-d value, which has no rows to follow: use get")
        start = max(0, len(reader) - last)
        if not opened.info(name)["growable"]:
            if len(reader) > start:
                print("\n".join(_textio.text_lines(reader.array[start:], " ")), flush=True)
            return
        initial_end = position = len(reader)
        position = start
        for block in reader.follow(start=start, idle_timeout=idle_timeout):
            print("\n".join(_textio.text_lines(block, " ")), flush=True)  # (the lines of `get -o x.txt`)
            position += len(block)
            if count is not None and position - initial_end >= count:
                return


# --- HDF5 ----------------------------------------------------------------------------


def _parse_chunks(text: str | None) -> bool | tuple[int, ...] | None:
    if text is None:
        return None
    if text == "auto":
        return True
    try:
        chunks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--chunks takes 'auto' or sizes like 1000,64, got {text!r}") from None
    if not chunks or any(n <= 0 for n in chunks):
        raise UsageError(f"--chunks sizes must be positive, got {text!r}")
    return chunks


@app.command()
def compact(
    store: StoreArg,
    output: Annotated[Path, typer.Argument(help="HDF5 file to write.", show_default=False)],
    only: Annotated[
        str,
        typer.Option(
            help="Only the dataset NAME and the datasets under the group NAME; NAME/ for only those under the group."
        ),
    ] = "",
    compression: Annotated[str | None, typer.Option(help="gzip or lzf.")] = None,
    chunks: Annotated[
        str | None,
        typer.Option(
            help="'auto' (h5py's choice) or a chunk shape like 1000,64: upper bounds for each dataset's leading "
            "axes, cut to its extents; later axes are whole. 0-d and empty datasets are never chunked."
        ),
    ] = None,
) -> None:
    """Export every dataset's committed view to one HDF5 file (written to a temp file, then renamed)."""
    with _errors_to_exit():
        if compression not in (None, "gzip", "lzf"):
            raise UsageError(f"--compression must be gzip or lzf, not {compression!r}")
        chunk_option = _parse_chunks(chunks)
        with _open(store) as opened:
            total = sum(opened.info(name)["nbytes"] for name in selected_names(opened, only))
            finished = 0
            with _progress(f"compacting into {output}", total) as update:

                def step(_name: str, done: int, size: int) -> None:
                    nonlocal finished
                    update(finished + done)
                    if done == size:
                        finished += size

                names = mmstore.export_hdf5(
                    opened, output, only=only, compression=compression, chunks=chunk_option, progress=step
                )
        if not _options["quiet"]:
            _err.print(Text(f"wrote {len(names)} datasets ({_human(total)}) to {output}"))


@app.command("import")
def import_(
    source: Annotated[Path, typer.Argument(help="HDF5 file to read.", show_default=False)],
    store: Annotated[Path, typer.Argument(help="Store directory (created if missing).", show_default=False)],
    only: Annotated[str, typer.Option(help="Only datasets under this HDF5 group.")] = "",
) -> None:
    """Put every dataset of an HDF5 file into the store (the reverse of compact)."""
    with _errors_to_exit():
        _check_exists(str(source))  # (before the store is opened: it may be created)
        import h5py

        if source.is_file() and not h5py.is_hdf5(source):
            raise mmstore.InvalidArgumentError(f"{source}: not an HDF5 file")
    with _errors_to_exit(), _open(store, "a") as opened:
        done = 0
        with _progress(f"importing {source}", source.stat().st_size) as update:

            def step(_name: str, size: int, _total: int) -> None:
                nonlocal done
                done += size
                update(done)

            imported, skipped = mmstore.import_hdf5(source, opened, only=only, progress=step)
        for name, reason in skipped.items():
            print(f"mmstore: skipped {name}: {reason}", file=sys.stderr)
        if not _options["quiet"]:
            _err.print(f"imported {len(imported)} datasets")
        if skipped:
            raise typer.Exit(1)


# --- cache -----------------------------------------------------------------------------

cache_app = typer.Typer(help="Look at or empty a cache made by mmstore.Cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(
    path: Annotated[Path, typer.Argument(help="Cache directory.", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Entries, bytes, hits, misses and evictions of a cache."""
    with _errors_to_exit():
        _require_store(path)
        with mmstore.Cache(path) as cache:
            stats = cache.stats()
        if as_json:
            print(json.dumps(stats, indent=2))
        else:
            for key, value in stats.items():
                shown = _human(value) if key == "bytes" else value
                _out.print(Text.assemble((key, "bold"), f": {shown}"), highlight=False)


@cache_app.command("clear")
def cache_clear(path: Annotated[Path, typer.Argument(help="Cache directory.", show_default=False)]) -> None:
    """Remove every entry of a cache."""
    with _errors_to_exit():
        _require_store(path)
        with mmstore.Cache(path) as cache:
            removed = cache.clear()
        if not _options["quiet"]:
            _err.print(f"removed {removed} entries")


def _require_store(path: Path) -> None:
    """A clear error for a path that is not a cache, instead of making it one."""
    mmstore.Store(path, "r").close()  # "no store" rather than creating one
    if not (path / ".mmstore-cache").is_file():
        raise mmstore.StoreNotFoundError(f"{str(path)!r} is a store but not a cache (it has no .mmstore-cache)")


# --- demo ----------------------------------------------------------------------------


@app.command()
def demo(
    arrays: Annotated[int, typer.Option(help="Number of arrays to share.", min=1)] = 8,
    megabytes: Annotated[int, typer.Option(help="Size of each array in MiB.", min=1)] = 16,
    readers: Annotated[int, typer.Option(help="Number of reader processes.", min=1)] = 3,
) -> None:
    """Run a writer process and reader processes sharing arrays, beside a pickling baseline."""
    from ._demo import run_demo

    with _errors_to_exit():
        _out.print(
            f"A writer process puts {arrays} arrays of {megabytes} MiB into a temporary store; "
            f"{readers} reader processes map and sum them.\nBaseline: the same arrays pickled "
            "through multiprocessing.Queue to each reader. Process start-up is excluded from both."
        )
        result = run_demo(arrays, megabytes, readers)
        from rich.table import Table

        table = Table("path", "wall time", "relative")
        table.add_row("mmstore (put once, every reader maps it)", f"{result.mmstore_seconds:.3f} s", "1.00x")
        table.add_row(
            "multiprocessing.Queue (pickle per reader)", f"{result.queue_seconds:.3f} s", f"{result.speedup:.2f}x"
        )
        _out.print(table)
        _out.print("every reader saw identical data: " + ("yes" if result.checksums_match else "NO"))
        if not result.checksums_match:
            raise typer.Exit(1)


_GLOBAL_FLAGS = ("--debug", "--quiet", "-q")


def main() -> None:
    # The global flags work after the subcommand too (`mmstore get S x --debug`):
    # move them in front of it, where typer expects them. Nothing after `--` moves.
    args = sys.argv[1:]
    end = args.index("--") if "--" in args else len(args)
    flags = [arg for arg in args[:end] if arg in _GLOBAL_FLAGS]
    rest = [arg for arg in args[:end] if arg not in _GLOBAL_FLAGS]
    app(args=[*flags, *rest, *args[end:]])


if __name__ == "__main__":
    main()
