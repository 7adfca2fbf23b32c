"""HDF5 export and import: exact dtypes and attrs, streamed, and never a partial output file."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import mmstore
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
    assert all(name.endswith(".tmp") for name in leftovers)  # hidden temp files of killed exports, never out.h5
