"""The on-disk format: dtype round-trips, header validation, names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mmstore
from mmstore import _format, _names

GENOMIC = np.dtype([("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")])

DTYPES = [
    np.dtype(bool),
    *(np.dtype(f"{order}{kind}{size}") for order in "<>" for kind in "iu" for size in (1, 2, 4, 8)),
    *(np.dtype(f"{order}f{size}") for order in "<>" for size in (2, 4, 8)),
    np.dtype("<c8"),
    np.dtype(">c16"),
    np.dtype(np.longdouble),
    np.dtype("<M8[ns]"),
    np.dtype(">M8[D]"),
    np.dtype("<m8[us]"),
    np.dtype("S7"),
    np.dtype("<U5"),
    np.dtype(">U3"),
    np.dtype("V6"),
    GENOMIC,
    np.dtype([("a", "<i2"), ("b", [("c", ">f8", (2, 3)), ("d", "S3")]), ("e", "?")]),
    np.dtype({"names": ["x", "y"], "formats": ["<i4", "<f8"], "offsets": [0, 8], "itemsize": 24}),
    np.dtype([("x", "<i4"), ("y", "<f8")], align=True),
    np.dtype([(("title", "named"), "<i4")]),
]


def sample(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes of the right size viewed as ``dtype`` (NaNs and odd bit patterns included)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return raw.view(dtype).reshape(shape) if nbytes else np.zeros(shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)])
def test_every_supported_dtype_round_trips_bit_exactly(store: mmstore.Store, dtype: np.dtype, shape: tuple) -> None:
    array = sample(dtype, shape)
    store.put("x", array)
    got = store.get("x")
    assert got.dtype == array.dtype
    assert got.dtype.str == array.dtype.str  # byte order preserved
    assert got.shape == array.shape
    assert got.tobytes() == array.tobytes()
    assert not got.flags.writeable


def test_genomic_records_round_trip(store: mmstore.Store) -> None:
    rows = np.array([(b"chr1", 10, 0.5, 3, 7), (b"chrX", 2**31 - 1, -1.25, 0, 1)], dtype=GENOMIC)
    store.put("genome/sample1", rows, attrs={"source": "test"})
    got = store.get("genome/sample1")
    assert got.dtype == GENOMIC
    assert got.tolist() == rows.tolist()
    assert store.attrs("genome/sample1") == {"source": "test"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(60, dtype=np.int32).reshape(6, 10)[::2, 1::3],
        lambda: np.arange(24.0).reshape(2, 3, 4).transpose(2, 0, 1),
        lambda: np.asfortranarray(np.arange(12).reshape(3, 4)),
        lambda: np.zeros(5, GENOMIC)[["pos", "c"]],
        lambda: np.broadcast_to(np.arange(3), (4, 3)),
    ],
)
def test_non_contiguous_inputs_are_stored_c_contiguous(store: mmstore.Store, make) -> None:
    array = make()
    store.put("x", array)
    got = store.get("x")
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, array)
    raw = Path(store.info("x")["data_file"]).read_bytes()
    assert raw == np.ascontiguousarray(array).tobytes()


@pytest.mark.parametrize(
    "array",
    [
        np.array([1, "a", None], dtype=object),
        np.zeros(3, dtype=[("a", "<i4"), ("b", object)]),
    ],
    ids=["object", "struct-with-object"],
)
def test_object_dtypes_are_refused(store: mmstore.Store, array: np.ndarray) -> None:
    with pytest.raises(mmstore.UnsupportedDtypeError, match="object") as info:
        store.put("x", array)
    assert isinstance(info.value, ValueError)
    assert "x" not in store


def test_ragged_input_is_refused(store: mmstore.Store) -> None:
    with pytest.raises((mmstore.UnsupportedDtypeError, ValueError)):
        store.put("x", [[1, 2], [3]])


def test_data_file_is_raw_c_order_bytes_readable_by_np_memmap(store: mmstore.Store) -> None:
    array = np.arange(20, dtype=">i4").reshape(4, 5)
    store.put("x", array)
    info = store.info("x")
    mapped = np.memmap(info["data_file"], dtype=info["dtype"], mode="r", shape=info["shape"])
    np.testing.assert_array_equal(mapped, array)


@settings(max_examples=60, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes()),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    )
)
def test_property_any_scalar_dtype_and_shape_round_trips(tmp_path_factory, array: np.ndarray) -> None:
    path = tmp_path_factory.mktemp("prop")
    with mmstore.Store(path / "s") as store:
        store.put("a/b", array)
        got = store.get("a/b")
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tobytes() == array.tobytes()


# --- names ----------------------------------------------------------------------

BAD_NAMES = [
    "",
    "/abs",
    "a/../b",
    "..",
    ".",
    "a/./b",
    "a//b",
    "a/",
    ".hidden",
    "a/.hidden",
    "nul\0byte",
    "new\nline",
    "tab\tname",
    "bidi\u202eoverride",
    "zero\u200bwidth",
    "e\u0301",  # not NFC
    " lead",
    "trail ",
    "x" * 201,
    "g" * 10 + "/" + "y" * 201,
    "/".join(["a"] * 600),
    "mmstore",
    "group.json/x",
    "group.dat/x",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_give_one_line_errors(store: mmstore.Store, name: str) -> None:
    with pytest.raises(mmstore.InvalidNameError) as info:
        store.put(name, np.zeros(1))
    message = str(info.value)
    assert "\n" not in message
    assert "invalid dataset name" in message or "dataset name" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(mmstore.InvalidNameError):
        store.get(name)
    assert name not in store


def test_non_string_names_are_refused(store: mmstore.Store) -> None:
    with pytest.raises(mmstore.InvalidNameError, match="str"):
        store.put(3, np.zeros(1))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a", "a/b/c", "images/train", "x.json", "v1.2/data", "名前/データ", "a b", "a-b_c"])
def test_good_names_work(store: mmstore.Store, name: str) -> None:
    store.put(name, np.arange(3))
    assert name in store
    assert store.keys() == [name]
    np.testing.assert_array_equal(store.get(name), np.arange(3))


def test_names_map_to_files_inside_the_store(store: mmstore.Store, store_path: Path) -> None:
    store.put("a/b/c", np.arange(3))
    assert (store_path / "a" / "b" / "c.json").is_file()
    data = [p for p in (store_path / "a" / "b").iterdir() if p.suffix == ".dat"]
    assert len(data) == 1 and _names.DATA_FILE_RE.match(data[0].name)


# --- header validation ------------------------------------------------------------


def good_header(store: mmstore.Store, store_path: Path) -> dict:
    store.put("x", np.arange(6, dtype="<i8").reshape(2, 3))
    return json.loads((store_path / "x.json").read_text())


def write_header(store_path: Path, record: object, compact: bool = False) -> None:
    """Write a sidecar; ``compact`` in the one-line form put writes (parse_header's fast path)."""
    if not isinstance(record, str):
        record = json.dumps(record, separators=(",", ":")) + "\n" if compact else json.dumps(record)
    (store_path / "x.json").write_text(record)


CORRUPTIONS = {
    "bad-json": lambda h: "{not json",
    "not-object": lambda h: [1, 2],
    "wrong-format": lambda h: {**h, "format": "other"},
    "missing-field": lambda h: {k: v for k, v in h.items() if k != "shape"},
    "negative-shape": lambda h: {**h, "shape": [-2, 3]},
    "float-shape": lambda h: {**h, "shape": [2.0, 3]},
    "huge-shape": lambda h: {**h, "shape": [2**40, 2**40]},
    "too-many-dims": lambda h: {**h, "shape": [1] * 65},
    "wrong-shape": lambda h: {**h, "shape": [3, 3]},
    "wrong-dtype-size": lambda h: {**h, "dtype": "<i4", "byteorder": "<"},
    "unknown-dtype": lambda h: {**h, "dtype": "<q99"},
    "object-dtype": lambda h: {**h, "dtype": "|O", "byteorder": "|"},
    "dtype-wrong-type": lambda h: {**h, "dtype": 5},
    "byteorder-mismatch": lambda h: {**h, "byteorder": ">"},
    "offset-past-eof": lambda h: {**h, "offset": 4096},
    "negative-offset": lambda h: {**h, "offset": -8},
    "escaping-data-file": lambda h: {**h, "data_file": "../../etc/passwd"},
    "absolute-data-file": lambda h: {**h, "data_file": "/etc/passwd"},
    "missing-data-file": lambda h: {**h, "data_file": "x.0000000000000000.dat"},
    "newer-version": lambda h: {**h, "version": 99},
    "bad-checksum-field": lambda h: {**h, "checksum": 12},
    "attrs-not-object": lambda h: {**h, "attrs": [1]},
    "bool-generation": lambda h: {**h, "generation": True},
    "checksum-newline": lambda h: {**h, "checksum": f"{h['checksum']}\n"},
    "nan-attr": lambda h: {**h, "attrs": {"x": float("nan")}},
    "infinity-attr": lambda h: {**h, "attrs": {"x": [1, float("-inf")]}},
    "overflowing-attr": lambda h: json.dumps({**h, "attrs": {"x": 1.25}}).replace("1.25", "1e400"),
}


@pytest.mark.parametrize("compact", [False, True], ids=["spaced", "compact"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS), ids=str)
def test_corrupt_header_raises_format_error_for_that_dataset_only(
    store: mmstore.Store, store_path: Path, corruption: str, compact: bool
) -> None:
    header = good_header(store, store_path)
    store.put("other", np.arange(4))
    write_header(store_path, CORRUPTIONS[corruption](header), compact)
    with mmstore.Store(store_path, "r") as reader:
        with pytest.raises(mmstore.FormatError) as info:
            reader.get("x")
        assert "'x'" in str(info.value)
        np.testing.assert_array_equal(reader.get("other"), np.arange(4))
        assert reader.keys() == ["other", "x"]


def test_truncated_data_file_raises_format_error(store: mmstore.Store, store_path: Path) -> None:
    store.put("x", np.arange(1000.0))
    data_file = Path(store.info("x")["data_file"])
    with open(data_file, "r+b") as handle:
        handle.truncate(100)
    with mmstore.Store(store_path, "r") as reader, pytest.raises(mmstore.FormatError, match="100 bytes"):
        reader.get("x")


def test_symlinked_sidecar_is_refused(store: mmstore.Store, store_path: Path, tmp_path: Path) -> None:
    store.put("x", np.arange(3))
    outside = tmp_path / "outside.json"
    outside.write_bytes((store_path / "x.json").read_bytes())
    (store_path / "x.json").unlink()
    (store_path / "x.json").symlink_to(outside)
    with mmstore.Store(store_path, "r") as reader, pytest.raises(mmstore.FormatError, match="symlink"):
        reader.get("x")


def test_header_fields_are_documented_and_complete(store: mmstore.Store, store_path: Path) -> None:
    header = good_header(store, store_path)
    assert header["format"] == "mmstore-dataset"
    assert header["version"] == _format.FORMAT_VERSION
    assert header["dtype"] == "<i8"
    assert header["shape"] == [2, 3]
    assert header["byteorder"] == "<"
    assert header["offset"] == 0
    assert header["generation"] == 1
    assert header["checksum"].startswith("xxh3_64:") and len(header["checksum"]) == 8 + 16
    assert header["growable"] is False
    assert header["created"] <= header["modified"]
    formats_doc = (Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text()
    for key in header:
        assert f"`{key}`" in formats_doc, f"docs/FORMAT.md does not describe {key!r}"


def test_manifest_version_is_checked(store_path: Path) -> None:
    mmstore.Store(store_path).close()
    manifest = store_path / "mmstore.json"
    record = json.loads(manifest.read_text())
    assert record["format"] == "mmstore" and record["version"] == _format.FORMAT_VERSION
    manifest.write_text(json.dumps({**record, "version": 7}))
    with pytest.raises(mmstore.FormatError, match="newer"):
        mmstore.Store(store_path, "r")


@pytest.mark.parametrize("dtype", DTYPES[:3] + DTYPES[-5:], ids=str)
def test_header_json_round_trips(dtype: np.dtype) -> None:
    header = _format.Header(
        name='a/b\u00e9"q',
        dtype=dtype,
        shape=(3, 0, 2),
        data_file="b.0123456789abcdef.dat",
        offset=0,
        generation=7,
        created=1.5,
        modified=1795355614.149711,
        attrs={"unit": "px", "nested": {"a": [1, 2.5, None, True]}},
        checksum="crc32:0000abcd",
    )
    raw = header.to_json()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    parsed = _format.parse_header('a/b\u00e9"q', raw)
    assert parsed == header
    assert json.loads(raw)["name"] == 'a/b\u00e9"q'


@settings(max_examples=300)
@given(st.floats(allow_nan=False, allow_infinity=False) | st.floats(min_value=0, max_value=2**33))
def test_timestamp_text_reads_back_as_the_same_float(seconds: float) -> None:
    assert float(_format.time_text(seconds)) == seconds
    header = _format.Header("x", np.dtype("<f8"), (1,), "x.0123456789abcdef.dat", 0, 1, seconds, seconds, {})
    assert _format.parse_header("x", header.to_json())[6:8] == (seconds, seconds)


def test_commit_timestamps_are_whole_microseconds_that_read_back_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(2000):
        now = _format.timestamp_now()
        text = _format.time_text(now)
        assert float(text) == now
        assert len(text.partition(".")[2]) == 6  # written from integers, not a float repr
    # A clock before 1970 (or a test's fake one): the text keeps the sign apart from the digits.
    for nanoseconds in (-1_500_000_000, -1_000, -999_999_999_999, 1_500_000_000):
        monkeypatch.setattr(_format.time, "time_ns", lambda value=nanoseconds: value)
        now = _format.timestamp_now()
        assert now == nanoseconds // 1000 / 1e6
        assert float(_format.time_text(now)) == now


def test_names_of_store_files_match_whole_names_only() -> None:
    assert _names.DATA_FILE_RE.match("x.0123456789abcdef.dat")
    assert _names.DATA_FILE_RE.match("x.0123456789abcdef.dat\n") is None
    assert _names.TEMP_FILE_RE.match(".x.0123456789abcdef.tmp\n") is None
    assert _names.LOCK_FILE_RE.match(".x.lock\n") is None


def test_large_attrs_parse_the_same_either_way() -> None:
    attrs = {f"k{i}": [i, "some text", 1.5, {"nested": None}] for i in range(2000)}
    header = _format.Header("a", np.dtype("<f8"), (3,), "a.0123456789abcdef.dat", 0, 2, 1.5, 2.5, attrs, None)
    raw = header.to_json()
    assert len(raw) > 64 * 1024
    fast = _format._parse_canonical("a", raw)
    assert fast is not None and fast == _format._parse_any("a", raw) == header


def test_a_string_dtype_never_reads_a_list_dtypes_cache_entry() -> None:
    record = {
        "format": "mmstore-dataset", "version": 1, "name": "x", "dtype": [["a", "<i4"]], "shape": [2],
        "byteorder": "<", "data_file": "x.0123456789abcdef.dat", "offset": 0, "generation": 1,
        "growable": False, "checksum": None, "attrs": {}, "created": 1.0, "modified": 1.0,
    }  # fmt: skip
    assert _format.parse_header("x", json.dumps(record).encode()).dtype == np.dtype([("a", "<i4")])
    text = json.dumps(record["dtype"])  # the list's JSON text, as a string dtype: no dtype
    for layout in ({}, {"separators": (",", ":")}):
        with pytest.raises(mmstore.FormatError, match="dtype"):
            _format.parse_header("x", json.dumps({**record, "dtype": text}, **layout).encode())
