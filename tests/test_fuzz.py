"""Hostile sidecars: the parser answers anything with a Header or a FormatError, nothing else."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mmstore import _format, _names
from mmstore._errors import FormatError

GOOD = {
    "format": "mmstore-dataset", "version": 1, "name": "x", "dtype": "<f8", "shape": [2, 3],
    "byteorder": "<", "data_file": "x.0123456789abcdef.dat", "offset": 0, "generation": 1,
    "growable": False, "checksum": None, "attrs": {}, "created": 1.0, "modified": 1.0,
}  # fmt: skip

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


def parse_or_format_error(raw: bytes) -> None:
    try:
        header = _format.parse_header("fuzzed", raw)
    except FormatError as exc:
        assert "fuzzed" in str(exc)
        return
    # Whatever parses is internally consistent: its byte count is computable and bounded.
    assert 0 <= header.nbytes <= _format.MAX_NBYTES
    assert "/" not in header.data_file and not header.data_file.startswith(".")


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes(raw: bytes) -> None:
    parse_or_format_error(raw)


@settings(max_examples=1000, deadline=None)
@given(key=st.sampled_from(sorted(GOOD)), value=JSON_VALUES)
def test_one_field_replaced_by_any_json(key: str, value: object) -> None:
    parse_or_format_error(json.dumps({**GOOD, key: value}).encode())


@settings(max_examples=600, deadline=None)
@given(
    dtype=st.recursive(
        st.sampled_from(["<f8", "|S3", "<U2", "|O", "<M8[s]", "", "<q99", "|V0", "<f16"]),
        lambda inner: st.lists(
            st.tuples(st.text(max_size=4), inner)
            | st.tuples(st.text(max_size=4), inner, st.lists(st.integers(-2, 4), max_size=3)),
            max_size=4,
        ).map(lambda fields: [list(field) for field in fields]),
        max_leaves=8,
    ),
    shape=st.lists(st.integers(-1, 2**40), max_size=4),
)
def test_any_dtype_and_shape(dtype: object, shape: list[int]) -> None:
    parse_or_format_error(json.dumps({**GOOD, "dtype": dtype, "shape": shape, "byteorder": "<"}).encode())


def test_deeply_nested_json_is_refused_cleanly() -> None:
    parse_or_format_error(b"[" * 100_000 + b"]" * 100_000)
    parse_or_format_error(json.dumps({**GOOD, "dtype": [["a", [["b", [["c", "<f8"]]]]]]}).encode())


def test_fuzz_script_bounded() -> None:
    from tests.test_crash import load_script

    fuzz = load_script("fuzz_sidecar")
    import random

    rng = random.Random(11)
    problems = [fuzz.check(fuzz.generate(rng, index)) for index in range(3000)]
    assert [p for p in problems if p is not None] == []


# --- the fast paths agree with the full checks ---------------------------------------------
#
# parse_header first tries one regular-expression match of the exact form Header.to_json
# writes, and validate_name one match of the plainest names; both fall back to the full,
# rule-by-rule checks. A fast path may decline anything, but what it accepts must be
# exactly what the full path gives.

NAMES = st.text(st.sampled_from('ab9_-./ Z\u00e9\\"\n'), max_size=12) | st.text(max_size=8)
SIMPLE_DTYPES = ["<f8", ">f4", "|u1", "|b1", "<i8", "<c16", "<M8[ns]", "|S10", "<U3", "|V4", "<f2"]
ATTR_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)
TIMES = st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**40).map(float)


@st.composite
def headers(draw: st.DrawFn) -> _format.Header:
    growable = draw(st.booleans())
    packed = not growable and draw(st.booleans())
    dtype = np.dtype(draw(st.sampled_from([*SIMPLE_DTYPES, [("a", "<i4"), ("b", "|S2")]])))
    shape = tuple(draw(st.lists(st.integers(0, 2**20), min_size=1 if growable else 0, max_size=4)))
    if packed:
        shape = tuple(min(n, 4) for n in shape)
    return _format.Header(
        name=draw(NAMES),
        dtype=dtype,
        shape=shape,
        data_file=draw(st.sampled_from(["x.0123456789abcdef.dat", "y.dat", "\u00e9.dat", 'a"b.dat', "a b.dat"])),
        offset=draw(st.sampled_from([0, 64, 4096, 2**40])) if not packed else 64 * draw(st.integers(0, 1000)),
        generation=draw(st.integers(1, 2**62)),
        created=draw(TIMES),
        modified=draw(TIMES),
        attrs=draw(st.dictionaries(st.text(max_size=5), ATTR_VALUES, max_size=3)),
        checksum=draw(st.sampled_from([None, "xxh3_64:0123456789abcdef", "crc32:89abcdef"])),
        growable=growable,
        packed=packed,
    )


def same_header(fast: _format.Header, full: _format.Header) -> bool:
    return fast == full and [type(value) for value in fast] == [type(value) for value in full]


def full_parse(raw: bytes) -> _format.Header | None:
    try:
        return _format._parse_any("fuzzed", raw)
    except FormatError:
        return None


@settings(max_examples=1500, deadline=None)
@given(headers())
def test_fast_header_parse_agrees_with_the_full_parse(header: _format.Header) -> None:
    raw = header.to_json()
    full = full_parse(raw)
    fast = _format._parse_canonical("fuzzed", raw)
    if fast is not None:
        assert full is not None and same_header(fast, full)
    assert _format.parse_header("fuzzed", raw) == full if full is not None else True


def test_fast_header_parse_takes_what_put_writes(store) -> None:  # type: ignore[no-untyped-def]
    store.put("plain/name-1.x", np.arange(6.0).reshape(2, 3), attrs={"unit": "s", "n": [1, None]})
    store.put("empty", np.zeros(0, "<i4"))
    store.put("scalar", np.float32(2.5))
    for name in store:
        raw = (store.path + "/" + name + ".json").encode()
        with open(raw, "rb") as handle:
            sidecar = handle.read()
        fast = _format._parse_canonical(name, sidecar)
        assert fast is not None and same_header(fast, _format._parse_any(name, sidecar))


@settings(max_examples=2000, deadline=None)
@given(
    header=headers(),
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 3), st.binary(max_size=3)), max_size=4),
)
def test_mutated_sidecars_fast_path_never_accepts_what_the_full_path_refuses(header, edits) -> None:  # type: ignore[no-untyped-def]
    raw = header.to_json()
    for position, cut, insert in edits:
        position %= len(raw) + 1
        raw = raw[:position] + insert + raw[position + cut :]
    fast = _format._parse_canonical("fuzzed", raw)
    if fast is not None:
        full = full_parse(raw)
        assert full is not None and same_header(fast, full)


@settings(max_examples=3000, deadline=None)
@given(st.text(st.sampled_from("ab9_-./ \u00e9\tZjsondt"), max_size=30) | st.text(max_size=10))
def test_fast_name_check_accepts_only_valid_names(name: str) -> None:
    fast = _names._SIMPLE_NAME.fullmatch(name) is not None
    full = _names._any_name_problem(name)
    if fast and len(name) <= _names.MAX_NAME_LENGTH and name not in _names.RESERVED_TOP_LEVEL:
        assert full is None
    assert _names._name_problem(name) == full


def test_fast_name_check_limits() -> None:
    names = ["a" * 200, "a/" + "b" * 200, "g.json/x", "g.dat/x", "x.json", "mmstore", "a" * 201, "/".join(["ab"] * 400)]
    for name in names:
        assert _names._name_problem(name) == _names._any_name_problem(name)
    assert _names._name_problem("a" * 200) is None and _names._name_problem("a" * 201) is not None
