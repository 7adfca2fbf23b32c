"""File formats at the edge of the CLI: dtype strings, text tables and .npy streams.

Everything here streams: a text file is parsed in blocks of lines, an .npy
stream is read in blocks of rows, so `mmstore put` of a 10 GB file needs
memory for one block, not for the file.
"""

from __future__ import annotations

import re
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from typing import IO, Any

import numpy as np
import numpy.lib.format as npy_format

from ._dtypes import encode_dtype
from ._errors import MmstoreError, UnsupportedDtypeError

BLOCK_LINES = 65_536
_RECENT_LINES = 4096  # (lines kept for the message of a bad one)
BLOCK_BYTES = 32 * 2**20


class TextFormatError(MmstoreError, ValueError):
    """A line of a text table that does not parse with the requested dtype."""


def parse_dtype(text: str) -> np.dtype[Any]:
    """A dtype from the command line: ``f8``, ``<i4``, ``S10,i4,f4`` or ``chr:S10,pos:i4``
    (a sub-array field as ``v:(3,)f8``)."""
    text = text.strip()
    try:
        if "," in text or ":" in text:
            fields = []
            for index, part in enumerate(p.strip() for p in _top_level_parts(text)):
                name, _, kind = part.rpartition(":")
                fields.append((name.strip() or f"f{index}", np.dtype(kind.strip())))
            dtype = np.dtype(fields)
        else:
            dtype = np.dtype(text)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise ValueError(f"not a dtype: {text!r} ({exc})") from None
    encode_dtype(dtype)
    return dtype


def _top_level_parts(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses (those of ``(2,3)f8`` stay)."""
    parts, depth, start = [], 0, 0
    for position, character in enumerate(text):
        depth += {"(": 1, ")": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    return [*parts, text[start:]]


def dtype_text(dtype: np.dtype[Any]) -> str:
    """A short dtype string, in the --dtype syntax where it can be (``chr:S10,pos:i4,v:(3,)f8``)."""
    if dtype.names is None:
        return dtype.str.lstrip("|") if dtype.subdtype is None else str(dtype)
    parts = []
    for name in dtype.names:
        field = dtype.fields[name][0]  # type: ignore[index]
        base, shape = field.subdtype if field.subdtype is not None else (field, ())
        if base.names is not None or base.subdtype is not None or ":" in name or "," in name or "(" in name:
            return str(dtype)
        prefix = f"({','.join(map(str, shape))}{',' if len(shape) == 1 else ''})" if shape else ""
        parts.append(f"{name}:{prefix}{base.str.lstrip('|')}")
    return ",".join(parts)


def text_blocks(
    stream: IO[str], label: str, dtype: np.dtype[Any], delimiter: str | None, skip_rows: int
) -> Iterator[np.ndarray]:
    """Parse a text table in blocks of BLOCK_LINES rows (fewer if they would take more than
    BLOCK_BYTES); a bad line raises TextFormatError naming it.

    np.loadtxt reads each block from one iterator over the stream's lines and stops after
    ``max_rows`` rows, having taken from the iterator exactly the lines they span, so a
    block ends where a row does: a quoted value that spans lines is never cut in two (a
    block of a fixed count of lines silently made two wrong rows of it). Comment and blank
    lines count for no row, so a block short of rows means the stream has ended.
    """
    converters = _bool_converters(dtype)
    # Parsed as a wider dtype, then checked and narrowed: np.loadtxt itself cuts a string
    # longer than its field and turns a number too large for a float32 into inf, silently.
    wide = _widened(dtype)
    rows_before = 0
    read = [0]  # lines read from the stream so far
    for _ in range(skip_rows):
        if not stream.readline():
            return
        read[0] += 1
    # The last lines read, numbered, for the message of a bad one (the row numpy refused is
    # among the last it read). Bounded: comment lines, which count for no row, can be many.
    recent: deque[tuple[int, str]] = deque(maxlen=_RECENT_LINES)

    def each_line() -> Iterator[str]:
        for line in stream:
            read[0] += 1
            recent.append((read[0], line))
            yield line

    source = each_line()
    # A plain dtype's table has a column per cell: read as 2-D (a block of one row would
    # otherwise come back as a row of cells), a single column then as a vector.
    plain = dtype.names is None and dtype.subdtype is None
    # np.loadtxt allocates max_rows rows at once: the first block is small, and later ones
    # are held to BLOCK_BYTES by the width of the rows read (a plain table's row is every
    # column of it, which the dtype does not tell).
    block_rows = 16
    most_rows = max(1, min(BLOCK_LINES, BLOCK_BYTES // max(dtype.itemsize, 1)))
    while True:
        block_rows = min(block_rows, most_rows)
        first = read[0] + 1
        try:
            block = _loadtxt(
                source,
                dtype=wide,
                delimiter=delimiter,
                ndmin=2 if plain else 1,
                comments="#",
                encoding=None,
                quotechar='"',
                converters=converters,
                max_rows=block_rows,
            )
        except (ValueError, TypeError) as exc:
            block_lines = [(number, line) for number, line in recent if number >= first]
            raise _locate_error(block_lines, first, label, dtype, delimiter, exc) from None
        rows = block.shape[0]
        if wide != dtype:
            block_lines = [(number, line) for number, line in recent if number >= first]
            block = _narrowed(block, dtype, label, delimiter, block_lines, first, rows_before)
        rows_before += rows
        if rows:
            most_rows = max(1, min(BLOCK_LINES, BLOCK_BYTES // max(block.nbytes // rows, 1)))
            yield block[:, 0] if plain and block.shape[1] == 1 else block
        if rows < block_rows:
            return
        block_rows *= 2


def _widened(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """``dtype`` with every string field one character wider and every float or complex
    narrower than 64 (128) bits at 64 (128): what text is parsed as, so that what the
    requested dtype would lose shows (``dtype`` itself if nothing is widened)."""
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        wide_base = _widened(base)
        return dtype if wide_base == base else np.dtype((wide_base, shape))
    if dtype.names is not None:
        fields = [(name, _widened(dtype.fields[name][0])) for name in dtype.names]  # type: ignore[index]
        if all(kind == dtype.fields[name][0] for name, kind in fields):  # type: ignore[index]
            return dtype
        return np.dtype(fields)
    if dtype.kind in "SU":
        return np.dtype(f"{dtype.kind}{dtype.itemsize // (4 if dtype.kind == 'U' else 1) + 1}")
    if dtype.kind == "f" and dtype.itemsize < 8:
        return np.dtype("f8")
    if dtype.kind == "c" and dtype.itemsize < 16:
        return np.dtype("c16")
    return dtype


def _narrowed(
    block: np.ndarray,
    dtype: np.dtype[Any],
    label: str,
    delimiter: str | None,
    lines: list[tuple[int, str]],
    first: int,
    rows_before: int,
) -> np.ndarray:
    """``block`` (parsed as _widened(dtype)) as ``dtype``; TextFormatError naming the line
    and column of the first cell that does not fit: a string longer than its field, a
    finite number beyond the float's range (as the writers' appends refuse them)."""
    structured = dtype.names is not None
    targets = [kind for _label, _path, kind in column_leaves(dtype)] if structured else None
    for column, (name, path, kind) in enumerate(column_leaves(block[:0] if structured else block), start=1):
        target = targets[column - 1] if targets is not None else dtype.subdtype[0] if dtype.subdtype else dtype
        if kind == target:
            continue
        values = _leaf_column(block, path)
        if target.kind in "SU":
            width = target.itemsize // (4 if target.kind == "U" else 1)
            bad = np.char.str_len(values) > width
            why = f"longer than the {width} characters of {target}"
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                bad = np.isfinite(values) & ~np.isfinite(values.astype(target))
            why = f"beyond the range of {target} (largest {np.finfo(target).max})"
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            found = _row_line(lines, first, row)
            if found is None:  # (not among the lines kept: say which row, and what was read of it)
                value = values[row]
                where = f" row {rows_before + row + 1}"
                cell = (value.decode("latin-1") if isinstance(value, bytes) else str(value)) + "..." * (
                    target.kind in "SU"
                )
            else:
                number, line = found
                where = f" line {number}"
                cells = _line_cells(line, delimiter)
                cell = cells[column - 1].strip() if column <= len(cells) else str(values[row])
            field = f" ({name!r})" if structured else ""
            raise TextFormatError(
                f"{label}{where}, column {column}{field}: {cell!r} is {why} (it would lose information)"
            )
    return block.astype(dtype)


def _row_line(lines: list[tuple[int, str]], first: int, row: int) -> tuple[int, str] | None:
    """The numbered line that holds data row ``row`` of the block that starts at line
    ``first`` (comment and blank lines hold none), if ``lines`` still hold all of it."""
    if not lines or lines[0][0] != first:
        return None  # (the block's first lines are no longer kept: counting would go wrong)
    for number, line in lines:
        if _line_cells(line, delimiter=None):
            if row == 0:
                return number, line
            row -= 1
    return None


def _loadtxt(lines: Iterable[str], **options: Any) -> np.ndarray:
    """np.loadtxt, without its warnings that the input or a line held no data: comment and
    blank lines (or an empty cell) are no data, not a problem to warn of, and they count
    for no row of ``max_rows`` (what text_blocks relies on, not a change to warn of)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*contained no data", UserWarning)
        return np.loadtxt(lines, **options)


def _bool_converters(dtype: np.dtype[Any]) -> Any:
    """loadtxt converters for the bool columns of ``dtype`` (None if it has none)."""
    if dtype.names is None:
        base = dtype.subdtype[0] if dtype.subdtype is not None else dtype
        return _parse_bool if base.kind == "b" else None
    columns = {index: _parse_bool for index, (_, _, kind) in enumerate(column_leaves(dtype)) if kind.kind == "b"}
    return columns or None


def _parse_bool(text: str) -> bool:
    """A bool cell: True/False (as write_text writes them, in any case) or an integer (as numpy reads them)."""
    word = text.strip().lower()
    if word in ("true", "false"):
        return word == "true"
    try:
        return int(word) != 0
    except ValueError:
        raise ValueError(f"could not convert string {text!r} to bool") from None


def _line_cells(line: str, delimiter: str | None) -> list[str]:
    """The cells of one line of a table, comments cut off; [] for a line with no data."""
    data = line.split("#", 1)[0].strip()
    if not data:
        return []
    return data.split(delimiter) if delimiter else data.split()


def _locate_error(
    lines: list[tuple[int, str]], first: int, label: str, dtype: np.dtype[Any], delimiter: str | None, exc: Exception
) -> TextFormatError:
    """Find the line and column that numpy refused among ``lines`` (numbered), and say so;
    ``first``: the number of the block's first line, which numpy's own message counts from."""
    leaves = column_leaves(dtype) if dtype.names else []  # (a sub-array field is a column per element)
    names = [label for label, _path, _kind in leaves]
    expected: tuple[int, int] | None = None  # (columns, line) of the first row, for plain dtypes
    for number, line in lines:
        cells = _line_cells(line, delimiter)
        if not cells:
            continue
        if names and len(cells) != len(names):
            return TextFormatError(
                f"{label} line {number}: {len(cells)} columns, expected {len(names)} ({', '.join(names)})"
            )
        if not names:
            if expected is None:
                expected = (len(cells), number)
            elif len(cells) != expected[0]:
                count, seen_on = expected
                where = (
                    f"column {len(cells) + 1} is missing"
                    if len(cells) < count
                    else f"column {count + 1} is one too many"
                )
                return TextFormatError(
                    f"{label} line {number}: {where} ({len(cells)} columns, {count} on line {seen_on})"
                )
        for column, cell in enumerate(cells, start=1):
            kind = leaves[column - 1][2] if names else dtype
            try:
                # (with the table's delimiter: under the default, whitespace, a cell "1 2" parses)
                _loadtxt(
                    [cell], dtype=kind, delimiter=delimiter, ndmin=1, encoding=None, converters=_bool_converters(kind)
                )
            except (ValueError, TypeError):
                field = f" ({names[column - 1]!r})" if names else ""
                return TextFormatError(
                    f"{label} line {number}, column {column}{field}: cannot parse {cell.strip()!r} as {kind}"
                )
    match = re.search(r"row (\d+)", str(exc))
    # (NumPy counts rows from 0 in a cell it cannot convert, from 1 in a change of column count.)
    from_one = not str(exc).startswith("could not convert")
    where = f" line {first + int(match.group(1)) - from_one}" if match else ""
    return TextFormatError(f"{label}{where}: {exc}")


def npy_stream(stream: IO[bytes], label: str) -> tuple[np.dtype[Any], tuple[int, ...], Iterator[np.ndarray]]:
    """Read an .npy header from a stream; return (dtype, shape, row blocks)."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise TextFormatError(f"{label}: not an .npy stream ({exc})") from None
    if dtype.hasobject:
        raise UnsupportedDtypeError(f"{label}: holds Python objects (pickles are never loaded)")
    total = int(np.prod(shape)) * dtype.itemsize

    def blocks() -> Iterator[np.ndarray]:
        if fortran:  # column-major on the wire: only a whole read can reorder it
            array = np.frombuffer(_read_exactly(stream, total, label), dtype).reshape(shape, order="F")
            yield np.ascontiguousarray(array).reshape(shape if shape else (1,))
            return
        if not shape:
            yield np.frombuffer(_read_exactly(stream, dtype.itemsize, label), dtype).reshape(1)
            return
        row_bytes = total // shape[0] if shape[0] else 0
        rows_per_block = max(1, BLOCK_BYTES // max(row_bytes, 1))
        for start in range(0, shape[0], rows_per_block):
            count = min(rows_per_block, shape[0] - start)
            data = _read_exactly(stream, count * row_bytes, label)
            yield np.frombuffer(data, dtype).reshape((count, *shape[1:]))

    return dtype, tuple(shape), blocks()


def _read_exactly(stream: IO[bytes], count: int, label: str) -> bytes:
    data = stream.read(count)
    if data is None or len(data) != count:
        raise TextFormatError(f"{label}: stream ended early ({len(data or b'')} of {count} bytes)")
    return data


def write_npy(stream: IO[bytes], array: np.ndarray) -> None:
    """Write ``array`` as .npy, in blocks (a mapped array is never copied whole)."""
    header = npy_format.header_data_from_array_1_0(array)
    header["fortran_order"] = False
    if len(repr(header)) > 60_000:  # version 1.0 headers are limited to 64 KiB
        npy_format.write_array_header_2_0(stream, header)
    else:
        npy_format.write_array_header_1_0(stream, header)
    if array.ndim == 0:
        stream.write(np.ascontiguousarray(array).tobytes())
        return
    rows = max(1, BLOCK_BYTES // max(array[:1].nbytes, 1))
    for start in range(0, array.shape[0], rows):
        stream.write(np.ascontiguousarray(array[start : start + rows]).tobytes())


def write_text(stream: IO[str], array: np.ndarray, delimiter: str, label: str = "output") -> None:
    """Write rows as delimited text; bytes fields are decoded, floats keep full precision.

    Text the stream cannot encode (a lone surrogate in a 'U' value) raises TextFormatError
    naming ``label`` and the line."""
    if array.ndim == 0:
        array = array.reshape(1)
    for start in range(0, array.shape[0], BLOCK_LINES):
        lines = text_lines(array[start : start + BLOCK_LINES], delimiter)
        try:
            stream.write("\n".join(lines) + "\n")
        except UnicodeEncodeError as exc:
            raise _encoding_error(lines, start, label, exc) from None


def text_lines(rows: np.ndarray, delimiter: str) -> list[str]:
    """One line of text per row: one column per scalar (a record's fields in order, each
    element of a sub-array field or of a row that is an array), as text_blocks reads them."""
    columns = [_column_cells(_leaf_column(rows, path), delimiter) for _label, path, _kind in column_leaves(rows)]
    if len(columns) == 1:
        return columns[0]
    return [delimiter.join(cells) for cells in zip(*columns, strict=True)] if columns else [""] * len(rows)


# A scalar column of a table: its label ("v[1]", "pos.x"), the steps that select it from an
# array of rows (a field name, or the index of an element of a sub-array), and its dtype.
_Leaf = tuple[str, tuple[str | tuple[int, ...], ...], np.dtype[Any]]


def column_leaves(rows: np.ndarray | np.dtype[Any]) -> list[_Leaf]:
    """The scalar columns of a table of ``rows`` (an array of rows, or a row dtype)."""
    if isinstance(rows, np.ndarray):
        kind = np.dtype((rows.dtype, rows.shape[1:])) if rows.ndim > 1 else rows.dtype
    else:
        kind = rows
    leaves: list[_Leaf] = []

    def walk(kind: np.dtype[Any], label: str, path: tuple[str | tuple[int, ...], ...]) -> None:
        if kind.subdtype is not None:
            base, shape = kind.subdtype
            for index in np.ndindex(*shape):
                walk(base, f"{label}[{','.join(map(str, index))}]", (*path, index))
        elif kind.names is not None:
            for name in kind.names:
                walk(kind.fields[name][0], f"{label}.{name}" if label else name, (*path, name))  # type: ignore[index]
        else:
            leaves.append((label, path, kind))

    walk(kind, "", ())
    return leaves


def _leaf_column(rows: np.ndarray, path: tuple[str | tuple[int, ...], ...]) -> np.ndarray:
    column = rows
    for step in path:
        if isinstance(step, str):
            column = column[step]
        else:
            element: tuple[slice | int, ...] = (slice(None), *step)
            column = column[element]
    return column


def _column_cells(column: np.ndarray, delimiter: str) -> list[str]:
    """The cells of one scalar column, each in a form text_blocks reads back as the same
    value: numbers as they are (they never need quotes), text quoted where needed."""
    kind = column.dtype.kind
    if kind == "M":  # ISO 8601 in the dtype's own unit ('2020-01-01T00:00:01', 'NaT')
        native = column.astype(column.dtype.newbyteorder("="))  # (numpy misreads swapped bytes here)
        return list(np.datetime_as_string(native).tolist())
    if kind == "m":  # a count of the dtype's unit (tolist() gives timedelta objects or bare integers)
        counts = column.astype(np.int64).tolist()
        missing = np.isnat(column).tolist()
        return ["NaT" if nat else str(count) for count, nat in zip(counts, missing, strict=True)]
    values = column.tolist()
    if kind in "biu":  # (bools as True and False)
        return list(map(str, values))
    if kind == "f" and column.dtype.itemsize <= 8:  # (tolist() gives float; a longdouble stays itself)
        return list(map(repr, values))  # full precision: the text reads back as the same float
    return [_text_cell(value, delimiter) for value in values]


def _encoding_error(lines: list[str], start: int, label: str, exc: UnicodeEncodeError) -> TextFormatError:
    """Name the line that could not be encoded (lines hold no line breaks of their own, but
    a quoted text field may: so each line is encoded again rather than counted)."""
    bad = exc.object[exc.start : exc.end]
    for offset, line in enumerate(lines):
        try:
            line.encode(exc.encoding)
        except UnicodeEncodeError:
            return TextFormatError(
                f"{label} line {start + offset + 1}: cannot write {bad!r} as {exc.encoding} ({exc.reason})"
            )
    return TextFormatError(f"{label}: cannot write {bad!r} as {exc.encoding} ({exc.reason})")


def _text_cell(value: Any, delimiter: str) -> str:
    """A cell of write_text: numbers as they are (they never need quotes), anything else
    (text, dates with a space in them) quoted where needed."""
    text = format_cell(value)
    return text if isinstance(value, (int, float)) else _quoted(text, delimiter)


def _quoted(text: str, delimiter: str) -> str:
    """``text`` as a CSV field: in double quotes (inner ones doubled) if it is empty or holds
    the delimiter (any whitespace for a space, which is how the reader splits such files),
    a quote, a line break or the comment sign, which text_blocks reads back as written."""
    if text and not (
        delimiter in text
        or '"' in text
        or "#" in text
        or "\n" in text
        or "\r" in text
        or (delimiter == " " and any(character.isspace() for character in text))
    ):
        return text
    return '"' + text.replace('"', '""') + '"'


def format_cell(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float):
        return repr(value)
    return str(value)
