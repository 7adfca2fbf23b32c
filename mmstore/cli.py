"""The `mmstore` command: a thin typer layer over the public API.

It parses arguments, calls mmstore, and turns an MmstoreError into a one-line
message and its exit code (1); usage errors exit with 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

import mmstore

app = typer.Typer(
    name="mmstore",
    help="Share NumPy arrays between processes through memory-mapped files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_console = Console()
_errors = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


def _fail(exc: BaseException) -> None:
    if _state["debug"]:
        raise exc
    _errors.print(f"mmstore: error: {exc}", markup=False, highlight=False)
    raise typer.Exit(getattr(exc, "exit_code", 1))


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return {**info, "dtype": str(info["dtype"]), "shape": list(info["shape"])}


@app.command()
def demo(
    arrays: Annotated[int, typer.Option(help="Number of arrays to share.")] = 8,
    megabytes: Annotated[int, typer.Option(help="Size of each array in MiB.")] = 16,
    readers: Annotated[int, typer.Option(help="Number of reader processes.")] = 3,
) -> None:
    """Run a writer process and reader processes sharing arrays, beside a pickling baseline."""
    from ._demo import run_demo

    _console.print(
        f"A writer process puts {arrays} arrays of {megabytes} MiB into a temporary store; "
        f"{readers} reader processes map and sum them.\nBaseline: the same arrays pickled "
        "through multiprocessing.Queue to each reader."
    )
    try:
        result = run_demo(arrays, megabytes, readers)
    except mmstore.MmstoreError as exc:
        _fail(exc)
        return
    table = Table("path", "wall time", "relative")
    table.add_row("mmstore (put once, every reader maps it)", f"{result.mmstore_seconds:.3f} s", "1.00x")
    table.add_row(
        "multiprocessing.Queue (pickle per reader)", f"{result.queue_seconds:.3f} s", f"{result.speedup:.2f}x slower"
    )
    _console.print(table)
    _console.print("every reader saw identical data: " + ("yes" if result.checksums_match else "NO"))
    if not result.checksums_match:
        raise typer.Exit(1)


@app.command("ls")
def list_datasets(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    prefix: Annotated[str, typer.Argument(help="Only datasets under this group.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List datasets: name, dtype, shape, size, modified."""
    try:
        with mmstore.Store(store, "r") as opened:
            infos = []
            for name in opened.keys(prefix):
                try:
                    infos.append(opened.info(name))
                except mmstore.FormatError as exc:
                    _errors.print(f"mmstore: warning: {exc}", markup=False, highlight=False)
    except mmstore.MmstoreError as exc:
        _fail(exc)
        return
    if as_json:
        print(json.dumps([_jsonable(info) for info in infos], indent=2))
        return
    table = Table("name", "dtype", "shape", "size", "modified")
    import datetime

    for info in infos:
        modified = datetime.datetime.fromtimestamp(info["modified"]).isoformat(sep=" ", timespec="seconds")
        table.add_row(info["name"], str(info["dtype"]), str(info["shape"]), _human(info["nbytes"]), modified)
    _console.print(table)


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a dataset's header."""
    try:
        with mmstore.Store(store, "r") as opened:
            record = _jsonable(opened.info(name))
    except mmstore.MmstoreError as exc:
        _fail(exc)
        return
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        for key, value in record.items():
            _console.print(f"[bold]{key}[/bold]: {value}", highlight=False)


@app.command()
def put(
    store: Annotated[Path, typer.Argument(help="Store directory (created if missing).")],
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    source: Annotated[str, typer.Argument(help="An .npy file, or - for an .npy stream on stdin.")],
) -> None:
    """Store an array from an .npy file."""
    try:
        if source == "-":
            import io

            array = np.load(io.BytesIO(sys.stdin.buffer.read()), allow_pickle=False)
        else:
            array = np.load(source, mmap_mode="r", allow_pickle=False)
        with mmstore.Store(store) as opened:
            opened.put(name, array)
    except (mmstore.MmstoreError, OSError, ValueError) as exc:
        _fail(exc)


@app.command()
def get(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write an .npy file.")] = None,
) -> None:
    """Write a dataset as .npy (to a file, or to stdout when piped), or preview it on a terminal."""
    try:
        with mmstore.Store(store, "r") as opened:
            array = opened.get(name)
            if output is not None:
                np.save(output, array, allow_pickle=False)
            elif not sys.stdout.isatty():
                np.lib.format.write_array(sys.stdout.buffer, array, allow_pickle=False)
            else:
                _console.print(f"{name}: dtype {array.dtype}, shape {array.shape}")
                _console.print(repr(array[:10] if array.ndim else array), highlight=False)
    except (mmstore.MmstoreError, OSError) as exc:
        _fail(exc)


@app.command()
def rm(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    names: Annotated[list[str], typer.Argument(help="Dataset names.")],
) -> None:
    """Delete datasets."""
    try:
        with mmstore.Store(store, "r+") as opened:
            for name in names:
                opened.delete(name)
    except mmstore.MmstoreError as exc:
        _fail(exc)


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def main() -> None:
    app()


if __name__ == "__main__":
    main()
