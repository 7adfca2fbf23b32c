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
