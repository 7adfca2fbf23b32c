"""HDF5 export and import against the contract (DESIGN.md "HDF5 compaction", docs/HDF5.md):
what tests/test_hdf5.py does not already pin down, found by an audit of compact/import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import mmstore
from tests.conftest import PROCESS_TIMEOUT
from tests.test_cli import mmstore_cli, one_line_error

# --- streaming: bounded blocks, whole chunks ------------------------------------------


def recorded_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[slice, ...]]]:
    """Every selection the export writes through h5py, as (dataset name, slices)."""
    writes: list[tuple[str, tuple[slice, ...]]] = []
    original = h5py.Dataset.__setitem__

    def record(self: h5py.Dataset, where: Any, value: Any) -> None:
        writes.append((self.name, where if isinstance(where, tuple) else (where,)))
        original(self, where, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", record)
    return writes


@pytest.mark.parametrize("chunks", [(5000,), True, (3000, 48)], ids=str)
def test_every_block_an_export_writes_covers_whole_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: bool | tuple[int, ...]
) -> None:
    # A block that ends inside a compressed chunk makes HDF5 read that chunk back, inflate,
    # merge and compress it again at the next block: with --chunks 100000 on 1 KiB rows an
    # export took 22x as long (blocks of 4096 rows never matched chunks of 5000 rows).
    array = np.random.default_rng(0).integers(0, 50, (20_000, 128), dtype=np.int64)
    with mmstore.Store(tmp_path / "s") as store:
        store.put("x", array)
    writes = recorded_writes(monkeypatch)
    mmstore.export_hdf5(tmp_path / "s", tmp_path / "out.h5", compression="lzf", chunks=chunks)
    monkeypatch.undo()
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        chunk_shape = h5["x"].chunks
        assert (h5["x"][...] == array).all()
    assert writes
    for _name, where in writes:
        for part, size, extent in zip(where, chunk_shape, array.shape, strict=True):
            assert part.start % size == 0, (where, chunk_shape)
            assert part.stop % size == 0 or part.stop == extent, (where, chunk_shape)


def test_an_explicit_chunk_shape_is_cut_to_a_bounded_chunk(tmp_path: Path) -> None:
    # --chunks 1000 on rows of 512 KiB asked for 32 MiB chunks, which HDF5 holds whole in
    # memory to compress (and refuses beyond 4 GiB): the shape is an upper bound, cut on
    # its leading axis to at most 16 MiB (docs/HDF5.md "Options").
    rows = np.arange(64 * 2**19, dtype=np.uint32).astype(np.uint8).reshape(64, 2**19)
    with mmstore.Store(tmp_path / "s") as store:
        store.put("x", rows)
        store.put("names", np.array(["abc"] * 2**20, "<U4"))  # 16 MiB of code points
        mmstore.export_hdf5(store, tmp_path / "out.h5", compression="gzip", chunks=(1000,))
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert h5["x"].chunks == (32, 2**19)  # 16 MiB; the later axis stays whole
        assert (h5["x"][...] == rows).all()
        chunk = h5["names"].chunks
        assert chunk[1] == 4 and np.prod(chunk) * 4 <= 16 * 2**20  # the code points stay whole
    with mmstore.Store(tmp_path / "back") as back:
        mmstore.import_hdf5(tmp_path / "out.h5", back)
        assert back.get("x").tobytes() == rows.tobytes()
        assert (back.get("names") == "abc").all()


# VmHWM, not ru_maxrss: that one keeps the high-water mark of the parent that forked us.
EXPORT_RSS = """
import sys
import h5py, numpy, mmstore

def peak_rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

store = mmstore.Store(sys.argv[1], "r")
before = peak_rss()
mmstore.export_hdf5(store, sys.argv[2])
print(peak_rss() - before)
"""


def test_export_of_rows_larger_than_a_block_stays_in_bounded_memory(tmp_path: Path) -> None:
    # Blocks were whole rows: a dataset of two 64 MiB rows (an image stack, say) was mapped
    # a row at a time, so the exporter's RSS grew by a whole row, however large.
    row = 64 * 2**20
    with mmstore.Store(tmp_path / "s") as store:
        store.put("frames", np.arange(2 * row, dtype=np.uint32).astype(np.uint8).reshape(2, row))
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_RSS, str(tmp_path / "s"), str(tmp_path / "out.h5")],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout)
    assert grown < 32 * 2**20, f"the export's peak RSS grew by {grown / 2**20:.1f} MiB"
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        for i in range(2):
            expected = (np.arange(i * row, (i + 1) * row, dtype=np.uint32) % 256).astype(np.uint8)
            assert (h5["frames"][i] == expected).all()


# --- read-only stores ---------------------------------------------------------------------

AS_NOBODY_EXPORT = """
import os, sys
import h5py, mmstore, mmstore._hdf5
if os.geteuid() == 0:
    os.setgid(65534); os.setuid(65534)  # chmod does not bind root
print(mmstore.export_hdf5(sys.argv[1], sys.argv[2]))
"""


def test_a_store_its_user_may_not_write_exports() -> None:
    """DESIGN.md: readers need no write permission; an export is a reader of the store."""
    top = Path(tempfile.mkdtemp(prefix="mmstore-ro-export-"))  # (tmp_path is root's alone)
    try:
        top.chmod(0o755)
        root = top / "s"
        with mmstore.Store(root) as store:
            store.put("g/x", np.arange(5), attrs={"unit": "m"})
            with store.create("log", np.int32, (0,), growable=True) as writer:
                writer.append(np.arange(3))
                writer.flush()
        for directory, _dirs, files in os.walk(root):
            os.chmod(directory, 0o555)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o444)
        outputs = top / "out"
        outputs.mkdir()
        outputs.chmod(0o777)
        result = subprocess.run(
            [sys.executable, "-c", AS_NOBODY_EXPORT, str(root), str(outputs / "o.h5")],
            capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "['g/x', 'log']"
        with h5py.File(outputs / "o.h5", "r") as h5:
            assert h5["g/x"][...].tolist() == list(range(5)) and h5["log"][...].tolist() == [0, 1, 2]
            assert h5["g/x"].attrs["unit"] == "m"
        assert sorted(os.listdir(outputs)) == ["o.h5"]
    finally:
        for directory, _dirs, _files in os.walk(top):
            os.chmod(directory, 0o755)
        shutil.rmtree(top)


# --- import of HDF5 files that compact did not write ----------------------------------


def test_import_keeps_every_name_of_a_hard_linked_dataset_or_group(tmp_path: Path) -> None:
    # visititems() visits an object once, under its first name: 'g/b' (a second hard link
    # to the dataset 'a') and 'grp/d' (reached first through the group's other name 'alias')
    # were silently missing from the store, neither imported nor listed as skipped.
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["a"] = np.arange(3)
        h5["g/b"] = h5["a"]
        h5["grp/d"] = np.arange(2.0)
        h5["alias"] = h5["grp"]
        h5["grp/loop"] = h5["grp"]  # a group that holds itself
    with mmstore.Store(tmp_path / "s") as store:
        imported, skipped = mmstore.import_hdf5(tmp_path / "in.h5", store)
        assert imported == ["a", "alias/d", "g/b", "grp/d"]
        assert set(skipped) == {"alias/loop", "grp/loop"}
        assert all("hard link to a group that holds it" in reason for reason in skipped.values())
        assert store.get("g/b").tolist() == [0, 1, 2] and store.get("grp/d").tolist() == [0.0, 1.0]


def test_an_attribute_json_cannot_hold_does_not_cost_the_dataset(tmp_path: Path) -> None:
    # netCDF-style files carry NaN fill values: the whole dataset was skipped ("attrs must
    # be JSON-serialisable: Out of range float values ..."). Now only that attribute is left
    # out (docs/HDF5.md), and byte strings in lists come back as text like single ones.
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["t"] = np.arange(4.0)
        h5["t"].attrs["_FillValue"] = np.nan
        h5["t"].attrs["limits"] = np.array([0.0, np.inf])
        h5["t"].attrs["units"] = "K"
        h5["t"].attrs["flags"] = np.array([b"ok", b"bad"])
        h5["t"].attrs["ref"] = h5["t"].ref
    with mmstore.Store(tmp_path / "s") as store:
        assert mmstore.import_hdf5(tmp_path / "in.h5", store) == (["t"], {})
        assert store.attrs("t") == {"units": "K", "flags": ["ok", "bad"]}
        assert store.get("t").tolist() == [0.0, 1.0, 2.0, 3.0]


# --- options --------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [1000, np.int64(4), 2.5], ids=repr)
def test_a_chunk_option_that_is_not_a_shape_is_a_clear_error(tmp_path: Path, chunks: Any) -> None:
    # chunks=1000 raised a bare "TypeError: 'int' object is not iterable".
    with mmstore.Store(tmp_path / "s") as store:
        store.put("x", np.arange(10))
        with pytest.raises(mmstore.MmstoreError, match=r"chunks must be None, True or a tuple.*\(1000,\)"):
            mmstore.export_hdf5(store, tmp_path / "out.h5", chunks=chunks)
    assert os.listdir(tmp_path) == ["s"]


def test_only_that_selects_nothing_is_an_error_not_an_empty_file(tmp_path: Path) -> None:
    # A typo in --only wrote an empty out.h5 and said "wrote 0 datasets", exit 0.
    with mmstore.Store(tmp_path / "s") as store:
        store.put("genome/a", np.arange(3))
        with pytest.raises(mmstore.DatasetNotFoundError, match="'genme'"):
            mmstore.export_hdf5(store, tmp_path / "out.h5", only="genme")
        assert mmstore.export_hdf5(tmp_path / "s", tmp_path / "all.h5") == ["genome/a"]
    assert sorted(os.listdir(tmp_path)) == ["all.h5", "s"]
    result = mmstore_cli("compact", str(tmp_path / "s"), str(tmp_path / "out.h5"), "--only", "genme", check=False)
    assert result.returncode == 1 and "'genme'" in one_line_error(result)
    assert not (tmp_path / "out.h5").exists()
    with mmstore.Store(tmp_path / "back") as back, pytest.raises(mmstore.DatasetNotFoundError, match="'genme'"):
        mmstore.import_hdf5(tmp_path / "all.h5", back, only="genme")
    result = mmstore_cli("import", str(tmp_path / "all.h5"), str(tmp_path / "back"), "--only", "genme", check=False)
    assert result.returncode == 1 and "'genme'" in one_line_error(result)
    with mmstore.Store(tmp_path / "back", "r") as back:
        assert back.keys() == []


def test_import_reports_progress_within_a_large_dataset(tmp_path: Path) -> None:
    # Progress was reported once per dataset, after it was stored: `mmstore import` of one
    # large dataset showed a bar that did not move until the end (and whose total was the
    # file's size, which compression makes smaller than the bytes imported).
    rows = np.arange(10 * 2**20, dtype=np.float64)  # 80 MiB: three of import's 32 MiB blocks
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["big"] = rows
        h5["empty"] = np.zeros(0)
    calls: list[tuple[str, int, int]] = []
    with mmstore.Store(tmp_path / "s") as store:
        mmstore.import_hdf5(tmp_path / "in.h5", store, progress=lambda *call: calls.append(call))
        assert store.get("big").tobytes() == rows.tobytes()
    big = [(done, total) for name, done, total in calls if name == "big"]
    assert len(big) >= 3 and all(total == rows.nbytes for _done, total in big)
    assert [done for done, _total in big] == sorted({done for done, _total in big})  # growing
    assert big[0][0] < rows.nbytes and big[-1][0] == rows.nbytes
    assert ("empty", 0, 0) in calls


# --- what docs/HDF5.md says of existing outputs and datasets ----------------------------


def test_compact_replaces_an_existing_output_and_import_replaces_same_named_datasets(tmp_path: Path) -> None:
    store_path, out = tmp_path / "s", tmp_path / "out.h5"
    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(3), attrs={"v": 1})
    out.write_bytes(b"an older export")
    mmstore_cli("compact", str(store_path), str(out))
    with h5py.File(out, "r") as h5:
        assert h5["x"][...].tolist() == [0, 1, 2]
    with mmstore.Store(tmp_path / "back") as back:
        back.put("x", np.zeros(5), attrs={"v": 0})
        back.put("kept", np.ones(2))
    mmstore_cli("import", str(out), str(tmp_path / "back"))
    with mmstore.Store(tmp_path / "back", "r") as back:
        assert back.keys() == ["kept", "x"]
        assert back.get("x").tolist() == [0, 1, 2] and back.attrs("x") == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["back", "out.h5", "s"]
