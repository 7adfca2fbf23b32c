"""Hostile sidecars: the parser answers anything with a Header or a FormatError, nothing else."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mmstore import _format
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
