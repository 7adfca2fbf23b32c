"""Store(pack_small=True): small generations appended to a dataset's packed data file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmstore
from mmstore._format import PACKED_ALIGNMENT, PACKED_MAX_NBYTES
from mmstore._writes import PACK_FILE_BYTES, PACK_MAX_NBYTES
from tests import workers
from tests.conftest import PROCESS_TIMEOUT, run_in_fork, store_files


@pytest.fixture
def packing(store_path: Path) -> Any:
    with mmstore.Store(store_path, pack_small=True) as opened:
        yield opened


def sidecar(store_path: Path, name: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((store_path / f"{name}.json").read_bytes())
    return record


def data_files(store_path: Path) -> list[str]:
    return [name for name in store_files(store_path) if name.endswith(".dat")]


def open_deleted_files(store_path: Path) -> list[str]:
    """Data files of the store this process holds open that were unlinked (their space
    stays taken). Only this store's: other tests may leave pinned files to the GC."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(store_path) + "/") and target.endswith(".dat (deleted)"):
            found.append(target)
    return found


GENOMIC = [("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")]
SMALL_VALUES = [
    np.arange(10, dtype=np.int64),
    np.array(3.5),  # 0-d
    np.zeros((0, 3), np.float32),  # empty
    np.arange(12, dtype=">u4").reshape(3, 4),  # big-endian
    np.arange(20.0)[::2],  # not contiguous: stored C-contiguous
    np.array(
        [(b"chr1", 5, 0.5, 1, 2)], dtype=[("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")]
    ),
    np.array(["ab", "cde"], dtype="<U3"),
    np.array([1 + 2j, 3 - 4j], dtype=np.complex128),
    np.array(["2024-01-01", "NaT"], dtype="datetime64[s]"),
    np.ones(PACK_MAX_NBYTES // 8),  # the largest packed size
]


def test_small_values_round_trip_bit_exactly(packing: mmstore.Store, store_path: Path) -> None:
    snapshots = []
    for value in SMALL_VALUES:
        packing.put("x", value, attrs={"n": int(value.size)})
        got = packing.get("x")
        assert got.dtype == value.dtype and got.shape == value.shape
        assert got.tobytes() == np.ascontiguousarray(value).tobytes()
        assert not got.flags.writeable
        record = sidecar(store_path, "x")
        if value.nbytes:
            assert record["packed"] is True and record["version"] == 2 and record["offset"] % PACKED_ALIGNMENT == 0
        else:  # an empty array gets a file of its own (it has no bytes to place after the last ones)
            assert "packed" not in record and record["version"] == 1
        assert packing.attrs("x") == {"n": int(value.size)}
        snapshots.append((value, got))
    assert packing.info("x")["generation"] == len(SMALL_VALUES)
    assert len(data_files(store_path)) == 1
    assert packing.verify().ok
    for value, got in snapshots:  # no later generation wrote over an earlier one
        assert got.tobytes() == np.ascontiguousarray(value).tobytes()


def test_an_empty_put_between_packed_ones_overwrites_nothing(packing: mmstore.Store) -> None:
    packing.put("x", np.arange(8))
    first = packing.get("x")
    packing.put("x", np.zeros(0))
    packing.put("x", np.full(8, 99))
    packing.put("x", np.full(8, 98))
    assert first.tolist() == list(range(8))
    assert packing.get("x").tolist() == [98] * 8


def test_replacements_append_and_never_touch_committed_generations(packing: mmstore.Store, store_path: Path) -> None:
    snapshots = []
    files_seen = set()
    for k in range(2 * PACK_FILE_BYTES // 1024):
        packing.put("x", np.full(128, k, dtype=np.int64))  # 1 KiB
        snapshots.append((k, packing.get("x")))
        files_seen.add(sidecar(store_path, "x")["data_file"])
        (current,) = data_files(store_path)  # rolled-over files are unlinked at once
        assert os.path.getsize(store_path / current) <= PACK_FILE_BYTES
    assert len(files_seen) > 1, "the packed file rolled over"
    packing.delete("x")
    packing.close()
    for k, array in snapshots:  # old generations, in live and in unlinked files
        assert (array == k).all()


def test_large_arrays_keep_a_file_per_generation(packing: mmstore.Store, store_path: Path) -> None:
    packing.put("x", np.arange(10))
    packing.put("x", np.arange(11))  # an append: the packed file's descriptor stays with the lock
    small_file = sidecar(store_path, "x")["data_file"]
    packing.put("x", np.ones(PACK_MAX_NBYTES // 8 + 1))
    assert open_deleted_files(store_path) == []  # the replaced packed file's descriptor was not kept
    record = sidecar(store_path, "x")
    assert "packed" not in record and record["offset"] == 0
    assert data_files(store_path) == [record["data_file"]] and record["data_file"] != small_file
    packing.put("x", np.arange(5))
    assert sidecar(store_path, "x")["packed"] is True
    assert data_files(store_path) == [sidecar(store_path, "x")["data_file"]]
    for k in range(2 * PACK_FILE_BYTES // 64 - 10):  # rolls over to new packed files, ends on an append
        packing.put("x", np.full(8, k))
    packing.delete("x")
    assert open_deleted_files(store_path) == []


def test_a_default_store_reads_and_replaces_packed_datasets(
    packing: mmstore.Store, store_path: Path, spawn: Any
) -> None:
    packing.put("x", workers.pattern(1, 100))
    packing.put("x", workers.pattern(2, 100))
    queue = spawn.Queue()
    reader = spawn.Process(target=workers.get_and_report, args=(str(store_path), "x", queue))
    reader.start()
    _dtype, _shape, raw, _attrs = queue.get(timeout=PROCESS_TIMEOUT)
    reader.join(PROCESS_TIMEOUT)
    assert raw == workers.pattern(2, 100).tobytes()
    packed_file = sidecar(store_path, "x")["data_file"]
    with mmstore.Store(store_path) as plain:
        old = plain.get("x")
        plain.put("x", workers.pattern(3, 100))
        assert "packed" not in sidecar(store_path, "x")
    assert not (store_path / packed_file).exists()
    assert old.tobytes() == workers.pattern(2, 100).tobytes()


def test_an_unfinished_append_after_the_committed_generation_is_harmless(
    packing: mmstore.Store, store_path: Path
) -> None:
    packing.put("x", np.arange(100))
    packing.put("y", np.arange(3))
    record = sidecar(store_path, "x")
    with open(store_path / record["data_file"], "ab") as data:
        data.write(b"\xff" * 3000)  # what a writer killed in the middle of an append leaves
    with mmstore.Store(store_path, "r") as reader:
        assert (reader.get("x") == np.arange(100)).all()
    assert packing.verify().ok
    packing.put("x", np.arange(7))  # the next append goes over the unfinished one
    assert (packing.get("x") == np.arange(7)).all()
    assert sidecar(store_path, "x")["data_file"] == record["data_file"]


def tamper(store_path: Path, name: str, **fields: Any) -> None:
    record = sidecar(store_path, name)
    record.update(fields)
    (store_path / f"{name}.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"offset": 0}, "checksum mismatch"),  # points at the older generation
        ({"shape": [50]}, "checksum mismatch"),  # a shorter view of the same bytes
        ({"dtype": "<i4", "byteorder": "<"}, "checksum mismatch"),
        ({"offset": 1664}, "data file is"),  # past the end
        ({"offset": 8}, "multiple of"),
        ({"packed": "yes"}, "packed"),
        ({"growable": True}, "cannot be packed"),
        ({"shape": [PACKED_MAX_NBYTES // 8 + 1]}, "at most"),
        ({"version": 1}, "version 2 is for packed"),
        ({"version": 3}, "newer than this mmstore supports"),
        ({"packed": False}, "version 2 is for packed"),
    ],
)
def test_a_tampered_packed_header_is_a_format_error_for_that_dataset_only(
    packing: mmstore.Store, store_path: Path, fields: dict[str, Any], message: str
) -> None:
    packing.put("x", np.arange(100))  # offset 0, 800 bytes
    packing.put("x", np.arange(100) * 2)  # offset 832
    packing.put("y", np.arange(3))
    assert sidecar(store_path, "x")["offset"] == 832
    tamper(store_path, "x", **fields)
    with mmstore.Store(store_path, "r") as reader:
        with pytest.raises(mmstore.FormatError, match=rf"'x'.*{message}"):
            reader.get("x")
        assert (reader.get("y") == np.arange(3)).all()
        report = reader.verify()
    assert not report.ok


def test_a_planted_fifo_is_not_appended_to(packing: mmstore.Store, store_path: Path) -> None:
    packing.put("x", np.arange(4))
    record = sidecar(store_path, "x")
    os.unlink(store_path / record["data_file"])
    os.mkfifo(store_path / record["data_file"])
    packing.put("x", np.arange(6))  # a new packed file instead of hanging on the FIFO
    assert (packing.get("x") == np.arange(6)).all()
    assert sidecar(store_path, "x")["data_file"] != record["data_file"]


def test_durable_packed_put_fsyncs_data_then_sidecar_then_directory(
    packing: mmstore.Store, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packing.put("x", np.arange(4))
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    packing.put("x", np.arange(8), durable=True)
    data_path = str(store_path / sidecar(store_path, "x")["data_file"])
    assert synced[0] == data_path
    assert synced[1].startswith(str(store_path / ".x."))  # the new sidecar before its swap
    assert synced[-1] == str(store_path)


def test_packed_put_needs_a_writable_store(packing: mmstore.Store, store_path: Path) -> None:
    packing.put("x", np.arange(4))
    with mmstore.Store(store_path, "r", pack_small=True) as reader:
        with pytest.raises(mmstore.ReadOnlyError):
            reader.put("x", np.arange(2))
        assert (reader.get("x") == np.arange(4)).all()


def test_a_forked_child_appends_through_its_own_descriptors(packing: mmstore.Store) -> None:
    packing.put("x", np.arange(3))
    packing.put("x", np.arange(4))  # the parent now keeps the packed file open with the lock
    held = packing._locate("x").lock.held_file
    assert held is not None

    def child() -> int:
        if packing._locate("x").lock.held_file is not None:
            return 3  # inherited descriptors must be dropped in the child
        packing.put("x", np.arange(5))
        return 0 if packing.get("x").tolist() == list(range(5)) else 2

    assert run_in_fork(child) == 0
    assert packing.get("x").tolist() == list(range(5))
    packing.put("x", np.arange(6))  # the parent's lock and descriptor still work
    assert packing.get("x").tolist() == list(range(6))


@pytest.mark.parametrize("pack_small", [False, True], ids=["files", "packed"])
def test_in_place_edits_of_a_put_dataset_keep_it_verifiable(store_path: Path, pack_small: bool) -> None:
    with mmstore.Store(store_path, pack_small=pack_small) as store:
        store.put("x", np.arange(10))
        store.put("x", np.arange(10) * 2)
        generation = store.info("x")["generation"]
        with store.open_writer("x") as writer:
            writer[3] = 99
            assert sidecar(store_path, "x")["checksum"] is None  # cleared before the edit lands
            with mmstore.Store(store_path, "r") as reader:  # a new reader maps it meanwhile
                assert reader.get("x")[3] == 99
                assert reader.verify().ok
            writer.array[4] = 98
        record = sidecar(store_path, "x")
        # A packed generation gets its checksum back (readers check it when they map);
        # another stays without one (it would mean hashing the whole dataset at close).
        assert (record["checksum"] is not None) == pack_small
        assert record["generation"] == generation
        with mmstore.Store(store_path, "r") as reader:
            assert reader.get("x").tolist() == [0, 2, 4, 99, 98, 10, 12, 14, 16, 18]
            assert reader.verify().ok


@pytest.mark.slow
def test_readers_and_verify_never_see_an_edit_session_as_corruption(packing: mmstore.Store, spawn: Any) -> None:
    packing.put("x", np.zeros(16, dtype=np.int64))
    packing.put("x", np.zeros(16, dtype=np.int64))  # a packed generation at a non-zero offset
    started = spawn.Event()
    writer = spawn.Process(target=workers.edit_in_place_many, args=(str(packing.path), "x", 300, started))
    writer.start()
    assert started.wait(PROCESS_TIMEOUT)
    gets = verifies = 0
    with mmstore.Store(packing.path, "r") as reader:
        while writer.is_alive() or gets == 0:
            array = reader.get("x")  # a checksum mismatch here would raise FormatError
            assert array[1:].tolist() == [0] * 15
            gets += 1
            if gets % 20 == 0:
                report = reader.verify()
                assert report.ok, report.problems
                verifies += 1
    writer.join(PROCESS_TIMEOUT)
    assert writer.exitcode == 0
    assert packing.get("x")[0] == 300 and packing.verify().ok
    assert gets > 0
