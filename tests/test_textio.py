"""Text tables are parsed in blocks of rows; a quoted value that spans lines is never cut."""

from __future__ import annotations

import io
import tracemalloc
import warnings
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmstore import _textio
from mmstore._textio import TextFormatError, text_blocks

TWO_TEXTS = np.dtype([("a", "U12"), ("b", "U12")])


def parse(text: str, delimiter: str | None, block_lines: int) -> Any:
    """The rows of ``text`` parsed by text_blocks in blocks of ``block_lines`` rows, or the
    error's type."""
    with mock.patch.object(_textio, "BLOCK_LINES", block_lines):
        try:
            blocks = list(text_blocks(io.StringIO(text), "t", TWO_TEXTS, delimiter, 0))
        except ValueError:  # (TextFormatError is one)
            return ValueError
    return np.concatenate(blocks).tolist() if blocks else []


def parse_whole(text: str, delimiter: str | None) -> Any:
    """The rows of ``text`` parsed by one np.loadtxt call, or ValueError (also for a cell
    longer than its field, which np.loadtxt would cut and text_blocks refuses)."""
    wider = np.dtype([("a", "U13"), ("b", "U13")])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # ("input contained no data")
            rows = np.loadtxt(
                text.splitlines(keepends=True), dtype=wider, delimiter=delimiter, ndmin=1,
                comments="#", encoding=None, quotechar='"',
            )  # fmt: skip
    except ValueError:
        return ValueError
    if any(len(cell) > 12 for row in rows.tolist() for cell in row):
        return ValueError
    return rows.astype(TWO_TEXTS).tolist()


def test_a_quoted_line_break_on_a_block_boundary_is_read_back() -> None:
    text = 'x,"first\nsecond"\ny,plain\n'
    assert parse(text, ",", 1) == [("x", "first\nsecond"), ("y", "plain")]
    assert parse(text, ",", 1) == parse_whole(text, ",")


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet='ab"#, \t\n', max_size=60),
    delimiter=st.sampled_from([",", None, ";"]),
    block_lines=st.integers(1, 3),
)
def test_blocks_parse_as_the_whole(text: str, delimiter: str | None, block_lines: int) -> None:
    """Whatever the cuts, the rows (or the failure) are those of one parse of the whole text."""
    assert parse(text, delimiter, block_lines) == parse_whole(text, delimiter)


def _field(delimiter: str | None) -> st.SearchStrategy[str]:
    stop = " \t" if delimiter is None else delimiter
    plain = st.text(alphabet="ab1.", min_size=1 if delimiter is None else 0, max_size=4)
    empty = 1 if delimiter is None else 0  # (NumPy reads "" as no field between blanks)
    quoted = st.text(alphabet=f'ab#"\n{stop}', min_size=empty, max_size=6).map(
        lambda text: '"' + text.replace('"', '""') + '"'
    )
    return plain | quoted


@st.composite
def tables(draw: st.DrawFn) -> tuple[str, str | None]:
    """Two-column tables whose quoted cells hold quotes, delimiters, '#' and line breaks."""
    delimiter = draw(st.sampled_from([",", None, ";"]))
    field = _field(delimiter)
    lines = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.integers(0, 5)) == 0:
            lines.append('# a comment with a quote: "')
        else:
            lines.append(draw(field) + ("," if delimiter == "," else ";" if delimiter == ";" else " ") + draw(field))
    return "\n".join(lines) + "\n", delimiter


@settings(max_examples=300, deadline=None)
@given(table=tables(), block_lines=st.integers(1, 3))
def test_quoted_line_breaks_survive_any_cut(table: tuple[str, str | None], block_lines: int) -> None:
    text, delimiter = table
    whole = parse_whole(text, delimiter)
    assert isinstance(whole, list), whole  # (these tables are valid)
    assert parse(text, delimiter, block_lines) == whole


@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 49, 1009])
def test_a_plain_table_keeps_its_columns_in_every_block(rows: int) -> None:
    """Blocks grow (16, 32, ... rows); one that holds a single row is still a row of
    columns, and a one-column table is a vector."""
    text = "".join(f"{i},{i + 0.5},{-i}\n" for i in range(rows))
    blocks = list(text_blocks(io.StringIO(text), "t", np.dtype("f8"), ",", 0))
    assert all(block.ndim == 2 and block.shape[1] == 3 for block in blocks)
    assert np.concatenate(blocks).tolist() == [[i, i + 0.5, -i] for i in range(rows)]
    column = list(text_blocks(io.StringIO("".join(f"{i}\n" for i in range(rows))), "t", np.dtype("i8"), ",", 0))
    assert np.concatenate(column).tolist() == list(range(rows))


def test_comment_lines_are_not_all_kept_in_memory() -> None:
    """Comment lines count for no row, so a block can span any number of them: the lines
    kept for error messages are bounded, not the whole file."""
    lines = (f"# comment line {i} {'x' * 200}\n" if i < 100_000 else "1,2\n" for i in range(100_001))

    class Stream:  # (a stream that makes its lines as they are read, as a pipe does)
        def __iter__(self) -> Any:
            return lines

        def readline(self) -> str:
            return next(lines, "")

    tracemalloc.start()
    try:
        blocks = list(text_blocks(Stream(), "t", np.dtype("i8"), ",", 0))  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.concatenate(blocks).tolist() == [[1, 2]]
    assert peak < 8 * 2**20, peak  # (the whole file is ~23 MB of lines)


def test_a_bad_cell_is_named_by_its_line_across_blocks() -> None:
    text = "".join(f"{i},{i}\n" for i in range(100)) + "# note\n" + "5,oops\n"
    with pytest.raises(TextFormatError, match=r"t line 102, column 2: cannot parse 'oops'"):
        list(text_blocks(io.StringIO(text), "t", np.dtype("i8"), ",", 0))


@pytest.mark.parametrize(
    ("text", "dtype", "where"),
    [
        ("ab 1\nabcdefg 2\n", "n:S4,x:i4", "line 2, column 1 ('n'): 'abcdefg' is longer than the 4 characters"),
        ("# c\n\nab,1\nabc,70000\n", "n:U4,x:f2", "line 4, column 2 ('x'): '70000' is beyond the range of float16"),
        ("1 2 3\n4 5e40 6\n", "f4", "line 2, column 2: '5e40' is beyond the range of float32"),
        ("1 2\n3 1e39j\n", "c8", "line 2, column 2: '1e39j' is beyond the range of complex64"),
        ("1 2 3 4\n5 6 7 abcde\n", "x:(3,)f4,n:S4", "line 2, column 4 ('n'): 'abcde'"),
        ("0.5 1 2\n0.5 1e39 2\n", "a:f8,v:(2,)f4", "line 2, column 2 ('v[0]'): '1e39'"),
    ],
)
def test_a_cell_its_dtype_would_cut_or_overflow_is_refused_by_line_and_column(
    text: str, dtype: str, where: str
) -> None:
    """np.loadtxt cuts a string longer than its field and turns a finite number too large
    for a narrow float into inf, silently; text_blocks refuses both (as writers' appends do)."""
    with pytest.raises(TextFormatError) as caught:
        list(text_blocks(io.StringIO(text), "t", _textio.parse_dtype(dtype), "," if "," in text else None, 0))
    assert f"t {where}" in str(caught.value)


def test_cells_that_fit_exactly_are_read_as_they_are() -> None:
    text = "abcd 3.4e38 inf nan 65504\n"
    dtype = _textio.parse_dtype("n:S4,x:f4,y:f4,z:f4,h:f2")
    (block,) = text_blocks(io.StringIO(text), "t", dtype, None, 0)
    assert block.dtype == dtype
    assert block["n"].tolist() == [b"abcd"]
    assert block["x"][0] == np.float32(3.4e38) and np.isinf(block["y"][0]) and np.isnan(block["z"][0])
    assert block["h"][0] == np.float16(65504)


def test_a_cut_cell_past_the_kept_lines_is_named_by_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_textio, "_RECENT_LINES", 4)  # (the lines of a block kept for messages)
    # The second block is rows 17-22: its first two lines are no longer kept when it is checked.
    text = "".join(f"r{i}\n" for i in range(20)) + "much_too_long\nr\n"
    with pytest.raises(TextFormatError, match=r"t row 21, column 1: 'much_\.\.\.' is longer than the 4"):
        list(text_blocks(io.StringIO(text), "t", np.dtype("S4"), None, 0))
