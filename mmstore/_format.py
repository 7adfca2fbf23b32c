"""The on-disk format: constants, the header type, and parse/validate functions.

This module is the only place that knows what a sidecar or the manifest looks
like; docs/FORMAT.md is the byte-level spec it implements. Every parse error is
a FormatError that names the dataset, so one corrupt dataset never hides the
others.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import zlib
from typing import Any, NamedTuple

import numpy as np

from ._dtypes import MAX_NBYTES, _byteorder_cached, _dtype_json_parts, _is_count, decode_dtype
from ._errors import FormatError, InvalidArgumentError

FORMAT_VERSION = 1
# A sidecar of a packed generation says version 2 (and only such a sidecar does), so that
# a reader that predates packing refuses it with "upgrade mmstore" instead of a size error.
PACKED_FORMAT_VERSION = 2
MANIFEST_NAME = "mmstore.json"
MANIFEST_FORMAT = "mmstore"
DATASET_FORMAT = "mmstore-dataset"
CHECKSUM_ALGORITHM = "crc32"  # growable datasets' control block, and accepted in sidecars
XXH3_ALGORITHM = "xxh3_64"  # what put writes: xxHash XXH3 64-bit, seed 0, 16 hex digits
_CHECKSUM_RE = re.compile(r"crc32:[0-9a-f]{8}|xxh3_64:[0-9a-f]{16}")  # (fullmatch: "$" allows a "\n")

MAX_SIDECAR_BYTES = 64 * 2**20
# A packed data file holds successive generations of one small dataset, each
# starting on this boundary (docs/FORMAT.md, "Packed data files"); a packed
# generation is at most PACKED_MAX_NBYTES, so checking its checksum whenever it
# is mapped costs a few microseconds.
PACKED_ALIGNMENT = 64
PACKED_MAX_NBYTES = 2**20
MAX_NDIM = 64

_HEADER_KEYS = frozenset(
    {
        "format", "version", "name", "dtype", "shape", "byteorder", "data_file",
        "offset", "generation", "growable", "checksum", "attrs", "created", "modified",
    }
)  # fmt: skip


class Header(NamedTuple):
    """A parsed, validated dataset sidecar (see docs/FORMAT.md). Immutable.

    A NamedTuple rather than a frozen dataclass: it is built on every first
    get of a dataset, and a frozen dataclass's __init__ costs ~10x more.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    data_file: str
    offset: int
    generation: int
    created: float
    modified: float
    attrs: dict[str, Any]
    checksum: str | None = None
    growable: bool = False
    packed: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def to_json(self) -> bytes:
        """The sidecar bytes: one line of JSON (written by hand: this is on every commit's path)."""
        attrs = json.dumps(self.attrs, separators=(",", ":"), allow_nan=False) if self.attrs else "{}"
        checksum = "null" if self.checksum is None else f'"{self.checksum}"'
        dtype_text, byteorder = _dtype_json_parts(self.dtype)
        return (
            f'{{"format":"{DATASET_FORMAT}","version":{PACKED_FORMAT_VERSION if self.packed else FORMAT_VERSION},'
            f'"name":{_json_string(self.name)},'
            f'"dtype":{dtype_text},"shape":[{",".join(map(str, self.shape))}],'
            f'"byteorder":"{byteorder}","data_file":{_json_string(self.data_file)},'
            f'"offset":{self.offset},"generation":{self.generation},'
            f'"growable":{"true" if self.growable else "false"},"checksum":{checksum},"attrs":{attrs},'
            f'"created":{time_text(self.created)},"modified":{time_text(self.modified)}'
            f"{_PACKED_FIELD if self.packed else ''}}}\n"
        ).encode()


def successor_header(
    old: Header | None,
    *,
    name: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    data_file: str,
    offset: int,
    attrs: dict[str, Any],
    checksum: str | None,
    growable: bool = False,
    packed: bool = False,
) -> Header:
    """The header of the generation that replaces ``old`` (or of generation 1 if there is
    none): the next generation number, ``old``'s creation time, modified now. (Built as a
    tuple: this is on every commit's path, and Header(**fields) merges dicts first.)"""
    now = timestamp_now()
    generation, created = (1, now) if old is None else (old.generation + 1, old.created)
    return _new_tuple(
        Header, (name, dtype, shape, data_file, offset, generation, created, now, attrs, checksum, growable, packed)
    )


# --- timestamps ---------------------------------------------------------------

# The sidecar text of timestamps seen lately. A float's shortest repr() costs ~6,500
# instructions (most of a commit's JSON), and a commit writes two: its own time, made
# here from whole microseconds with integer formatting, and its dataset's creation
# time, usually the same float as at the dataset's previous commit.
_TIME_TEXTS: dict[float, str] = {}
_TIME_TEXTS_LIMIT = 4096


def timestamp_now() -> float:
    """time.time() to the microsecond. The float is the double nearest to its decimal text
    (an exact integer over 10**6: IEEE division rounds correctly), so a reader parsing
    the text gets this very float."""
    micros = time.time_ns() // 1000
    seconds = micros / 1e6
    if micros >= 1_000_000:  # (always, on a clock set after 1970)
        digits = str(micros)
        text = f"{digits[:-6]}.{digits[-6:]}"
    else:
        whole, fraction = divmod(abs(micros), 1_000_000)
        text = f"{'-' if micros < 0 else ''}{whole}.{fraction:06d}"
    _remember_time_text(seconds, text)
    return seconds


def time_text(seconds: float) -> str:
    """A timestamp's JSON text: any text that parses back to the same float."""
    text = _TIME_TEXTS.get(seconds)
    if text is None:
        text = repr(float(seconds))
        _remember_time_text(seconds, text)
    return text


def _remember_time_text(seconds: float, text: str) -> None:
    if len(_TIME_TEXTS) >= _TIME_TEXTS_LIMIT:
        _TIME_TEXTS.clear()  # (the next commit of each dataset formats its creation time once more)
    _TIME_TEXTS[seconds] = text


# --- sidecar text -------------------------------------------------------------

_PACKED_FIELD = ',"packed":true'  # written only when true: absent means false
# json.dumps(text) without its Python-level dispatch (~1 us each on the commit path)
_json_string = json.encoder.encode_basestring_ascii


# --- checksums ----------------------------------------------------------------


def format_checksum(crc: int) -> str:
    return f"{CHECKSUM_ALGORITHM}:{crc & 0xFFFFFFFF:08x}"


def crc32_update(crc: int, data: Any) -> int:
    return zlib.crc32(data, crc)


# --- parsing ------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _double_range_int(text: str) -> int:
    value = int(text)
    if not -_DOUBLE_MAX <= value <= _DOUBLE_MAX:  # (exact: an int compares with a float by value)
        raise ValueError(f"integer {text[:20]}... is beyond a double's range")
    return value


_DOUBLE_MAX = sys.float_info.max

# Sidecars are strict JSON: Python's json module also takes NaN, Infinity and numbers that
# overflow to inf, which Header.to_json (allow_nan=False) could then not write back, and
# integers of any size, which a reader that holds numbers as doubles (C, JavaScript) reads
# as infinity.
_decode_json = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_double_range_int
).decode


# The sidecar exactly as Header.to_json writes it, for plain names, file names and simple
# dtypes: one C-level match checks the layout and most field rules (JSON integer and
# number syntax, sizes bounded by digit counts, the checksum form), so parse_header skips
# json.loads and most of its per-field checks on what mmstore itself wrote. Anything else
# (escapes, non-ASCII, whitespace, structured dtypes, another key order, errors) takes
# the full path, which also gives every error message. (The attrs object: "{}", or else the
# longest run that leaves the fixed-form fields after it, which can match in one place only;
# the JSON decoder checks it. A lazy match would retry those fields at every byte.)
_PLAIN = rb'[^"\\\x00-\x1f\x7f-\xff]'  # a printable ASCII string character that needs no escape
_FILE = rb'[^"\\/\x00-\x1f\x7f-\xff]'  # ... and is not a slash
_COUNT = rb"(?:0|[1-9][0-9]{0,17})"  # < 10**18 < MAX_NBYTES
_TIME = rb"(-?(?:0|[1-9][0-9]{0,19})\.[0-9]{1,20})"  # a finite float, as repr() writes one
_CANONICAL_SIDECAR = re.compile(
    b",".join(
        [
            rb'\{"format":"mmstore-dataset"',
            rb'"version":([12])',
            rb'"name":"' + _PLAIN + rb'*"',
            rb'"dtype":"(' + _PLAIN + rb'+)"',
            rb'"shape":\[((?:' + _COUNT + rb"(?:," + _COUNT + rb"){0,%d})?)\]" % (MAX_NDIM - 1),
            rb'"byteorder":"([<>|]|mixed)"',
            rb'"data_file":"((?!\.)' + _FILE + rb'+)"',
            rb'"offset":(' + _COUNT + rb")",
            rb'"generation":((?!0)' + _COUNT + rb")",
            rb'"growable":(true|false)',
            rb'"checksum":(null|"(?:' + _CHECKSUM_RE.pattern.encode() + rb')")',
            rb'"attrs":(\{\}|\{.*\})',
            rb'"created":' + _TIME,
            rb'"modified":' + _TIME + rb'(,"packed":true)?\}\n?',
        ]
    ),
    re.DOTALL,
)


def _packed_problem(version: object, packed: bool, growable: bool, offset: int, nbytes: int) -> str | None:
    """What is wrong with a header's packing (docs/FORMAT.md, "Packed data files"), or None."""
    if packed != (version == PACKED_FORMAT_VERSION):
        return f"format version {version} with packed={packed} (version 2 is for packed generations only)"
    if packed:
        if growable:
            return "a growable dataset cannot be packed"
        if offset % PACKED_ALIGNMENT:
            return f"offset {offset} of a packed generation is not a multiple of {PACKED_ALIGNMENT}"
        if nbytes > PACKED_MAX_NBYTES:
            return f"a packed generation holds at most {PACKED_MAX_NBYTES} bytes"
    return None


_new_tuple = tuple.__new__  # Header's own __new__ is Python code around this call
# A sidecar's dtype text -> (dtype, its byteorder field), for _parse_canonical: one lookup.
_SIMPLE_DTYPES: dict[bytes, tuple[np.dtype[Any], bytes]] = {}


def _simple_dtype(text: bytes) -> tuple[np.dtype[Any], bytes]:
    """The dtype a sidecar's simple ``dtype`` string names, and its byteorder (ValueError if none)."""
    dtype = decode_dtype(text.decode())
    known = (dtype, _byteorder_cached(dtype).encode())
    if len(_SIMPLE_DTYPES) < 1024:
        _SIMPLE_DTYPES[text] = known
    return known


def _parse_canonical(name: str, raw: bytes) -> Header | None:
    """The header of a sidecar in the form mmstore writes, or None if ``raw`` is not in
    that form or breaks a rule (parse_header's full path then says which)."""
    match = _CANONICAL_SIDECAR.fullmatch(raw)
    if match is None:
        return None
    (
        version, dtype_text, shape_text, byteorder, data_file, offset, generation, growable, checksum,
        attrs_text, created, modified, packed,
    ) = match.groups()  # fmt: skip
    try:
        dtype, dtype_byteorder = _SIMPLE_DTYPES.get(dtype_text) or _simple_dtype(dtype_text)
        attrs = {} if attrs_text == b"{}" else _decode_json(attrs_text.decode("utf-8"))
    except (ValueError, RecursionError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        return None
    if shape_text.isdigit():  # one dimension (cheaper than `b"," in`, which tries an int first)
        shape: tuple[int, ...] = (int(shape_text),)
    else:
        shape = tuple(map(int, shape_text.split(b","))) if shape_text else ()
    is_growable = growable == b"true"
    is_packed = packed is not None
    start = int(offset)
    count = math.prod(shape)
    if (
        type(attrs) is not dict
        or (version == b"2") != is_packed
        or byteorder != dtype_byteorder
        or count * max(dtype.itemsize, 1) > MAX_NBYTES
        or (is_growable and not shape)
        or (
            (is_packed or version == b"2")
            and _packed_problem(int(version), is_packed, is_growable, start, count * dtype.itemsize)
        )
    ):
        return None
    return _new_tuple(Header, (
        name, dtype, shape, data_file.decode(), start, int(generation), float(created), float(modified),
        attrs, None if checksum == b"null" else checksum[1:-1].decode(), is_growable, is_packed,
    ))  # fmt: skip


def parse_header(name: str, raw: bytes) -> Header:
    """Parse and validate a sidecar; every problem is a FormatError naming ``name``."""
    if len(raw) <= MAX_SIDECAR_BYTES:
        header = _parse_canonical(name, raw)
        if header is not None:
            return header
    return _parse_any(name, raw)


def _parse_any(name: str, raw: bytes) -> Header:
    """parse_header for any sidecar: json.loads, then every field checked, saying what is wrong."""

    def bad(problem: str) -> FormatError:
        return FormatError(f"dataset {name!r}: corrupt header: {problem}")

    if len(raw) > MAX_SIDECAR_BYTES:
        raise bad(f"sidecar is larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        # Decoded here rather than by json.loads(bytes), which guesses among UTF-8/16/32
        # in Python code on every call: sidecars are UTF-8 (docs/FORMAT.md).
        record = _decode_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise bad("not a JSON object")
    if record.get("format") != DATASET_FORMAT:
        raise bad(f"format is {record.get('format')!r}, expected {DATASET_FORMAT!r}")
    version = record.get("version")
    if not (type(version) is int and 1 <= version <= PACKED_FORMAT_VERSION):
        _check_version(version, f"dataset {name!r}", PACKED_FORMAT_VERSION)  # raises, saying why
    if not record.keys() >= _HEADER_KEYS:
        missing = _HEADER_KEYS - record.keys()
        raise bad(f"missing field(s) {', '.join(sorted(missing))}")
    try:
        dtype = decode_dtype(record["dtype"])
    except (ValueError, RecursionError) as exc:
        raise bad(str(exc)) from None
    shape = record["shape"]
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if len(shape) > MAX_NDIM:
        raise bad(f"shape has {len(shape)} dimensions (at most {MAX_NDIM})")
    if math.prod(shape) * max(dtype.itemsize, 1) > MAX_NBYTES:
        raise bad(f"shape {shape} of {dtype} is too large to map")
    if record["byteorder"] != _byteorder_cached(dtype):
        raise bad(f"byteorder {record['byteorder']!r} does not match dtype {dtype}")
    data_file = record["data_file"]
    if (
        not isinstance(data_file, str)
        or not data_file
        or "/" in data_file
        or "\0" in data_file
        or data_file.startswith(".")
    ):
        raise bad(f"data_file {data_file!r} is not a plain file name inside the store")
    offset = record["offset"]
    if not _is_count(offset) or offset > MAX_NBYTES:
        raise bad(f"offset {offset!r} is not a valid byte offset")
    generation = record["generation"]
    if not _is_count(generation) or generation < 1:
        raise bad(f"generation {generation!r} is not a positive integer")
    growable = record["growable"]
    if not isinstance(growable, bool):
        raise bad(f"growable {growable!r} is not a boolean")
    if growable and not shape:
        raise bad("a growable dataset needs at least one dimension")
    packed = record.get("packed", False)
    if not isinstance(packed, bool):
        raise bad(f"packed {packed!r} is not a boolean")
    problem = _packed_problem(version, packed, growable, offset, math.prod(shape) * dtype.itemsize)
    if problem is not None:
        raise bad(problem)
    checksum = record["checksum"]
    if checksum is not None and not (isinstance(checksum, str) and _CHECKSUM_RE.fullmatch(checksum)):
        raise bad(f"checksum {checksum!r} is not of the form 'xxh3_64:<16 hex>' or 'crc32:<8 hex>'")
    attrs = record["attrs"]
    if not isinstance(attrs, dict):
        raise bad("attrs is not a JSON object")
    created, modified = record["created"], record["modified"]
    if not _is_number(created) or not _is_number(modified):
        raise bad("created/modified are not timestamps")
    recorded_name = record["name"]
    if not isinstance(recorded_name, str):
        raise bad("name is not a string")
    # Positional (in field order): half the cost of keywords on this path.
    return Header(
        name, dtype, tuple(shape), data_file, offset, generation, float(created), float(modified),
        attrs, checksum, growable, packed,
    )  # fmt: skip


def encode_attrs(attrs: Any) -> dict[str, Any]:
    """Validate user attrs: a mapping of str to JSON values (NumPy scalars/arrays allowed)."""
    if attrs is None or (type(attrs) is dict and not attrs):  # (the usual case: nothing to check)
        return {}
    if not hasattr(attrs, "items"):
        raise InvalidArgumentError(f"attrs must be a mapping, not {type(attrs).__name__}")
    result = {}
    for key, value in attrs.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(f"attr keys must be strings, got {key!r}")
        result[key] = value
    try:
        # Round-trip through JSON so what we store is exactly what we return later.
        text = json.dumps(result, default=_json_default, allow_nan=False)
        # (read back as readers do: what they would refuse, an integer beyond a double's range, is refused now)
        decoded: dict[str, Any] = _decode_json(text)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"attrs must be JSON-serialisable: {exc}") from None
    return decoded


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} value {value!r} is not JSON-serialisable")


# --- the manifest -------------------------------------------------------------


def manifest_bytes(created: float) -> bytes:
    record = {"format": MANIFEST_FORMAT, "version": FORMAT_VERSION, "created": created}
    return (json.dumps(record) + "\n").encode()


def parse_manifest(root: str, raw: bytes) -> int:
    """Validate the store manifest and return its format version."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"store {root!r}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"store {root!r}: {MANIFEST_NAME} is not an mmstore manifest")
    return _check_version(record.get("version"), f"store {root!r}")


def _check_version(version: Any, what: str, newest: int = FORMAT_VERSION) -> int:
    """The format version of a sidecar or manifest; FormatError if bad or newer than ``newest``."""
    if not _is_count(version) or version < 1:
        raise FormatError(f"{what}: bad format version {version!r}")
    if version > newest:
        raise FormatError(
            f"{what}: format version {version} is newer than this mmstore supports ({newest}); upgrade mmstore"
        )
    return int(version)
