"""The hostile-input corpus: every case in tests/data/hostile/ gives a clean error naming its
dataset (never a crash, a hang, or a read outside the store), and the healthy datasets beside
it still read bit-exactly, list, verify and export.

Each case is one JSON file (tests/data/hostile/README.md describes the keys). A case
describes the sidecar (field overrides on a valid header, or raw text), the data file
(bytes, a size to truncate or sparsely extend it to) and what to plant at test time that git
cannot store: symlinks out of the store, FIFOs, directories, sparse files, file names that
are not UTF-8.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmstore
from tests.conftest import store_files

CORPUS = Path(__file__).parent / "data" / "hostile"
CASES = {path.stem: json.loads(path.read_text()) for path in sorted(CORPUS.glob("*.json"))}
README = "README.md"
TOKEN = "0123456789abcdef"
GOOD_BYTES = np.arange(6, dtype="<i8").tobytes()
OUTSIDE_VALUE = 666  # what every file outside the store holds: a reader must never return it

HEALTHY = {
    "good": np.arange(10.0),
    "grp/good": np.arange(6, dtype="<i8").reshape(2, 3),
    "zz/deep/good": np.array([(b"chr1", 7)], dtype=[("chr", "S4"), ("pos", "<i4")]),
}
LOG_ROWS = np.arange(15, dtype="<i8").reshape(5, 3)


def cases_of(*kinds: str) -> list[str]:
    return [case for case, spec in CASES.items() if spec.get("kind", "dataset") in kinds]


def test_corpus_is_small_and_complete() -> None:
    assert len(CASES) >= 80
    assert {path.name for path in CORPUS.iterdir()} == {f"{case}.json" for case in CASES} | {README}
    size = sum(path.stat().st_size for path in CORPUS.iterdir())
    assert size < 64 * 1024
    for case, spec in CASES.items():
        assert spec["about"] and spec["expect"] in ("ok", "FormatError", "InvalidNameError"), case


def make_healthy_store(root: Path) -> None:
    with mmstore.Store(root) as store:
        for name, array in HEALTHY.items():
            store.put(name, array, attrs={"healthy": True})
        with store.create("log", "<i8", (0, 3), growable=True) as writer:
            writer.append(LOG_ROWS)


def check_healthy(store: mmstore.Store) -> None:
    for name, array in HEALTHY.items():
        got = store.get(name)
        assert got.dtype == array.dtype and got.tobytes() == array.tobytes(), name
        assert store.attrs(name) == {"healthy": True}
        assert name in store
    with store.open_reader("log") as reader:
        assert reader.array.tobytes() == LOG_ROWS.tobytes()
    assert set(HEALTHY) | {"log"} <= set(store.keys())


def header_record(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    leaf = name.rpartition("/")[2]
    record: dict[str, Any] = {
        "format": "mmstore-dataset", "version": 1, "name": name, "dtype": "<i8", "shape": [2, 3],
        "byteorder": "<", "data_file": f"{leaf}.{TOKEN}.dat", "offset": 0, "generation": 1,
        "growable": False, "checksum": None, "attrs": {}, "created": 1.0, "modified": 1.0,
    }  # fmt: skip
    if "growable" in spec:
        record.update(growable=True, offset=4096, shape=[0, 3])
    record.update(spec.get("header", {}))
    for key in spec.get("drop", []):
        del record[key]
    return record


def sidecar_bytes(record: dict[str, Any], spec: dict[str, Any]) -> bytes:
    if "sidecar_hex" in spec:
        return bytes.fromhex(spec["sidecar_hex"])
    if "sidecar_nesting" in spec:
        return b"[" * spec["sidecar_nesting"] + b"]" * spec["sidecar_nesting"]
    if "sidecar_text" in spec:
        return spec["sidecar_text"].encode()
    text = json.dumps(record)
    if "sidecar_text_replace" in spec:
        old, new = spec["sidecar_text_replace"]
        assert old in text
        text = text.replace(old, new)
    return text.encode()


def data_bytes(spec: dict[str, Any]) -> bytes:
    growable = spec.get("growable")
    if growable is None:
        return GOOD_BYTES
    block = bytearray(4096)
    block[0:8] = growable.get("magic", "MMSGROW\x01").encode("latin-1")
    struct.pack_into("<QQIIQ", block, 8, growable["length"], 1, 0, 0, 0)
    return bytes(block) + bytes(24 * growable.get("rows", 0))


def write_dataset(directory: Path, name: str, spec: dict[str, Any], data: bytes | None = None) -> dict[str, Any]:
    """Write the case's sidecar and data file into ``directory`` (the dataset's directory)."""
    record = header_record(name, spec)
    directory.mkdir(parents=True, exist_ok=True)
    leaf = name.rpartition("/")[2]
    (directory / f"{leaf}.json").write_bytes(sidecar_bytes(record, spec))
    data_file = record.get("data_file")
    plain = isinstance(data_file, str) and data_file and "/" not in data_file and "\0" not in data_file
    if plain and not spec.get("no_data"):
        path = directory / data_file
        path.write_bytes(data_bytes(spec) if data is None else data)
        if "data_size" in spec:
            os.truncate(path, spec["data_size"])  # past the end: a sparse file
    return record


def plant(store_path: Path, outside: Path, name: str, spec: dict[str, Any]) -> None:
    """Make the case's dataset ``name`` in the store (what git cannot hold is made here)."""
    how = spec.get("plant")
    group, _, leaf = name.rpartition("/")
    directory = store_path / group if group else store_path
    outside_data = np.full(6, OUTSIDE_VALUE, dtype="<i8").tobytes()
    data_file = f"{leaf}.{TOKEN}.dat"
    if how in (None, "outside-data"):
        write_dataset(directory, name, spec)
        if how == "outside-data":
            (store_path.parent / "outside.dat").write_bytes(outside_data)
    elif how == "data-symlink":
        write_dataset(directory, name, spec)
        (directory / data_file).unlink()
        (outside / data_file).write_bytes(outside_data)
        (directory / data_file).symlink_to(outside / data_file)
    elif how in ("data-fifo", "data-directory"):
        write_dataset(directory, name, {**spec, "no_data": True})
        os.mkfifo(directory / data_file) if how == "data-fifo" else (directory / data_file).mkdir()
    elif how == "sidecar-symlink":
        write_dataset(outside, name, spec, outside_data)
        (directory / f"{leaf}.json").symlink_to(outside / f"{leaf}.json")
    elif how == "sidecar-fifo":
        os.mkfifo(directory / f"{leaf}.json")
    elif how == "sidecar-directory":
        (directory / f"{leaf}.json").mkdir()
    elif how == "group-symlink":
        write_dataset(outside, name, spec, outside_data)
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.symlink_to(outside, target_is_directory=True)
    elif how == "group-symlink-inside":
        directory.symlink_to(store_path / "grp", target_is_directory=True)
    else:  # pragma: no cover - a typo in the corpus
        raise AssertionError(f"unknown plant {how!r}")


def expected_error(spec: dict[str, Any]) -> type[Exception]:
    error = getattr(mmstore, spec["expect"])
    assert issubclass(error, mmstore.MmstoreError)
    return error  # type: ignore[no-any-return]


def raises_naming(error: type[Exception], name: str, call: Any) -> None:
    with pytest.raises(mmstore.MmstoreError) as info:
        call()
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {info.value}"
    assert repr(name) in str(info.value), str(info.value)


@pytest.mark.parametrize("case", cases_of("dataset"))
def test_hostile_dataset(tmp_path: Path, case: str) -> None:
    spec = CASES[case]
    name = spec.get("name", "bad")
    store_path, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    make_healthy_store(store_path)
    plant(store_path, outside, name, spec)
    listed = spec.get("listed", True)
    with mmstore.Store(store_path, "r") as store:
        if spec["expect"] == "ok":
            array = store.get(name)
            assert array.shape == tuple(header_record(name, spec)["shape"])
            if array.size > 6:  # the sparse case: the written bytes, then holes that read as zeros
                assert array[:6].tobytes() == GOOD_BYTES and not array[-4:].any()
            else:
                assert array.tobytes() == GOOD_BYTES
        else:
            error = expected_error(spec)
            for call in (store.get, store.open_reader, store.get):
                raises_naming(error, name, lambda call=call: call(name))
            if "symlink" in spec.get("plant", "") and spec["plant"] != "data-symlink":
                raises_naming(error, name, lambda: store.info(name))  # the sidecar itself is refused
                raises_naming(error, name, lambda: store.attrs(name))
            for call in (store.info, store.attrs):
                try:
                    call(name)  # only the header is read: a bad data file is found by get
                except mmstore.MmstoreError as exc:
                    assert isinstance(exc, error) and repr(name) in str(exc)
        check_healthy(store)
        assert (name in store) is listed
        assert (name in list(store)) is listed  # iteration lists what keys() lists
        assert (name in store.keys(name.rpartition("/")[0])) is listed
        report = store.verify()
        problem_key = name if listed else name.rpartition("/")[0] + "/"
        reported = spec["expect"] != "ok" or spec.get("verify_problem", False)
        assert (problem_key in report.problems) is (reported and (listed or "group-symlink" in spec["plant"]))
        assert not set(HEALTHY) & set(report.problems)
        if spec["expect"] != "ok" or reported:
            assert report.problems or not listed
        if array_size_is_small(spec):
            out = tmp_path / "export" / "out.h5"
            out.parent.mkdir()
            try:
                exported = mmstore.export_hdf5(store, out)
            except mmstore.MmstoreError as exc:
                assert listed and repr(name) in str(exc)
                assert list(out.parent.iterdir()) == [], "no half-written export"
            else:
                assert set(HEALTHY) <= set(exported) and (name in exported) is (spec["expect"] == "ok")
    # A writable open (which runs recovery) leaves the bad dataset alone and the others intact.
    before = visible_files(store_path)
    with mmstore.Store(store_path, "a") as store:
        check_healthy(store)
        assert visible_files(store_path) == before
        if reported:
            recovered = store.recover()
            assert (name in recovered.quarantined) is listed
            check_healthy(store)
            assert set(store.verify().problems) <= {problem_key}
    assert_outside_untouched(outside)


def visible_files(root: Path) -> list[str]:
    """The store's files but lock files (which a writable open creates)."""
    return [path for path in store_files(root) if not path.rpartition("/")[2].startswith(".")]


def array_size_is_small(spec: dict[str, Any]) -> bool:
    return spec["expect"] != "ok" or spec.get("data_size", 0) < 2**20


def assert_outside_untouched(outside: Path) -> None:
    for path in outside.iterdir():
        if path.suffix == ".dat":
            assert np.frombuffer(path.read_bytes(), "<i8").tolist() == [OUTSIDE_VALUE] * 6


@pytest.mark.parametrize("case", cases_of("name"))
def test_hostile_name_is_refused_everywhere(store: mmstore.Store, store_path: Path, case: str) -> None:
    spec = CASES[case]
    name = spec["name"]
    store.put("good", HEALTHY["good"])
    before = store_files(store_path)
    error = expected_error(spec)
    for call in (
        lambda: store.put(name, np.zeros(3)),
        lambda: store.get(name),
        lambda: store.info(name),
        lambda: store.create(name, "<f8", (0,), growable=True),
        lambda: store.open_writer(name),
        lambda: store.open_reader(name),
        lambda: store.delete(name),
    ):
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert name not in store
    assert store_files(store_path) == before
    assert store.get("good").tobytes() == HEALTHY["good"].tobytes()


@pytest.mark.parametrize("case", cases_of("plant-name"))
def test_sidecar_planted_under_a_bad_name(tmp_path: Path, case: str) -> None:
    spec = CASES[case]
    store_path = tmp_path / "store"
    make_healthy_store(store_path)
    file_name = bytes.fromhex(spec["file_name_hex"])
    name = os.fsdecode(file_name)[: -len(".json")]
    record = header_record("planted", {})
    (store_path / record["data_file"]).write_bytes(GOOD_BYTES)
    with open(os.path.join(os.fsencode(store_path), file_name), "wb") as handle:
        handle.write(json.dumps(record).encode())
    with mmstore.Store(store_path, "r") as store:
        assert name in list(store)  # listed, so that it is seen ...
        with pytest.raises(expected_error(spec)):
            store.get(name)  # ... but never read
        check_healthy(store)
        assert set(store.verify().problems) == {name}
    with mmstore.Store(store_path, "a") as store:
        assert set(store.recover().quarantined) == {name}
        check_healthy(store)
        assert store.verify().ok


@pytest.mark.parametrize("case", cases_of("distinct"))
def test_lookalike_names_are_distinct_datasets(tmp_path: Path, case: str) -> None:
    first, second = CASES[case]["names"]
    assert first != second
    store_path = tmp_path / "store"
    make_healthy_store(store_path)
    with mmstore.Store(store_path) as store:
        store.put(first, np.arange(3) + 100)
        store.put(second, np.arange(3) + 200)
    with mmstore.Store(store_path, "r") as store:
        assert store.get(first).tolist() == [100, 101, 102]
        assert store.get(second).tolist() == [200, 201, 202]
        assert {first, second} <= set(store.keys())
        assert store.info(first)["data_file"] != store.info(second)["data_file"]
        check_healthy(store)
        assert store.verify().ok
    with mmstore.Store(store_path) as store:
        store.delete(first)
        assert first not in store and store.get(second).tolist() == [200, 201, 202]


def test_group_symlink_swapped_in_after_a_read_is_not_followed(
    store: mmstore.Store, store_path: Path, tmp_path: Path
) -> None:
    """A reader that already read grp/x must not follow grp once it becomes a symlink out."""
    store.put("grp/x", np.arange(6, dtype="<i8"))
    outside = tmp_path / "outside"
    write_dataset(outside, "x", {}, np.full(6, OUTSIDE_VALUE, dtype="<i8").tobytes())
    with mmstore.Store(store_path, "r") as reader:
        assert reader.get("grp/x").tolist() == list(range(6))
        os.rename(store_path / "grp", tmp_path / "moved")
        (store_path / "grp").symlink_to(outside, target_is_directory=True)
        for call in (reader.get, reader.open_reader, reader.info, reader.attrs):
            raises_naming(mmstore.FormatError, "grp/x", lambda call=call: call("grp/x"))
        assert "grp/x" not in reader and list(reader) == []
        assert set(reader.verify().problems) == {"grp/"}
    assert_outside_untouched(outside)


def test_sidecar_read_stops_past_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sidecar is read before anything asks whether it is a regular file: a device that
    never ends (here /dev/zero) must not make the read go on for ever."""
    from mmstore import _entries

    monkeypatch.setattr(_entries, "MAX_SIDECAR_BYTES", 300_000)
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        data = _entries._read_fd(fd)
    finally:
        os.close(fd)
    assert 300_000 < len(data) <= 300_000 + (1 << 16)
