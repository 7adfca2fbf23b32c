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
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.text import Text

import mmstore

from . import _names, _textio
from ._cli_io import (
    SOURCE_SUFFIXES,
    UsageError,
    check_exists,
    err,
    missing_directories,
    npz_members,
    options,
    out,
    progress,
    put_source,
    remove_unused_store,
    split_source,
    unknown_source,
    write_output,
)
from ._dtypes import encode_dtype
from ._hdf5 import import_selection, selected_names

app = typer.Typer(
    name="mmstore",
    help="Share NumPy arrays between processes through memory-mapped files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StoreArg = Annotated[Path, typer.Argument(help="Store directory.", show_default=False)]
NameArg = Annotated[str, typer.Argument(help="Dataset name (group/sub/name).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter.")] = False,
) -> None:
    options["debug"] = debug
    options["quiet"] = quiet


@contextlib.contextmanager
def _errors_to_exit() -> Iterator[None]:
    """The one place where errors become a message and an exit status."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except UsageError as exc:
        if options["debug"]:
            raise
        print(f"mmstore: usage error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    except (mmstore.MmstoreError, OSError, ValueError) as exc:
        if options["debug"]:
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
        if delimiter is not None and len(delimiter) != 1:  # (NumPy's text reader splits on one character)
            raise UsageError(f"--delimiter takes one character, got {delimiter!r}")
        try:
            parsed_dtype = _textio.parse_dtype(dtype) if dtype else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        # Checked before the store is opened (it may be created): a put that cannot work
        # leaves no new, empty store behind.
        _names.validate_name(name)
        if source != "-":
            source_file, h5_path = split_source(source)
            if h5_path is None and Path(source).suffix.lower() not in SOURCE_SUFFIXES:
                raise UsageError(unknown_source(Path(source).suffix.lower()))
            check_exists(source_file)
            if Path(source).suffix.lower() == ".npz":
                npz_members(source, name)
        created = missing_directories(store)
        try:
            with _open(store, "a") as opened:
                put_source(opened, name, source, parsed_dtype, delimiter, skip_rows, attrs)
        except BaseException:
            if created:
                remove_unused_store(store, created)
            raise


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
                write_output(array, output)
            elif not sys.stdout.isatty():
                _textio.write_npy(sys.stdout.buffer, array)
                sys.stdout.buffer.flush()
            else:
                _preview(name, array)


def _preview(name: str, array: np.ndarray) -> None:
    # Text, not markup: names and dtypes hold brackets ("<M8[s]", "runs[2]").
    out.print(Text.assemble((name, "bold"), f"  dtype {array.dtype}  shape {array.shape}  {_human(array.nbytes)}"))
    with np.printoptions(threshold=40, edgeitems=5, linewidth=out.width):
        head = array[:10] if array.ndim else array
        out.print(str(head), markup=False)
    if array.ndim and len(array) > 10:
        out.print(f"... {len(array) - 10} more rows")


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
            out.print(table)
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
            out.print(f"[bold]{key}[/bold]: ", end="")
            out.print(str(value), markup=False, soft_wrap=True)


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
        try:
            total: int | None = len(opened.keys())
        except mmstore.AccessDeniedError:
            total = None  # a group it may not list: verify checks the rest and reports it
        done = 0
        with progress("verifying", total) as update:

            def step(_name: str) -> None:
                nonlocal done
                done += 1
                update(done)

            report = opened.verify(progress=step)
        out.print(str(report), markup=False, soft_wrap=True)
        if not report.ok:
            raise typer.Exit(1)


@app.command()
def recover(store: StoreArg) -> None:
    """Remove dead writers' leftovers; quarantine (never delete) unreadable datasets.
    Exit 1 if a problem is left that cannot be moved (a symlinked or unlistable group)."""
    with _errors_to_exit(), _open(store, "r+") as opened:
        report = opened.recover()
        out.print(str(report), markup=False, soft_wrap=True)
        if report.unrepaired:
            raise typer.Exit(1)


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
        # --count counts rows past those committed when tail began; one flush may commit more
        # than are still wanted, so a block is cut to them.
        stop = None if count is None else len(reader) + count
        position = start
        for block in reader.follow(start=start, idle_timeout=idle_timeout):
            if stop is not None:
                block = block[: stop - position]
            print("\n".join(_textio.text_lines(block, " ")), flush=True)  # (the lines of `get -o x.txt`)
            position += len(block)
            if stop is not None and position >= stop:
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


def _per_dataset(update: Callable[[int], None]) -> Callable[[str, int, int], None]:
    """A progress callback of export_hdf5/import_hdf5 ``(name, bytes done of it, its size)``
    that moves one bar over all datasets (``update`` takes the bytes done in all)."""
    finished = 0

    def step(_name: str, done: int, size: int) -> None:
        nonlocal finished
        update(finished + done)
        if done == size:
            finished += size

    return step


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
            "axes, cut to its extents (and to 16 MiB a chunk); later axes are whole. 0-d and empty datasets are "
            "never chunked."
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
            with progress(f"compacting into {output}", total) as update:
                names = mmstore.export_hdf5(
                    opened,
                    output,
                    only=only,
                    compression=compression,
                    chunks=chunk_option,
                    progress=_per_dataset(update),
                )
        if not options["quiet"]:
            err.print(Text(f"wrote {len(names)} datasets ({_human(total)}) to {output}"))


@app.command("import")
def import_(
    source: Annotated[Path, typer.Argument(help="HDF5 file to read.", show_default=False)],
    store: Annotated[Path, typer.Argument(help="Store directory (created if missing).", show_default=False)],
    only: Annotated[str, typer.Option(help="Only datasets under this HDF5 group.")] = "",
) -> None:
    """Put every dataset of an HDF5 file into the store (the reverse of compact)."""
    with _errors_to_exit():
        check_exists(str(source))  # (before the store is opened: it may be created)
        import h5py

        if source.is_file() and not h5py.is_hdf5(source):
            raise mmstore.InvalidArgumentError(f"{source}: not an HDF5 file")
        with h5py.File(source, "r") as h5:  # (the bar's total: the bytes to import, not the file's size)
            total = sum(
                dataset.nbytes
                for _name, dataset in import_selection(h5, only)[0]
                if dataset.shape is not None and not dataset.dtype.hasobject
            )
    with _errors_to_exit(), _open(store, "a") as opened:
        with progress(f"importing {source}", total) as update:
            imported, skipped = mmstore.import_hdf5(source, opened, only=only, progress=_per_dataset(update))
        for name, reason in skipped.items():
            print(f"mmstore: skipped {name}: {reason}", file=sys.stderr)
        if not options["quiet"]:
            err.print(f"imported {len(imported)} datasets")
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
        # max_bytes is each handle's own setting (Cache(path, max_bytes=...)), not stored
        # with the cache: this handle's None would read as "unbounded".
        stats.pop("max_bytes", None)
        if as_json:
            print(json.dumps(stats, indent=2))
        else:
            for key, value in stats.items():
                shown = _human(value) if key == "bytes" else value
                out.print(Text.assemble((key, "bold"), f": {shown}"), highlight=False)


@cache_app.command("clear")
def cache_clear(path: Annotated[Path, typer.Argument(help="Cache directory.", show_default=False)]) -> None:
    """Remove every entry of a cache."""
    with _errors_to_exit():
        _require_store(path)
        with mmstore.Cache(path) as cache:
            removed = cache.clear()
        if not options["quiet"]:
            err.print(f"removed {removed} entries")


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
        out.print(
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
        out.print(table)
        out.print("every reader saw identical data: " + ("yes" if result.checksums_match else "NO"))
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
