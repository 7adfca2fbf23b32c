"""Converting a caller's values to a dataset's rows, refusing what would lose information.

Writer.append and Writer.__setitem__ (_growable.py) pass values through here, except
an ndarray already of the dataset's dtype where they can store it as it is. NumPy
converts silently where mmstore refuses: a float into an integer dtype, text into a
number, an integer that does not fit, a finite float that overflows to infinity, a
string longer than its field. Each refusal is an InvalidArgumentError naming the dataset.
"""

from __future__ import annotations

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
        block = np.asarray(values) if isinstance(values, np.void) else _parsed(values, target, target, name)
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
