"""Real processes sharing one store: writers, readers, concurrent commits."""

from __future__ import annotations

from pathlib import Path

import pytest

import mmstore
from tests import workers
from tests.conftest import PROCESS_TIMEOUT, store_files


def test_writer_process_puts_reader_process_sees_exact_bytes(store_path: Path, spawn) -> None:
    mmstore.Store(store_path).close()
    writer = spawn.Process(target=workers.put_one, args=(str(store_path), "shared/x", 42, 10_001))
    writer.start()
    writer.join(PROCESS_TIMEOUT)
    assert writer.exitcode == 0
    queue = spawn.Queue()
    reader = spawn.Process(target=workers.get_and_report, args=(str(store_path), "shared/x", queue))
    reader.start()
    dtype, shape, raw, attrs = queue.get(timeout=PROCESS_TIMEOUT)
    reader.join(PROCESS_TIMEOUT)
    expected = workers.pattern(42, 10_001)
    assert (dtype, shape) == (expected.dtype.str, expected.shape)
    assert raw == expected.tobytes()
    assert attrs == {"seed": 42}


@pytest.mark.parametrize(("n", "pack_small"), [(50_000, False), (1000, True)], ids=["files", "packed"])
def test_reader_keeps_a_valid_snapshot_while_writer_replaces_100_times(
    store_path: Path, spawn, n: int, pack_small: bool
) -> None:
    mmstore.Store(store_path).close()
    started = spawn.Event()
    writer = spawn.Process(target=workers.replace_many, args=(str(store_path), "x", 100, started, n, pack_small))
    writer.start()
    assert started.wait(PROCESS_TIMEOUT)
    snapshots = []
    with mmstore.Store(store_path, "r") as reader:
        while writer.is_alive() or not snapshots:
            array = reader.get("x")
            value = int(array[0])
            # A snapshot is one generation, whole: every element equals the first.
            assert array.shape == (n,)
            assert (array == value).all()
            snapshots.append((value, array))
            if len(snapshots) > 5000:
                break
        writer.join(PROCESS_TIMEOUT)
        assert writer.exitcode == 0
        final = reader.get("x")
        assert (final == 100).all()
    # Old snapshots stay intact after their files were unlinked by later commits.
    for value, array in snapshots:
        assert (array == value).all()
    assert 1 <= min(v for v, _ in snapshots) <= max(v for v, _ in snapshots) <= 100
    # Exactly one data file left: every replaced generation was unlinked.
    assert sum(name.endswith(".dat") for name in store_files(store_path)) == 1


@pytest.mark.parametrize("pack_small", [False, True], ids=["files", "packed"])
def test_four_concurrent_writers_lose_no_commit(store_path: Path, spawn, pack_small: bool) -> None:
    count = 50
    mmstore.Store(store_path).close()
    barrier = spawn.Barrier(4)
    writers = [
        spawn.Process(target=workers.put_many, args=(str(store_path), w, count, barrier, pack_small)) for w in range(4)
    ]
    for process in writers:
        process.start()
    for process in writers:
        process.join(PROCESS_TIMEOUT)
        assert process.exitcode == 0
    with mmstore.Store(store_path) as store:
        assert len(store) == 4 * count + 1
        for w in range(4):
            for i in range(count):
                assert (store.get(f"w{w}/d{i}") == w * 1000 + i).all()
        # The shared dataset saw every one of the 200 commits, each a new generation.
        assert store.info("shared")["generation"] == 4 * count
        last = int(store.get("shared")[0])
        assert store.attrs("shared") == {"writer": last // 1000}
        assert last % 1000 == count - 1
    data_files = [name for name in store_files(store_path) if name.endswith(".dat")]
    assert len(data_files) == 4 * count + 1, "no orphaned generation files"


def _put_in_another_process(spawn, store_path: Path, name: str, seed: int) -> None:
    process = spawn.Process(target=workers.put_one, args=(str(store_path), name, seed, 100))
    process.start()
    process.join(PROCESS_TIMEOUT)
    assert process.exitcode == 0


@pytest.mark.parametrize("pack_small", [False, True], ids=["files", "packed"])
def test_puts_and_gets_after_a_put_see_another_process_commit(store_path: Path, spawn, pack_small: bool) -> None:
    # A put leaves this process's cached header trusted until another writer takes the
    # dataset's lock (no stat() on the next get or put): each step here follows a commit
    # by another process, which must be seen.
    with mmstore.Store(store_path, pack_small=pack_small) as store:
        store.put("x", workers.pattern(1, 100))
        _put_in_another_process(spawn, store_path, "x", 2)
        assert (store.get("x") == workers.pattern(2, 100)).all()
        assert store.attrs("x") == {"seed": 2}

        store.put("x", workers.pattern(3, 100))  # replaces generation 2, not a stale 1
        _put_in_another_process(spawn, store_path, "x", 4)
        store.put("x", workers.pattern(5, 100))
        assert store.info("x")["generation"] == 5
        assert (store.get("x") == workers.pattern(5, 100)).all()
        assert store.attrs("x") == {}

        _put_in_another_process(spawn, store_path, "x", 6)
        store.delete("x")  # removes generation 5's data file, the other process's
        assert "x" not in store
    assert [name for name in store_files(store_path) if name.endswith(".dat")] == []
