"""Cache keys: stable digests of function identities and arguments.

A key must be the same in every process and every run for the same call, and
different for different calls, so arguments are encoded canonically (a type
tag, then the value) and hashed with BLAKE2b. NumPy arrays are keyed by dtype,
shape and content, never by identity (``np.memmap`` too; other ndarray subclasses,
such as masked arrays, carry more than their data and are refused). Anything else that has no canonical
encoding is refused with a clear error (pass ``key=`` to memoize instead):
keying by ``repr`` would silently break on objects whose repr has an address.

A memoized call is keyed by its arguments bound to the function's signature, with
defaults applied: ``f(x)``, ``f(x, 3)`` and ``f(x, k=3)`` (3 being ``k``'s default) are
one call. Bound arguments are positional values and keyword values; a call with
keyword values is digested apart (``kw:`` before the digest of both), so no call
made with keywords can share a key with one made without: ``f(1, 2, k=3)`` and
``f((1, 2), {"k": 3})`` differ. A call passing every argument by position keeps
the key it always had (the digest of the argument tuple).
"""

from __future__ import annotations

import hashlib
import inspect
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from ._errors import ArgumentTypeError

_DIGEST_BYTES = 16


class UnhashableArgument(ArgumentTypeError):
    """An argument with no canonical encoding for a cache key."""


def digest(value: Any) -> str:
    """A hex digest of ``value``'s canonical encoding."""
    hasher = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    _feed(hasher, value, ())
    return hasher.hexdigest()


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def call_digester(function: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], str]:
    """A function of a call's ``(args, kwargs)`` giving its digest (see the module docstring);
    the signature is looked at once, here, and a call by position only binds by hand."""
    try:
        signature = inspect.signature(function, follow_wrapped=False)  # (a wrapper may change defaults)
    except (TypeError, ValueError):  # (no signature to bind to: key the call as made)
        signature = None
    parameters = list(signature.parameters.values()) if signature is not None else []
    # A default with no canonical value (a sentinel object, say) cannot be keyed: such a
    # function's calls are bound without defaults (a call that passes it fails anyway).
    apply_defaults = all(p.default is p.empty or _keyable(p.default) for p in parameters)
    simple = signature is not None and all(p.kind in _POSITIONAL for p in parameters)
    defaults = tuple(p.default for p in parameters)
    required = sum(p.default is p.empty for p in parameters)
    count = len(parameters)

    def call_digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if not kwargs and simple and required <= len(args) <= count:  # the common case, ~0.3 us
            return digest(args + defaults[len(args) :] if apply_defaults else args)
        if signature is None:
            return digest(args) if not kwargs else "kw:" + digest((args, kwargs))
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # a call the function will refuse: keyed apart from every valid one
            return "raw:" + digest((args, kwargs))
        if apply_defaults:
            bound.apply_defaults()
        keywords = bound.kwargs
        return digest(bound.args) if not keywords else "kw:" + digest((bound.args, keywords))

    return call_digest


def _keyable(value: Any) -> bool:
    try:
        digest(value)
    except ArgumentTypeError:
        return False
    return True


_PACK_Q = struct.Struct("<Q").pack
_PACK_D = struct.Struct("<d").pack
_ARRAY_HEADERS: dict[tuple[np.dtype[Any], tuple[int, ...]], bytes] = {}


def _feed(hasher: Any, value: Any, where: tuple[Any, ...]) -> None:
    kind = type(value)
    # Exact-type dispatch first: memoized calls go through here on every hit.
    if kind is np.ndarray:
        _feed_array(hasher, value, where)
    elif kind is tuple or kind is list:
        hasher.update((b"t" if kind is tuple else b"l") + _PACK_Q(len(value)))
        for index, item in enumerate(value):
            _feed(hasher, item, (*where, index))
    elif kind is str:
        data = value.encode("utf-8", "surrogatepass")
        hasher.update(b"s" + _PACK_Q(len(data)) + data)
    elif kind is int:
        text = str(value).encode()
        hasher.update(b"i" + _PACK_Q(len(text)) + text)
    elif kind is float:
        hasher.update(b"f" + _PACK_D(value) if value == value else b"fnan")
    elif value is None:
        hasher.update(b"N")
    elif kind is bool:
        hasher.update(b"T" if value else b"F")
    else:
        _feed_other(hasher, value, where)


def _feed_other(hasher: Any, value: Any, where: tuple[Any, ...]) -> None:
    update = hasher.update
    if isinstance(value, bool):
        update(b"T" if value else b"F")
    elif isinstance(value, np.ndarray):
        if not isinstance(value, np.memmap):
            # A subclass may hold what its data does not (a masked array's mask, a
            # matrix's meaning of *, a unit): keyed by its data alone, it would share a
            # key with a plain array, or another mask, and hit the other's result.
            raise UnhashableArgument(
                f"cannot make a cache key from {_describe(where)}: a {type(value).__qualname__} (an ndarray "
                "subclass, keyed by more than its data); pass np.asarray() of it, or key= to memoize"
            )
        _feed_array(hasher, value, where)
    elif isinstance(value, np.generic):
        _feed_array(hasher, np.asarray(value), where)
    elif isinstance(value, int):
        _feed(hasher, int(value), where)
    elif isinstance(value, float):
        _feed(hasher, float(value), where)
    elif isinstance(value, str):
        _feed(hasher, str(value), where)
    elif isinstance(value, bytes):
        update(b"b" + _PACK_Q(len(value)) + bytes(value))
    elif isinstance(value, (tuple, list)):
        _feed(hasher, tuple(value) if isinstance(value, tuple) else list(value), where)
    elif isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: digest(item[0]))
        update(b"d" + _PACK_Q(len(items)))
        for key, item in items:
            _feed(hasher, key, (*where, "key"))
            _feed(hasher, item, (*where, key))
    elif isinstance(value, (frozenset, set)):
        members = sorted(digest(member) for member in value)
        update(b"S" + _PACK_Q(len(members)) + "".join(members).encode())
    else:
        raise UnhashableArgument(
            f"cannot make a cache key from {_describe(where)} of type {type(value).__qualname__}; "
            "use numbers, strings, bytes, NumPy arrays, or tuples/lists/dicts of them, or pass key= to memoize"
        )


def _feed_array(hasher: Any, array: np.ndarray, where: tuple[Any, ...]) -> None:
    header = _ARRAY_HEADERS.get((array.dtype, array.shape))
    if header is None:
        if array.dtype.hasobject:
            raise UnhashableArgument(f"cannot make a cache key from {_describe(where)}: an object array")
        text = f"{_dtype_text(array.dtype)}|{array.shape}".encode()
        header = b"a" + _PACK_Q(len(text)) + text
        if len(_ARRAY_HEADERS) < 4096:
            _ARRAY_HEADERS[(array.dtype, array.shape)] = header
    # The content goes in as a fast 128-bit XXH3 of the C-order bytes: BLAKE2b runs at
    # ~1 GB/s, XXH3 at ~9, and a memoized call on a 100 MiB argument should not crawl.
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    hasher.update(header + xxhash.xxh3_128_digest(array))  # type: ignore[arg-type]  # an array is a buffer


def _dtype_text(dtype: np.dtype[Any]) -> str:
    """A canonical text of a dtype: its ``str``, a record's ``descr``, or, for a record that
    has no descr (fields out of order in memory, or overlapping), every field's name,
    dtype, offset and title and the itemsize, in braces (a descr text starts with '[')."""
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return f"({_dtype_text(base)},{shape})"
    if not dtype.fields:
        return dtype.str
    try:
        return str(dtype.descr)
    except ValueError:  # "dtype.descr is not defined for types with overlapping or out-of-order fields"
        pass
    fields = ",".join(
        f"{name!r}:{_dtype_text(field[0])}@{field[1]}{'' if len(field) < 3 else f'#{field[2]!r}'}"
        for name, field in dtype.fields.items()
    )
    return f"{{{fields};{dtype.itemsize}}}"


def _describe(where: tuple[Any, ...]) -> str:
    """Where in the arguments a value sits: ``argument[0]['k']``."""
    return "argument" + "".join(f"[{step!r}]" for step in where)
