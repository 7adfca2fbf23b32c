"""HDF5 export and import: exact dtypes and attrs, streamed, and never a partial output file."""

from __future__ import annotations

import os
import random
import re
import signal
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import mmstore
from mmstore import _hdf5, _locks
from mmstore._locks import mark_alive, writer_is_gone
from tests import workers
from tests.conftest import PROCESS_TIMEOUT
from tests.test_format import DTYPES, sample


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (4,), (3, 2)])
def test_export_import_round_trips_every_dtype(tmp_path: Path, dtype: np.dtype, shape: tuple) -> None:
    array = sample(dtype, shape, seed=1)
    with mmstore.Store(tmp_path / "s") as store:
        store.put("g/x", array, attrs={"a": 1})
        mmstore.export_hdf5(store, tmp_path / "out.h5")
    with mmstore.Store(tmp_path / "back") as back:
        imported, skipped = mmstore.import_hdf5(tmp_path / "out.h5", back)
        assert imported == ["g/x"] and skipped == {}
        got = back.get("g/x")
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tobytes() == array.tobytes()
        assert back.attrs("g/x") == {"a": 1}


def test_export_writes_growable_committed_view_only(tmp_path: Path) -> None:
    with mmstore.Store(tmp_path / "s") as store, store.create("log", np.int32, (0,), growable=True) as writer:
        writer.append(np.arange(10))
        writer.flush()
        writer.append(np.arange(5))  # not flushed: not committed, not exported
        mmstore.export_hdf5(store, tmp_path / "out.h5")
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert h5["log"][...].tolist() == list(range(10))


def test_export_refuses_dataset_that_is_also_a_group(tmp_path: Path) -> None:
    with mmstore.Store(tmp_path / "s") as store:
        store.put("a", np.arange(2))
        store.put("a/b", np.arange(2))
        with pytest.raises(mmstore.MmstoreError, match="also a group"):
            mmstore.export_hdf5(store, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_the_advice_for_a_dataset_that_is_also_a_group_can_be_followed(tmp_path: Path) -> None:
    # The refusal says to export the two to separate files with only='a' and only='a/'.
    with mmstore.Store(tmp_path / "s") as store:
        store.put("a", np.arange(2))
        store.put("a/b", np.arange(3))
        store.put("a/c/d", np.arange(4))
        store.put("g/x", np.arange(5))
        with pytest.raises(mmstore.MmstoreError, match=r"only='a' .* only='a/'"):
            mmstore.export_hdf5(store, tmp_path / "all.h5")
        assert mmstore.export_hdf5(store, tmp_path / "a.h5", only="a") == ["a"]
        assert mmstore.export_hdf5(store, tmp_path / "group.h5", only="a/") == ["a/b", "a/c/d"]
        assert mmstore.export_hdf5(store, tmp_path / "g.h5", only="g") == ["g/x"]  # a plain group, as before
        assert mmstore.export_hdf5(store, tmp_path / "gx.h5", only="g/x") == ["g/x"]
    with h5py.File(tmp_path / "a.h5") as h5:
        assert list(h5) == ["a"] and h5["a"][...].tolist() == [0, 1]
    with h5py.File(tmp_path / "group.h5") as h5:
        assert h5["a/b"][...].tolist() == [0, 1, 2] and h5["a/c/d"].shape == (4,)


def test_export_keeps_attrs_that_hdf5_cannot_hold_as_attributes(tmp_path: Path) -> None:
    # Every attrs value is JSON, exact in mmstore.attrs; the one-attribute-per-key copy for
    # other tools skips what HDF5 refuses (it failed the whole export, some with a traceback).
    attrs = {
        "": 1, "big": 2**70, "bigs": [2**70, 1], "low": -(2**63) - 1, "huge": [1e308, 2**64],
        "nul": "a\x00b", "nuls": ["a\x00"], "surrogate": "\ud800", "ok": "fine", "n": 3,
    }  # fmt: skip
    with mmstore.Store(tmp_path / "s") as store:
        store.put("x", np.arange(2), attrs=attrs)
        assert mmstore.export_hdf5(store, tmp_path / "out.h5") == ["x"]
    with h5py.File(tmp_path / "out.h5") as h5:
        native = dict(h5["x"].attrs)
        assert native["ok"] == "fine" and native["n"] == 3
        assert not {"", "big", "bigs", "low", "nul", "nuls", "surrogate"} & set(native)
    with mmstore.Store(tmp_path / "back") as back:
        assert mmstore.import_hdf5(tmp_path / "out.h5", back) == (["x"], {})
        assert back.attrs("x") == attrs


def test_import_lists_links_and_null_dataspaces_as_skipped(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["there"] = np.arange(2)
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["plain"] = np.arange(3)
        h5["g/soft"] = h5py.SoftLink("/plain")
        h5["external"] = h5py.ExternalLink("other.h5", "/there")
        h5.create_dataset("empty", data=h5py.Empty("f8"))
    with mmstore.Store(tmp_path / "s") as store:
        imported, skipped = mmstore.import_hdf5(tmp_path / "in.h5", store)
        assert imported == ["plain"]
        assert set(skipped) == {"g/soft", "external", "empty"}
        assert "soft link to '/plain'" in skipped["g/soft"]
        assert "external link" in skipped["external"] and "null dataspace" in skipped["empty"]
        assert mmstore.import_hdf5(tmp_path / "in.h5", store, only="g")[1].keys() == {"g/soft"}
        with h5py.File(tmp_path / "in.h5") as h5, pytest.raises(mmstore.InvalidArgumentError, match="'/empty'"):
            store.put("e", h5["empty"])


def test_import_skips_what_has_no_fixed_size(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["plain"] = np.arange(3)
        h5["strings"] = np.array(["a", "bb"], dtype=h5py.string_dtype())
        h5["plain"].attrs["unit"] = "m"
        h5.create_dataset(".hidden", data=np.arange(2))
    with mmstore.Store(tmp_path / "s") as store:
        imported, skipped = mmstore.import_hdf5(tmp_path / "in.h5", store)
        assert imported == ["plain"]
        assert set(skipped) == {"strings", ".hidden"}
        assert store.attrs("plain") == {"unit": "m"}


@pytest.mark.slow
def test_killed_export_never_leaves_a_partial_file(tmp_path: Path, spawn) -> None:
    store_path, out = tmp_path / "s", tmp_path / "out.h5"
    with mmstore.Store(store_path) as store:
        for i in range(4):
            store.put(f"d{i}", np.full(2_000_000, i, dtype=np.float64))
        mmstore.export_hdf5(store, out)
    rng = random.Random(0)
    for _trial in range(5):
        started = spawn.Event()
        child = spawn.Process(target=workers.export_forever, args=(str(store_path), str(out), started))
        child.start()
        assert started.wait(PROCESS_TIMEOUT)
        time.sleep(rng.uniform(0.05, 0.5))
        child.kill()
        child.join(PROCESS_TIMEOUT)
        with h5py.File(out, "r") as h5:  # always a complete file: the previous or a new export
            assert sorted(h5) == ["d0", "d1", "d2", "d3"]
            assert all(h5[f"d{i}"][-1] == i for i in range(4))
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".out.h5")]
    # Hidden temp files of killed exports, never out.h5; each export removed those of the ones
    # killed before it, so only the last kill's can remain, and the next export removes it.
    assert len(leftovers) <= 1 and all(name.endswith(".tmp") for name in leftovers)
    with mmstore.Store(store_path, "r") as store:
        mmstore.export_hdf5(store, out)
    assert sorted(os.listdir(tmp_path)) == ["out.h5", "s"]


def test_export_survives_a_replace_during_the_export(tmp_path: Path) -> None:
    with mmstore.Store(tmp_path / "s") as store, mmstore.Store(tmp_path / "s") as other:
        store.put("a", np.arange(10.0))
        store.put("b", np.arange(5.0))
        store.put("c", np.arange(3.0))

        def replace_others(name: str, done: int, total: int) -> None:
            if name == "a":
                other.put("b", np.arange(20.0))  # b is replaced before the export reaches it
                if "c" in other:
                    other.delete("c")  # and c is deleted

        exported = mmstore.export_hdf5(store, tmp_path / "out.h5", progress=replace_others)
    assert exported == ["a", "b"]
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert h5["b"][...].tolist() == list(np.arange(20.0)) and "c" not in h5


def test_export_of_many_small_datasets_is_not_slowed_by_buffers(tmp_path: Path) -> None:
    import tracemalloc

    with mmstore.Store(tmp_path / "s") as store:
        for i in range(50):
            store.put(f"small/{i}", np.zeros(16))
        tracemalloc.start()
        mmstore.export_hdf5(store, tmp_path / "out.h5")
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 * 2**20  # one bounded buffer, not one per dataset


# --- chunk shapes ---------------------------------------------------------------------


def mixed_store(path: Path) -> dict[str, np.ndarray]:
    """Datasets of every rank the chunk rule has to fit: 0-d, empty, small, 2-D, unicode."""
    arrays = {
        "small": np.arange(10, dtype=np.int64),
        "big": np.arange(5000, dtype=np.float32),
        "table": np.arange(15, dtype=np.int16).reshape(5, 3),
        "cube": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        "scalar": np.array(7.5),
        "empty": np.zeros(0, np.int64),
        "empty_rows": np.zeros((0, 4), np.float64),
        "names": np.array(["ab", "cde", "f", "gh"], "<U3"),  # HDF5 shape (4, 3): code points last
    }
    with mmstore.Store(path) as store:
        for name, array in arrays.items():
            store.put(name, array)
    return arrays


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ((1000,), {"small": (10,), "big": (1000,), "table": (5, 3), "cube": (2, 3, 4), "names": (4, 3)}),
        ((2,), {"small": (2,), "big": (2,), "table": (2, 3), "cube": (2, 3, 4), "names": (2, 3)}),
        ((1000, 2), {"small": (10,), "big": (1000,), "table": (5, 2), "cube": (2, 2, 4), "names": (4, 3)}),
        ((1, 1, 1, 1), {"small": (1,), "big": (1,), "table": (1, 1), "cube": (1, 1, 1), "names": (1, 3)}),
    ],
    ids=str,
)
@pytest.mark.parametrize("compression", [None, "lzf"])
def test_explicit_chunks_are_an_upper_bound_fitted_to_each_dataset(
    tmp_path: Path, requested: tuple[int, ...], expected: dict[str, tuple[int, ...]], compression: str | None
) -> None:
    arrays = mixed_store(tmp_path / "s")
    with mmstore.Store(tmp_path / "s", "r") as store:
        exported = mmstore.export_hdf5(store, tmp_path / "out.h5", compression=compression, chunks=requested)
    assert sorted(exported) == sorted(arrays)
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert {name: h5[name].chunks for name in expected} == expected
        assert all(h5[name].compression == compression for name in expected)
        for name in ("scalar", "empty", "empty_rows"):  # HDF5 cannot chunk a scalar; nothing to chunk when empty
            assert h5[name].chunks is None and h5[name].compression is None
    with mmstore.Store(tmp_path / "back") as back:
        assert mmstore.import_hdf5(tmp_path / "out.h5", back) == (sorted(arrays), {})
        for name, array in arrays.items():
            got = back.get(name)
            assert got.dtype == array.dtype and got.shape == array.shape and got.tobytes() == array.tobytes()


@pytest.mark.parametrize("chunks", [(), (0,), (4, -1)], ids=str)
def test_bad_chunk_shape_is_refused_before_writing(tmp_path: Path, chunks: tuple[int, ...]) -> None:
    mixed_store(tmp_path / "s")
    with mmstore.Store(tmp_path / "s", "r") as store, pytest.raises(ValueError, match="chunks"):
        mmstore.export_hdf5(store, tmp_path / "out.h5", chunks=chunks)
    assert os.listdir(tmp_path) == ["s"]


def test_hdf5_error_that_is_not_about_the_dtype_says_what_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mmstore.Store(tmp_path / "s") as store:
        store.put("x", np.arange(10))

        def refuse(*args: object, **kwargs: object) -> None:
            raise ValueError("the layout was refused")

        monkeypatch.setattr(h5py.Group, "create_dataset", refuse)
        with pytest.raises(mmstore.MmstoreError) as info:
            mmstore.export_hdf5(store, tmp_path / "out.h5", compression="gzip", chunks=(4,))
    message = str(info.value)
    assert "dtype" not in message
    assert "dataset 'x'" in message and "chunks (4,)" in message and "gzip" in message
    assert "the layout was refused" in message
    assert os.listdir(tmp_path) == ["s"]


def test_dtype_hdf5_has_no_type_for_is_reported_as_such(tmp_path: Path) -> None:
    # The store itself refuses object dtypes, so the check is driven directly.
    header = types.SimpleNamespace(dtype=np.dtype(object), attrs={}, growable=False, offset=0)
    with h5py.File(tmp_path / "out.h5", "w") as h5, pytest.raises(mmstore.UnsupportedDtypeError) as info:
        _hdf5._write_dataset(h5, "x", header, (3,), -1, None, None, None)
    assert "dataset 'x': HDF5 cannot store dtype object" in str(info.value)


# --- temp files of killed exports -----------------------------------------------------


def export_temps(directory: Path, output: str = "out.h5") -> list[Path]:
    return sorted(
        path for path in directory.iterdir() if re.fullmatch(rf"\.{re.escape(output)}\.[0-9a-f]{{16}}\.tmp", path.name)
    )


DATASET_ROWS = 8 * 2**20  # 64 MiB of float64 per dataset


def check_output(out: Path, expected: dict[str, float]) -> None:
    with h5py.File(out, "r") as h5:
        assert sorted(h5) == sorted(expected)
        for name, value in expected.items():
            column = h5[name][...]
            assert column.shape == (DATASET_ROWS,) and (column == value).all()


@contextmanager
def paused_export(tmp_path: Path, spawn, expected: dict[str, float], after: str) -> Iterator[tuple[Any, Any, Path]]:
    """A child process exporting a store of ``expected`` constant datasets to out.h5, paused
    once ``after`` is written: yields (child, release event, its temp file); kills it at exit."""
    store_path = tmp_path / "s"
    with mmstore.Store(store_path) as store:
        for name, value in expected.items():
            store.put(name, np.full(DATASET_ROWS, value))
    reached, release = spawn.Event(), spawn.Event()
    args = (str(store_path), str(tmp_path / "out.h5"), after, reached, release, PROCESS_TIMEOUT)
    child = spawn.Process(target=workers.export_pausing, args=args)
    child.start()
    try:
        assert reached.wait(PROCESS_TIMEOUT), f"the export never reached {after}"
        (temp,) = export_temps(tmp_path)
        assert not writer_is_gone(str(temp))  # the live exporter holds its liveness lock
        yield child, release, temp
    finally:
        if child.is_alive():
            child.kill()
        child.join(PROCESS_TIMEOUT)


def test_sigkilled_export_leaves_a_temp_file_that_the_next_export_removes(tmp_path: Path, spawn) -> None:
    out, expected = tmp_path / "out.h5", {"d0": 0.0, "d1": 1.0, "d2": 2.0}
    with paused_export(tmp_path, spawn, expected, after="d1") as (child, _release, temp):
        child.kill()
        child.join(PROCESS_TIMEOUT)
    assert child.exitcode == -signal.SIGKILL
    assert not out.exists()
    assert export_temps(tmp_path) == [temp] and temp.stat().st_size >= 2 * DATASET_ROWS * 8
    assert writer_is_gone(str(temp))

    with mmstore.Store(tmp_path / "s", "r") as store:
        assert sorted(mmstore.export_hdf5(store, out)) == sorted(expected)
    check_output(out, expected)
    assert sorted(os.listdir(tmp_path)) == ["out.h5", "s"], "the dead export's temp file was removed"


def test_a_second_export_never_removes_a_live_exports_temp_file(tmp_path: Path, spawn) -> None:
    out, expected = tmp_path / "out.h5", {"d0": 0.0, "d1": 1.0}
    with paused_export(tmp_path, spawn, expected, after="d0") as (child, release, live):
        size = live.stat().st_size
        with mmstore.Store(tmp_path / "s", "r") as store:  # the same target, while the first is paused
            mmstore.export_hdf5(store, out)
        check_output(out, expected)
        assert export_temps(tmp_path) == [live] and live.stat().st_size == size
        release.set()
        child.join(PROCESS_TIMEOUT)
    assert child.exitcode == 0  # its rename found its temp file: both exports completed
    check_output(out, expected)
    assert sorted(os.listdir(tmp_path)) == ["out.h5", "s"]


def test_export_removes_only_dead_temp_files_of_its_own_output(tmp_path: Path) -> None:
    with mmstore.Store(tmp_path / "s") as store:
        store.put("x", np.arange(10))
    dead = [tmp_path / ".out.h5.0123456789abcdef.tmp", tmp_path / ".out.h5.fedcba9876543210.tmp"]
    others = [
        tmp_path / ".other.h5.0123456789abcdef.tmp",  # another output's
        tmp_path / ".out.h5.notes.tmp",  # not a name an export makes
        tmp_path / ".out.h5.0123456789abcdef.tmp.keep",
    ]
    for path in dead + others:
        path.write_bytes(b"half an export")
    held = tmp_path / ".out.h5.00000000000000aa.tmp"  # a live export's: its liveness lock is held
    held.write_bytes(b"being written")
    fd = os.open(held, os.O_RDONLY)
    try:
        assert mark_alive(fd, shared=True)
        with mmstore.Store(tmp_path / "s", "r") as store:
            mmstore.export_hdf5(store, tmp_path / "out.h5")
        assert all(not path.exists() for path in dead)
        assert all(path.exists() for path in [*others, held])
    finally:
        os.close(fd)
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert h5["x"][...].tolist() == list(range(10))


def test_export_whose_fresh_temp_file_is_being_probed_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A concurrent export's cleanup probing our temp file before we lock it may remove it:
    # the export must not write into it but take a new one.
    calls = []

    def probed_once(fd: int, *, shared: bool = False) -> bool:
        calls.append(fd)
        return len(calls) > 1 and mark_alive(fd, shared=shared)

    monkeypatch.setattr(_locks, "mark_alive", probed_once)  # (as hold_new_file calls it)
    with mmstore.Store(tmp_path / "s") as store:
        store.put("x", np.arange(10))
        assert mmstore.export_hdf5(store, tmp_path / "out.h5") == ["x"]
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == ["out.h5", "s"]
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert h5["x"][...].tolist() == list(range(10))


def test_export_and_import_take_store_paths(tmp_path: Path) -> None:
    source, copy = tmp_path / "source", tmp_path / "copy"
    with mmstore.Store(source) as store:
        store.put("g/x", np.arange(12).reshape(3, 4), attrs={"unit": "m"})
    assert mmstore.export_hdf5(source, tmp_path / "out.h5") == ["g/x"]
    imported, skipped = mmstore.import_hdf5(tmp_path / "out.h5", copy)
    assert imported == ["g/x"] and skipped == {}
    with mmstore.Store(copy, "r") as store:
        np.testing.assert_array_equal(store.get("g/x"), np.arange(12).reshape(3, 4))
        assert store.attrs("g/x") == {"unit": "m"}
    with pytest.raises(mmstore.StoreNotFoundError):
        mmstore.export_hdf5(tmp_path / "missing", tmp_path / "never.h5")
    assert not (tmp_path / "never.h5").exists()


def test_recovery_keeps_a_live_exports_temp_file_inside_the_store(tmp_path: Path) -> None:
    """`mmstore compact S S/out.h5`: the export's temp file looks like a temp sidecar of a
    dataset named out.h5; a writable open's recovery must not remove it while it is live."""
    root = tmp_path / "store"
    with mmstore.Store(root) as store:
        store.put("x", np.arange(3))
    temp = root / ".out.h5.0123456789abcdef.tmp"
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        assert mark_alive(fd, shared=True)
        with mmstore.Store(root):  # recovery runs
            pass
        assert temp.exists()
    finally:
        os.close(fd)  # the exporter is gone
    with mmstore.Store(root) as store:
        np.testing.assert_array_equal(store.get("x"), np.arange(3))
    assert not temp.exists()
