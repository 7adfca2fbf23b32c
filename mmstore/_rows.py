"""Converting a caller's values to a dataset's rows, refusing what would lose information.

Writer.append and Writer.__setitem__ (_growable.py) pass values through here, except
an ndarray already of the dataset's dtype where they can store it as it is. NumPy
converts silently where mmstore refuses: a float into an integer dtype, text into a
number, an integer that does not fit, a finite float that overflows to infinity, a
string longer than its field. Each refusal is an InvalidArgumentError naming the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ._errors import InvalidArgumentError
from ._mapping import refuse_masked

_NUMERIC_KINDS = frozenset("iufc")
# Python numbers convert through these; a float dataset at least this wide cannot overflow.
_FLOAT64 = np.dtype(np.float64)
_WIDEST_FLOAT = {"f": _FLOAT64, "c": np.dtype(np.complex128)}
_WIDEST_PYTHON_NUMBER = {"f": 8, "c": 16}  # (checked by converted(); booleans convert as NumPy does)


_INTEGER_LIMITS: dict[np.dtype[Any], tuple[int, int]] = {}


def _integer_limits(dtype: np.dtype[Any]) -> tuple[int, int]:
    """(smallest, largest) value of an integer dtype, as Python ints (np.iinfo is slow)."""
    limits = _INTEGER_LIMITS.get(dtype)
    if limits is None:
        info = np.iinfo(dtype)
        limits = _INTEGER_LIMITS[dtype] = (int(info.min), int(info.max))
    return limits


def as_rows(rows: Any, dtype: np.dtype[Any], row_shape: tuple[int, ...], name: str) -> np.ndarray:
    """``rows`` (one row, or a block of them) as a block of rows for Writer.append."""
    block = converted(rows, dtype, name, "append rows")
    if block.shape == row_shape and (row_shape or block.ndim == 0):
        return block.reshape((1, *row_shape))
    if block.shape[1:] != row_shape or block.ndim == 0:
        raise InvalidArgumentError(
            f"rows of shape {block.shape} do not fit dataset {name!r} with rows of shape {row_shape}"
        )
    return block


def converted(values: Any, target: np.dtype[Any], name: str, what: str) -> np.ndarray:
    """``values`` as an array that converts to the dataset's dtype without losing
    anything NumPy would drop silently: no float to integer, no text to number,
    integers only if every value fits, floats only if no finite value overflows to
    infinity, text only if no string is longer than the field (InvalidArgumentError
    otherwise)."""
    kind = target.kind
    value_type = type(values)
    if value_type is int and kind in "iu":  # one Python int: the commonest edit, checked cheaply
        low, high = _integer_limits(target)
        if not low <= values <= high:
            raise InvalidArgumentError(
                f"cannot {what} in dataset {name!r}: {values} does not fit its dtype {target} ({low} to {high})"
            )
        return np.asarray(values, target)
    if (value_type is float or value_type is int) and kind in "fc":
        if target.itemsize >= _WIDEST_PYTHON_NUMBER[kind]:  # holds any Python float: cannot overflow
            return _parsed(values, target, target, name)
        block = _parsed(values, _FLOAT64 if value_type is float else _WIDEST_FLOAT[kind], target, name)  # checked below
    elif isinstance(values, np.ndarray):
        refuse_masked(values)
        block = values
    elif target.names is not None:
        if not isinstance(values, (tuple, list, np.void)):
            raise InvalidArgumentError(
                f"cannot {what} of a {type(values).__name__} in dataset {name!r} of record dtype {target}: "
                "give a tuple per row or an array of that dtype"
            )
        # A record (np.void) keeps its own fields, which are checked below: converted, its
        # fields would be taken by position.
        if isinstance(values, np.void):
            block = np.asarray(values)
        elif _plain_record(values, target):  # one row whose cells plainly fit: a producer's usual append
            return _parsed(values, target, target, name)
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # (overflows are refused just below)
                block = _parsed(values, target, target, name)
            _check_record_values(values, block.ndim, target, name, what)
            return block
    elif kind in _NUMERIC_KINDS:
        block = _parsed(values, None, target, name)  # its own dtype first: checked below
        if block.dtype.kind == "O" and kind in "fc":
            # Python ints past 64 bits, Decimal, Fraction, None (NaN): NumPy converts them
            # (into the widest float first: one that overflows a narrower one is checked below).
            block = _parsed(
                values,
                target if target.itemsize >= _WIDEST_PYTHON_NUMBER[kind] else _WIDEST_FLOAT[kind],
                target,
                name,
            )
    elif kind in "SU":
        # Text: its own dtype first, since NumPy cuts a longer string to the field's
        # width as it converts; then converted as before (str into bytes fields, say).
        block = _parsed(values, None, target, name)
        if block.dtype.kind in "SU":
            _check_text_fits(block, target, name, what)
        block = _parsed(block if block.dtype.kind in "SU" else values, target, target, name)
    else:  # booleans (from any truth value, as NumPy does), dates, times and text (parsed)
        block = _parsed(values, target, target, name)
    source = block.dtype
    if source == target:
        return block
    if source.names is not None or target.names is not None:
        if source.names != target.names or not np.can_cast(source, target, "same_kind"):
            # (records match by field name, not position)
            raise InvalidArgumentError(f"cannot {what} of dtype {source} in dataset {name!r} of dtype {target}")
        for field in target.names or ():  # narrowed fields: only values that fit
            into, come_from = target.fields[field][0], source.fields[field][0]  # type: ignore[index]
            if come_from.kind in "biu" and into.kind in "iu" and not np.can_cast(come_from, into, "safe"):
                _check_fits(block[field], into, name, f"{what} (field {field!r})")
            else:
                _check_narrowed(block[field], into, name, f"{what} (field {field!r})")
        return block
    if source.kind in "biu" and kind in "iu" and not np.can_cast(source, target, "safe"):
        _check_fits(block, target, name, what)
        return block
    if not np.can_cast(source, target, "same_kind"):
        raise InvalidArgumentError(
            f"cannot {what} of dtype {source} in dataset {name!r} of dtype {target} "
            "(it would lose information; convert explicitly first)"
        )
    if kind in "fcSU":
        _check_narrowed(block, target, name, what)
    return block


def check_spread(value: Any, target: np.dtype[Any], name: str, what: str) -> None:
    """InvalidArgumentError unless ``value`` (one scalar, which NumPy stores into every
    field of a record) converts to each field of ``target`` without loss."""
    if target.names is None:
        converted(value, target.base, name, what)
        return
    for field in target.names:
        check_spread(value, target.fields[field][0], name, f"{what} (field {field!r})")  # type: ignore[index]


def _check_record_values(values: Any, depth: int, target: np.dtype[Any], name: str, what: str) -> None:
    """InvalidArgumentError unless every record in ``values`` (tuples, records or scalars
    nested ``depth`` sequences deep, which NumPy converts field by field, silently cutting
    floats to integers, text to its width and finite floats to infinity) converts without
    loss: each field's values pass the checks converted() makes of plain values."""
    names = target.names or ()
    records = values if depth == 1 and type(values) is list else list(_nested_records(values, depth))
    if not records:
        return
    if all(type(record) is tuple for record in records):  # (NumPy refused tuples of another length)
        for field, cells in zip(names, zip(*records, strict=True), strict=True):
            into = target.fields[field][0]  # type: ignore[index]
            converted(list(cells), into.base, name, f"{what} (field {field!r})")  # (a tuple would be one record)
        return
    for position, field in enumerate(names):
        into = target.fields[field][0]  # type: ignore[index]
        column: list[Any] = []
        for record in records:
            if isinstance(record, np.void) and record.dtype.names is not None:
                if record.dtype.names != target.names:
                    raise InvalidArgumentError(
                        f"cannot {what} with fields {record.dtype.names} in dataset {name!r} with fields "
                        f"{target.names} (records match by field name, in order)"
                    )
                column.append(record[field])
            elif isinstance(record, (tuple, np.void)):
                column.append(record[position])
            else:  # a scalar spread over every field
                column.append(record)
        if column:
            converted(column, into.base, name, f"{what} (field {field!r})")


def _plain_record(values: Any, target: np.dtype[Any]) -> bool:
    """True if ``values`` is one record, a tuple of Python numbers and strings that plainly
    fit their fields: checked here in about a microsecond, where converted() would take
    several per field (a producer appending tuples one at a time pays it on every row).
    False leaves the decision to the full checks."""
    if type(values) is not tuple:
        return False
    rules = _PLAIN_RULES.get(target)
    if rules is None:
        rules = _PLAIN_RULES[target] = _plain_rules(target)
    if len(values) != len(rules):
        return False
    for cell, (kind, low, high) in zip(values, rules, strict=True):
        cell_type = type(cell)
        if cell_type is int:
            fits = kind in ("i", "u", "f", "c") and low <= cell <= high
        elif cell_type is float:
            fits = kind in ("f", "c") and (cell != cell or low <= cell <= high)  # (NaN converts; infinity: full checks)
        elif cell_type is bytes:
            fits = kind == "S" and len(cell) <= high
        elif cell_type is str:
            fits = kind == "U" and len(cell) <= high
        else:
            fits = cell_type is bool and kind == "b"
        if not fits:
            return False
    return True


_PLAIN_RULES: dict[np.dtype[Any], tuple[tuple[str, Any, Any], ...]] = {}


def _plain_rules(target: np.dtype[Any]) -> tuple[tuple[str, Any, Any], ...]:
    """(kind, lowest, highest value or length) of each field of ``target``, for _plain_record;
    kind "" for a field it leaves to the full checks (sub-arrays, records, dates ...)."""
    rules: list[tuple[str, Any, Any]] = []
    for field in target.names or ():
        into = target.fields[field][0]  # type: ignore[index]
        kind = into.kind if into.subdtype is None and into.names is None else ""
        if kind in ("i", "u"):
            rules.append((kind, *_integer_limits(into)))
        elif kind in ("f", "c"):
            largest = float(np.finfo(into).max)
            rules.append((kind, -largest, largest))
        elif kind in ("S", "U"):
            rules.append((kind, 0, into.itemsize // (4 if kind == "U" else 1)))
        else:
            rules.append((kind if kind == "b" else "", 0, 0))
    return tuple(rules)


def _nested_records(values: Any, depth: int) -> Iterator[Any]:
    """The items ``depth`` sequences deep in ``values``: its records, as NumPy reads them."""
    if depth == 0:
        yield values
        return
    for item in values:
        yield from _nested_records(item, depth - 1)


def _check_narrowed(values: np.ndarray, target: np.dtype[Any], name: str, what: str) -> None:
    """InvalidArgumentError if converting ``values`` (a convertible dtype) to ``target``
    overflows a finite number to infinity or cuts a string short."""
    source = values.dtype
    if np.can_cast(source, target, "safe"):
        return
    if target.kind in "fc" and source.kind in "iufc":
        with np.errstate(over="ignore", invalid="ignore"):
            overflowed = np.isinf(values.astype(target)) & np.isfinite(values)
        if overflowed.any():
            raise InvalidArgumentError(
                f"cannot {what} in dataset {name!r}: {values[overflowed].flat[0]} overflows its dtype "
                f"{target} (largest {np.finfo(target).max})"
            )
    elif target.kind in "SU" and source.kind in "SU":
        _check_text_fits(values, target, name, what)


def _check_text_fits(values: np.ndarray, target: np.dtype[Any], name: str, what: str) -> None:
    """InvalidArgumentError if a string in ``values`` is longer than ``target``'s field."""
    width = target.itemsize // (4 if target.kind == "U" else 1)
    if values.dtype.itemsize // (4 if values.dtype.kind == "U" else 1) <= width or not values.size:
        return
    longest = int(np.char.str_len(values).max())
    if longest > width:
        raise InvalidArgumentError(
            f"cannot {what} in dataset {name!r}: a string of {longest} characters does not fit its "
            f"dtype {target} ({width} at most)"
        )


def _check_fits(values: np.ndarray, target: np.dtype[Any], name: str, what: str) -> None:
    """InvalidArgumentError unless every integer in ``values`` fits ``target``."""
    low, high = _integer_limits(target)
    if values.size and (values.min() < low or values.max() > high):
        raise InvalidArgumentError(
            f"cannot {what} in dataset {name!r}: values from {values.min()} to {values.max()} "
            f"do not fit its dtype {target} ({low} to {high})"
        )


def _parsed(values: Any, dtype: np.dtype[Any] | None, dataset_dtype: np.dtype[Any], name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        shown = dataset_dtype if dtype is None else dtype
        raise InvalidArgumentError(f"cannot convert values to dataset {name!r}'s dtype {shown}: {exc}") from None
