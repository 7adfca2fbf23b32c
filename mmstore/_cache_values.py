"""How the cache lays out a value: one array entry, a JSON scalar in an empty entry's
attrs, or an empty marker entry whose attrs list a tuple/list/dict result's items and
the parts (arrays, written before the marker) they are made of."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _mapping
from ._errors import ArgumentTypeError, FormatError

_SCALAR_KINDS = (bool, int, float, str, type(None))


def _fresh(value: Any) -> Any:
    """A value to hand out: new views and containers, so no caller can disturb another's."""
    if isinstance(value, np.ndarray):
        return value[...]
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _split(value: Any) -> tuple[str, list[np.ndarray], dict[str, Any]]:
    """(kind, arrays, extra attrs) of a value to cache."""
    _mapping.refuse_masked(value)
    if isinstance(value, np.ndarray):
        return "array", [value], {}
    if isinstance(value, np.generic):
        return "scalar", [np.asarray(value)], {}
    if isinstance(value, float) and not math.isfinite(value):
        return "float", [np.asarray(value, np.float64)], {}  # (strict JSON has no NaN or infinity)
    if isinstance(value, _SCALAR_KINDS):
        return "json", [], {"value": value}
    if isinstance(value, (tuple, list)):
        arrays, items = _split_items(value)
        return ("tuple" if isinstance(value, tuple) else "list"), arrays, {"items": items}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        arrays, items = _split_items(value.values())
        return "dict", arrays, {"keys": list(value), "items": items}
    raise ArgumentTypeError(
        f"cannot cache a {type(value).__qualname__}: use an array, a scalar, or a tuple/list/dict (str keys) of them"
    )


def _split_items(values: Any) -> tuple[list[np.ndarray], list[Any]]:
    """(parts, items) of a tuple/list/dict result's values. An item is "a" (an array part),
    "n" (a NumPy scalar, a 0-d part), "f" (a Python float JSON cannot hold, a 0-d part) or
    [value] (a Python bool, int, float, str or None, kept in the attrs): each comes back
    as the type it went in as."""
    parts: list[np.ndarray] = []
    items: list[Any] = []
    for item in values:
        if isinstance(item, np.ndarray):
            parts.append(item)
            items.append("a")
        elif isinstance(item, np.generic):
            parts.append(np.asarray(item))
            items.append("n")
        elif isinstance(item, float) and not math.isfinite(item):
            parts.append(np.asarray(item, np.float64))
            items.append("f")
        elif item is None or isinstance(item, (bool, str)):
            items.append([item if item is None or type(item) in (bool, str) else str(item)])
        elif isinstance(item, int):
            items.append([int(item)])
        elif isinstance(item, float):
            items.append([float(item)])
        else:
            raise ArgumentTypeError(
                f"cannot cache a {type(item).__qualname__} inside a result: use arrays, numbers, str or None"
            )
    return parts, items


def _items_of(items: list[Any], parts: list[Any]) -> list[Any]:
    """The values of a tuple/list/dict result from its items and parts (see _split_items)."""
    values: list[Any] = []
    next_part = iter(parts).__next__
    for item in items:
        if isinstance(item, list):
            values.append(item[0])
        elif item == "a":
            values.append(next_part())
        elif item == "n":
            values.append(next_part()[()])
        elif item == "f":
            values.append(float(next_part()[()]))
        else:
            raise FormatError(f"cache entry with an item of unknown kind {item!r}")
    return values
