"""mmstore.dask: dataset-backed dask arrays (to_dask) and parallel atomic writes (from_dask).

Real processes throughout: the multiprocessing scheduler, a distributed LocalCluster with
worker processes, a builder process that exits, a writer killed with SIGKILL mid-compute.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmstore

da = pytest.importorskip("dask.array")
mmdask = pytest.importorskip("mmstore.dask")

from tests import dask_workers  # noqa: E402
from tests.conftest import PROCESS_TIMEOUT, store_files  # noqa: E402

GENOMIC = np.dtype([("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")])


def _owns_data(block: np.ndarray) -> np.ndarray:
    """One flag per block: did the task get a copy (owndata or writeable) instead of a view of the map?"""
    return np.array([block.flags.owndata or block.flags.writeable]).reshape((1,) * block.ndim)


def _sample(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    out = raw.view(dtype).reshape(shape)
    if out.dtype.kind == "f":
        out = np.nan_to_num(out)
    return out


@pytest.mark.parametrize(
    ("dtype", "shape", "chunks"),
    [
        ("<f8", (1000, 37), (128, 10)),
        (">i4", (300,), 64),
        (GENOMIC, (257,), 100),
        ("<c16", (7, 5, 3), (2, 5, 1)),
        ("M8[ns]", (50,), 7),
        ("<u2", (), ()),
        ("<f4", (0, 4), (1, 4)),
    ],
)
def test_to_dask_round_trips_every_kind(store: mmstore.Store, dtype: Any, shape: tuple[int, ...], chunks: Any) -> None:
    value = _sample(dtype, shape)
    store.put("g/data", value)
    darr = mmdask.to_dask(store.path, "g/data", chunks=chunks)
    assert darr.shape == value.shape and darr.dtype == value.dtype
    out = darr.compute(scheduler="threads")
    assert out.dtype == value.dtype and out.tobytes() == value.tobytes()


def test_tasks_carry_no_data_and_read_views_of_the_map(store: mmstore.Store) -> None:
    value = np.arange(2_000_000, dtype="f8").reshape(2000, 1000)  # 16 MB
    store.put("big", value)
    darr = mmdask.to_dask(store, "big", chunks=(250, 1000))
    graph = dict(darr.__dask_graph__())
    assert len(pickle.dumps(graph)) < 20_000  # the graph holds the store path and header, not 16 MB of chunks
    pinned = [v for v in graph.values() if isinstance(v, mmdask.PinnedDataset)]
    assert len(pinned) == 1 and pinned[0].generation == 1
    copies = darr.map_blocks(_owns_data, dtype=bool, chunks=(1, 1)).compute(scheduler="threads")
    assert copies.shape == (8, 1) and not copies.any()
    assert float(darr.sum().compute(scheduler="threads")) == float(value.sum())


def test_multiprocessing_scheduler_reads_in_worker_processes(store: mmstore.Store) -> None:
    value = _sample("<i8", (4000, 8), seed=3)
    store.put("x", value)
    darr = mmdask.to_dask(str(store.path), "x", chunks=(500, 8))
    assert int(darr.sum().compute(scheduler="processes", num_workers=2)) == int(value.sum())
    copies = darr.map_blocks(_owns_data, dtype=bool, chunks=(1, 1)).compute(scheduler="processes", num_workers=2)
    assert not copies.any()


@pytest.mark.parametrize("change", ["replace", "delete"])
@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_graph_is_pinned_to_its_generation(store: mmstore.Store, change: str, scheduler: str) -> None:
    old = np.full((1000, 10), 1.0)
    store.put("x", old)
    darr = mmdask.to_dask(store.path, "x", chunks=(100, 10))
    total = darr.sum()
    # Another writer changes the dataset after the graph was built (its old file is unlinked).
    with mmstore.Store(store.path) as other:
        if change == "replace":
            other.put("x", np.full((1000, 10), 2.0))
        else:
            other.delete("x")
    assert not os.path.exists(darr.__dask_graph__()[_pinned_key(darr)].data_path)
    assert float(total.compute(scheduler=scheduler)) == 10_000.0  # every block from generation 1
    np.testing.assert_array_equal(darr.compute(scheduler=scheduler), old)
    if change == "replace":
        fresh = mmdask.to_dask(store.path, "x", chunks=(100, 10))
        assert float(fresh.sum().compute(scheduler=scheduler)) == 20_000.0
        assert fresh.name != darr.name


def _pinned_key(darr: Any) -> Any:
    graph = darr.__dask_graph__()
    (key,) = [k for k, v in dict(graph).items() if isinstance(v, mmdask.PinnedDataset)]
    return key


def test_generation_gone_once_its_builder_exits(store: mmstore.Store, tmp_path: Path, spawn: Any) -> None:
    store.put("x", np.arange(256.0))
    out = tmp_path / "graph.pickle"
    child = spawn.Process(target=dask_workers.pickle_pinned_array, args=(str(store.path), "x", str(out)))
    child.start()
    child.join(PROCESS_TIMEOUT)
    assert child.exitcode == 0
    darr = pickle.loads(out.read_bytes())
    assert float(darr.sum().compute(scheduler="sync")) == float(np.arange(256.0).sum())  # file still in place
    mmdask._maps.clear()  # forget this process's map, as a fresh worker would have none
    store.put("x", np.zeros(256))
    with pytest.raises(mmstore.GenerationGoneError, match=r"'x'.*generation 1.*to_dask") as caught:
        darr.sum().compute(scheduler="sync")
    assert isinstance(caught.value, FileNotFoundError)


def test_growable_dataset_is_pinned_to_its_committed_length(store: mmstore.Store) -> None:
    with store.create("log", dtype="<i8", shape=(0, 2), growable=True) as writer:
        writer.append(np.arange(200).reshape(100, 2))
        writer.flush()
        darr = mmdask.to_dask(store, "log", chunks=(30, 2))
        writer.append(np.full((50, 2), -1))
        writer.flush()
    assert darr.shape == (100, 2)
    np.testing.assert_array_equal(darr.compute(scheduler="processes", num_workers=2), np.arange(200).reshape(100, 2))
    assert mmdask.to_dask(store, "log").shape == (150, 2)


def test_to_dask_errors(store: mmstore.Store) -> None:
    with pytest.raises(mmstore.DatasetNotFoundError):
        mmdask.to_dask(store, "missing")
    with pytest.raises(mmstore.InvalidNameError):
        mmdask.to_dask(store, "../x")
    with pytest.raises(mmstore.StoreNotFoundError):
        mmdask.to_dask(os.path.join(store.path, "nowhere"), "x")


@pytest.mark.parametrize(
    ("dtype", "shape", "chunks"),
    [
        ("<f8", (1000, 37), (128, 37)),  # whole rows: one pwrite per block
        ("<f8", (1000, 37), (128, 10)),  # column blocks: written through a map
        (GENOMIC, (513,), 100),
        (">i2", (6, 7, 8), (4, 3, 8)),
        ("<u1", (), ()),
        ("<f4", (0, 3), (5, 3)),
    ],
)
@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_from_dask_writes_in_parallel(
    store: mmstore.Store, dtype: Any, shape: tuple[int, ...], chunks: Any, scheduler: str
) -> None:
    value = _sample(dtype, shape, seed=7)
    store.put("out", np.zeros(3))
    mmdask.from_dask(da.from_array(value, chunks=chunks), store, "out", attrs={"src": "dask"}, scheduler=scheduler)
    got = store.get("out")
    assert got.dtype == value.dtype and got.shape == value.shape and got.tobytes() == value.tobytes()
    info = store.info("out")
    assert info["generation"] == 2 and info["attrs"] == {"src": "dask"}
    assert store.verify().ok
    assert [f for f in store_files(store.path) if f.endswith(".dat")] == [os.path.basename(info["data_file"])]


def test_from_dask_store_path_and_durable(store_path: Path) -> None:
    value = np.arange(10_000, dtype="<i4").reshape(100, 100)
    with mmstore.Store(store_path):
        pass
    mmdask.from_dask(da.from_array(value, chunks=(33, 50)), store_path, "a/b", durable=True)
    with mmstore.Store(store_path, mode="r") as store:
        np.testing.assert_array_equal(store.get("a/b"), value)
        assert store.info("a/b")["checksum"].startswith("xxh3_64:")


def _fail_on_third(block: np.ndarray, block_info: Any = None) -> np.ndarray:
    if block_info[0]["chunk-location"][0] == 2:
        raise RuntimeError("block 2 failed")
    return block


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_failed_computation_leaves_previous_value(store: mmstore.Store, scheduler: str) -> None:
    old = np.arange(50.0)
    store.put("x", old)
    before = store_files(store.path)
    darr = da.ones((400, 3), chunks=(100, 3)).map_blocks(_fail_on_third, dtype="f8")
    with pytest.raises(RuntimeError, match="block 2 failed"):
        mmdask.from_dask(darr, store, "x", scheduler=scheduler)
    np.testing.assert_array_equal(store.get("x"), old)
    assert store.info("x")["generation"] == 1
    assert store_files(store.path) == before  # the staging file is gone


def test_killed_computation_leaves_previous_value(store: mmstore.Store, spawn: Any) -> None:
    old = np.arange(50.0)
    store.put("x", old)
    before = store_files(store.path)
    started, release = spawn.Event(), spawn.Event()
    child = spawn.Process(target=dask_workers.from_dask_until_killed, args=(str(store.path), "x", started, release))
    child.start()
    try:
        assert started.wait(PROCESS_TIMEOUT), "the child never reached its second block"
        staged = set(store_files(store.path)) - set(before)
        assert any(f.endswith(".dat") for f in staged)  # a preallocated staging file exists mid-compute
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(PROCESS_TIMEOUT)
    assert child.exitcode == -signal.SIGKILL
    with mmstore.Store(store.path) as reopened:  # a writable open runs recovery
        np.testing.assert_array_equal(reopened.get("x"), old)
        assert reopened.info("x")["generation"] == 1
    assert store_files(store.path) == before


def test_from_dask_refuses_bad_input(store: mmstore.Store) -> None:
    with pytest.raises(TypeError, match="dask array"):
        mmdask.from_dask(np.zeros(3), store, "x")
    unknown = da.from_array(np.arange(10), chunks=5)
    unknown = unknown[unknown > 3]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        mmdask.from_dask(unknown, store, "x")
    with pytest.raises(mmstore.UnsupportedDtypeError):
        mmdask.from_dask(da.from_array(np.array([1, "a"], dtype=object), chunks=1), store, "x")
    with pytest.raises(mmstore.InvalidNameError):
        mmdask.from_dask(da.zeros(3, chunks=1), store, "a/../b")
    with mmstore.Store(store.path, mode="r") as reader, pytest.raises(mmstore.ReadOnlyError):
        mmdask.from_dask(da.zeros(3, chunks=1), reader, "x")
    assert "x" not in store


def test_full_disk_fails_before_computing(store: mmstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    calls = []

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def never(block: np.ndarray) -> np.ndarray:
        calls.append(1)
        return block

    store.put("x", np.arange(5))
    darr = da.ones(100, chunks=10).map_blocks(never, dtype="f8")
    calls.clear()
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(mmstore.StoreFullError):
        mmdask.from_dask(darr, store, "x", scheduler="threads")
    assert calls == []
    np.testing.assert_array_equal(store.get("x"), np.arange(5))


@pytest.fixture(scope="module")
def client() -> Any:
    """A distributed.LocalCluster of 2 worker processes (1 thread each), shared by the tests below."""
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,
        distributed.Client(cluster) as connected,
    ):
        yield connected


def test_local_cluster_with_worker_processes(store: mmstore.Store, client: Any) -> None:
    value = np.random.default_rng(11).standard_normal((3000, 50))
    store.put("x", value)
    darr = mmdask.to_dask(store.path, "x", chunks=(500, 50))
    assert float(darr.sum().compute()) == pytest.approx(float(value.sum()))
    copies = darr.map_blocks(_owns_data, dtype=bool, chunks=(1, 1)).compute()
    assert not copies.any()  # each worker process slices its own read-only map
    worker_pids = set(client.run(os.getpid).values())
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids

    mmdask.from_dask(darr * 2 + 1, store, "y")
    np.testing.assert_array_equal(store.get("y"), value * 2 + 1)

    store.put("x", np.zeros((3000, 50)))  # the graph still reads generation 1
    assert float(darr.sum().compute()) == pytest.approx(float(value.sum()))
    assert store.verify().ok


def test_cluster_route_through_hdf5(store: mmstore.Store, tmp_path: Path, client: Any) -> None:
    """docs/DASK.md's route for clusters: compact to HDF5, read with da.from_array(h5py.File(...))."""
    import h5py

    value = np.arange(60_000, dtype="<i8").reshape(600, 100)
    store.put("images/train", value, attrs={"unit": "px"})
    mmstore.export_hdf5(store, tmp_path / "data.h5")
    with h5py.File(tmp_path / "data.h5", "r") as h5:
        darr = da.from_array(h5["images/train"], chunks=(100, 100))
        assert int(darr.sum().compute()) == int(value.sum())
        np.testing.assert_array_equal(darr[::7].compute(), value[::7])


def test_a_process_keeps_one_generation_of_each_dataset_mapped(store: mmstore.Store) -> None:
    """A long-lived worker must not keep replaced generations (and their disk space) mapped."""
    store.put("x", np.arange(100.0))
    first = mmdask.to_dask(store, "x", chunks=50)
    assert float(first.sum().compute(scheduler="sync")) == 4950.0
    store.put("x", np.ones(100))
    second = mmdask.to_dask(store, "x", chunks=50)
    assert float(second.sum().compute(scheduler="sync")) == 100.0
    kept = [identity for (root, name), (identity, _rows) in mmdask._maps.items() if root == store.path and name == "x"]
    assert kept == [_pinned(second).generation_identity]
    assert float(first.sum().compute(scheduler="sync")) == 4950.0  # the old graph maps its generation again


def _pinned(darr: Any) -> Any:
    return darr.__dask_graph__()[_pinned_key(darr)]


def test_to_dask_refuses_symlinked_groups_and_missing_files(store: mmstore.Store, tmp_path: Path) -> None:
    store.put("grp/x", np.arange(10))
    outside = tmp_path / "outside"
    os.rename(os.path.join(store.path, "grp"), outside)
    os.symlink(outside, os.path.join(store.path, "grp"))
    with pytest.raises(mmstore.FormatError, match="grp"):
        mmdask.to_dask(store.path, "grp/x")
    store.put("y", np.arange(10))
    os.unlink(store.info("y")["data_file"])
    with pytest.raises(mmstore.FormatError, match=r"'y'.*missing"):
        mmdask.to_dask(store.path, "y")
