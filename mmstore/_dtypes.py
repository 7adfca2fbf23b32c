"""Dtypes in the on-disk format: their JSON form (a NumPy descr) and byte order.

A sidecar's ``dtype`` and ``byteorder`` fields (docs/FORMAT.md) are written and read
here, and so is the check that a dtype can be stored at all (raw bytes only: no Python
objects, nothing that would not round-trip exactly). The HDF5 export, the CLI and every
writer use the same functions.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from ._errors import UnsupportedDtypeError

# Anything larger cannot be mapped on a 64-bit machine anyway; the bound also
# keeps shape * itemsize arithmetic far from any overflow in NumPy.
MAX_NBYTES = 2**62


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_ENCODED_DTYPES: dict[np.dtype[Any], Any] = {}
_DTYPE_JSON_PARTS: dict[np.dtype[Any], tuple[str, str]] = {}


def _dtype_json_parts(dtype: np.dtype[Any]) -> tuple[str, str]:
    """The sidecar's ``dtype`` JSON text and ``byteorder`` (one lookup: hashing a dtype is not free)."""
    parts = _DTYPE_JSON_PARTS.get(dtype)
    if parts is None:
        parts = (json.dumps(encode_dtype(dtype), separators=(",", ":")), _byteorder_cached(dtype))
        if len(_DTYPE_JSON_PARTS) < 1024:
            _DTYPE_JSON_PARTS[dtype] = parts
    return parts


def as_dtype(obj: Any, what: str) -> np.dtype[Any]:
    """``np.dtype(obj)``, with UnsupportedDtypeError (a ValueError) naming ``what`` for anything
    NumPy does not understand as a dtype (NumPy raises TypeError for a bad dtype string)."""
    try:
        dtype: np.dtype[Any] = np.dtype(obj)
        return dtype
    except (TypeError, ValueError) as exc:
        raise UnsupportedDtypeError(f"{what}: {obj!r} is not a dtype ({exc})") from None


def encode_dtype(dtype: np.dtype[Any]) -> Any:
    """Return the JSON form of ``dtype`` (its NumPy descr), refusing what cannot round-trip."""
    try:
        return _ENCODED_DTYPES[dtype]
    except KeyError:
        pass
    except TypeError:  # an unhashable oddity: fall through to the slow path
        pass
    if dtype.hasobject or dtype.kind in "OT":
        raise UnsupportedDtypeError(
            f"dtype {dtype} holds Python objects; mmstore stores raw bytes only "
            "(use fixed-width 'S'/'U' strings or numeric fields)"
        )
    cannot = UnsupportedDtypeError(
        f"dtype {dtype} cannot be stored exactly (overlapping or reordered fields?); "
        "pack it first with numpy.lib.recfunctions.repack_fields"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns before falling back to a lossy form
        try:
            descr = npy_format.dtype_to_descr(dtype)
        except ValueError:  # fields out of order in memory: NumPy has no descr for them
            raise cannot from None
    encoded = _descr_to_json(descr)
    try:
        decoded = decode_dtype(encoded)
    except (TypeError, ValueError):  # a descr JSON cannot hold (a field title that is not a str)
        raise cannot from None
    if decoded != dtype:
        raise cannot
    if len(_ENCODED_DTYPES) < 1024:
        _ENCODED_DTYPES[dtype] = encoded
    return encoded


def _descr_to_json(descr: Any) -> Any:
    if isinstance(descr, str):
        return descr
    return [
        [list(entry[0]) if isinstance(entry[0], tuple) else entry[0], _descr_to_json(entry[1])]
        + ([list(entry[2])] if len(entry) > 2 else [])
        for entry in descr
    ]


def _descr_from_json(obj: Any) -> Any:
    """Turn the JSON form back into a NumPy descr (lists become the tuples NumPy wants)."""
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, list):
        raise ValueError(f"a dtype must be a string or a list of fields, not {type(obj).__name__}")
    fields: list[tuple[Any, ...]] = []
    for entry in obj:
        if not isinstance(entry, list) or len(entry) not in (2, 3):
            raise ValueError(f"bad field entry {entry!r}")
        name = entry[0]
        if isinstance(name, list):
            if len(name) != 2 or not all(isinstance(part, str) for part in name):
                raise ValueError(f"bad field title {name!r}")
            name = tuple(name)
        elif not isinstance(name, str):
            raise ValueError(f"bad field name {name!r}")
        sub = _descr_from_json(entry[1])
        if len(entry) == 3:
            shape = entry[2]
            if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
                raise ValueError(f"bad field shape {shape!r}")
            fields.append((name, sub, tuple(shape)))
        else:
            fields.append((name, sub))
    return fields


_DECODED_DTYPES: dict[str, np.dtype[Any]] = {}


def decode_dtype(obj: Any) -> np.dtype[Any]:
    """Parse the JSON form of a dtype; raises ValueError (callers add the dataset name)."""
    # (A list's key cannot equal a string's: the string "[]" is no dtype, the list [] is one.)
    key = obj if isinstance(obj, str) else "\0" + json.dumps(obj)
    cached = _DECODED_DTYPES.get(key)
    if cached is not None:
        return cached
    dtype = _decode_dtype(obj)
    if len(_DECODED_DTYPES) < 1024:
        _DECODED_DTYPES[key] = dtype
    return dtype


def _decode_dtype(obj: Any) -> np.dtype[Any]:
    descr = _descr_from_json(obj)
    try:
        if isinstance(descr, str):
            dtype = np.dtype(descr)  # the common case, and cheap: no warnings machinery
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                dtype = npy_format.descr_to_dtype(descr)
    except (TypeError, ValueError, KeyError, SyntaxError, Warning) as exc:
        raise ValueError(f"unknown dtype {obj!r} ({exc})") from None
    if dtype.hasobject or dtype.kind in "OT":
        raise ValueError(f"object dtype {obj!r} is not allowed")
    if dtype.itemsize > MAX_NBYTES:
        raise ValueError(f"dtype {obj!r} is too large")
    return dtype


_BYTEORDERS: dict[np.dtype[Any], str] = {}


def _byteorder_cached(dtype: np.dtype[Any]) -> str:
    order = _BYTEORDERS.get(dtype)
    if order is None:
        order = byteorder_of(dtype)
        if len(_BYTEORDERS) < 1024:
            _BYTEORDERS[dtype] = order
    return order


def byteorder_of(dtype: np.dtype[Any]) -> str:
    """'<', '>', '|' (not applicable) or 'mixed', looking through structured fields."""
    orders: set[str] = set()
    _collect_byteorders(dtype, orders)
    orders.discard("|")
    if not orders:
        return "|"
    return orders.pop() if len(orders) == 1 else "mixed"


def _collect_byteorders(dtype: np.dtype[Any], orders: set[str]) -> None:
    if dtype.fields:
        for sub, *_ in dtype.fields.values():
            _collect_byteorders(sub, orders)
    elif dtype.subdtype is not None:
        _collect_byteorders(dtype.subdtype[0], orders)
    else:
        order = dtype.byteorder
        if order == "=":
            order = "<" if np.little_endian else ">"
        orders.add(order)
