"""Writer-lock stress: many processes, many acquisitions, overlap detected independently."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmstore
from mmstore._locks import mark_alive, names_file, remove_if_writer_gone
from tests import workers
from tests.conftest import PROCESS_TIMEOUT, collect_results


@pytest.mark.slow
def test_sixteen_processes_never_hold_a_writer_lock_together(store_path: Path, spawn) -> None:
    processes, rounds = 16, 25
    with mmstore.Store(store_path) as store:
        store.create("x", np.int64, (1,)).close()
    (store_path / "counter.txt").write_text("0")
    barrier, results = spawn.Barrier(processes), spawn.Queue()
    children = [
        spawn.Process(target=workers.lock_stress, args=(str(store_path), rounds, barrier, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    overlaps = collect_results(children, results)
    total = processes * rounds
    assert overlaps == [0] * processes  # way 1: the exclusive marker never found taken
    assert (store_path / "counter.txt").read_text() == str(total)  # way 2: no lost update
    with mmstore.Store(store_path, "r") as store:
        assert store.get("x")[0] == total  # and the in-place edits through writer handles


def test_remove_if_writer_gone_spares_live_writers_and_swapped_paths(tmp_path: Path) -> None:
    path = tmp_path / "file.tmp"
    path.write_bytes(b"x")
    for shared in (False, True):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert mark_alive(fd, shared=shared)
            assert not remove_if_writer_gone(str(path)) and path.exists()  # a live writer's file stays
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert names_file(str(path), fd)
        (tmp_path / "other").write_bytes(b"y")
        os.replace(tmp_path / "other", path)
        assert not names_file(str(path), fd)  # the path now names another file
    finally:
        os.close(fd)
    assert remove_if_writer_gone(str(path)) and not path.exists()  # nobody holds it: removed
    assert not remove_if_writer_gone(str(path))  # already gone


# --- the change counter in each dataset's lock file (docs/FORMAT.md) ------------------


def _gray_code(lock_file: Path) -> int:
    raw = lock_file.read_bytes()
    assert len(raw) == 8
    return int.from_bytes(raw, "little")


def _count(code: int) -> int:
    count = 0
    while code:
        count ^= code
        code >>= 1
    return count


def test_a_dataset_lock_bumps_its_change_counter_one_bit_at_a_time(store: mmstore.Store, store_path: Path) -> None:
    store.put("x", np.arange(3))
    code = _gray_code(store_path / ".x.lock")
    count = _count(code)
    assert count % 2 == 0  # even: no change under way
    lock = store._lock("x")
    for _ in range(40):
        lock.acquire(5)
        held = _gray_code(store_path / ".x.lock")
        assert _count(held) == count + 1 and (held ^ code).bit_count() == 1
        lock.release()
        code = _gray_code(store_path / ".x.lock")
        assert _count(code) == count + 2 and (code ^ held).bit_count() == 1
        count += 2
    store.put("x", np.arange(4))
    store.delete("x")
    assert _count(_gray_code(store_path / ".x.lock")) == count + 4


def test_new_or_emptied_lock_files_start_their_counters_at_random(store: mmstore.Store, store_path: Path) -> None:
    starts = set()
    for i in range(8):
        store.put(f"d{i}", np.arange(2))
        count = _count(_gray_code(store_path / f".d{i}.lock"))
        assert count % 2 == 0
        starts.add(count)
    assert len(starts) == 8  # random starts: a restarted counter cannot return to a value a reader kept
    # A foreign program opening the lock file with O_TRUNC (filelock.FileLock does) empties it.
    os.close(os.open(store_path / ".d0.lock", os.O_RDWR | os.O_TRUNC))
    store.put("d0", np.arange(5))
    assert _count(_gray_code(store_path / ".d0.lock")) not in starts


def test_a_reader_sees_a_commit_whose_writer_died_holding_the_lock(store_path: Path, spawn) -> None:
    with mmstore.Store(store_path) as writer:
        writer.put("x", np.full(4, 1, dtype=np.int64))
    reader = mmstore.Store(store_path, "r")
    try:
        for _ in range(2):
            assert reader.get("x")[0] == 1
        assert reader._entries["x"].counter is not None  # the repeated get trusts the counter
        committed = spawn.Event()
        child = spawn.Process(target=workers.put_then_hang_holding_the_lock, args=(str(store_path), "x", 2, committed))
        child.start()
        try:
            assert committed.wait(PROCESS_TIMEOUT)
        finally:
            os.kill(child.pid, signal.SIGKILL)  # dies holding the lock: the counter stays odd
            child.join(PROCESS_TIMEOUT)
        assert _count(_gray_code(store_path / ".x.lock")) % 2 == 1
        for _ in range(3):
            assert reader.get("x")[0] == 2  # odd counter: every get checks the sidecar
            assert reader._entries["x"].counter is None
        with mmstore.Store(store_path) as writer:  # the next writer (its recovery) makes it even
            writer.put("x", np.full(4, 3, dtype=np.int64))
        assert _count(_gray_code(store_path / ".x.lock")) % 2 == 0
        assert reader.get("x")[0] == 3 and reader.get("x")[0] == 3
        assert reader._entries["x"].counter is not None
    finally:
        reader.close()


@pytest.mark.parametrize("lock_file", ["missing", "fifo", "emptied", "directory"])
def test_readers_without_a_usable_counter_check_the_sidecar(store_path: Path, spawn, lock_file: str) -> None:
    with mmstore.Store(store_path) as writer:
        writer.put("x", np.full(4, 1, dtype=np.int64))
    path = store_path / ".x.lock"
    path.unlink()
    if lock_file == "fifo":
        os.mkfifo(path)  # opening it must not block the reader
    elif lock_file == "emptied":
        path.write_bytes(b"")
    elif lock_file == "directory":
        path.mkdir()
    with mmstore.Store(store_path, "r") as reader:
        for _ in range(3):
            assert reader.get("x")[0] == 1
        assert reader._entries["x"].counter is None
        if lock_file in ("fifo", "directory"):
            assert stat.S_ISFIFO(path.stat().st_mode) or path.is_dir()
            return  # no writer can lock such a file; the reader just works
        child = spawn.Process(target=workers.put_one, args=(str(store_path), "x", 9, 5))
        child.start()
        child.join(PROCESS_TIMEOUT)
        assert child.exitcode == 0
        np.testing.assert_array_equal(reader.get("x"), workers.pattern(9, 5))
        assert reader.get("x") is not None and reader._entries["x"].counter is not None  # a counter now


def test_the_caches_own_locks_keep_no_counter(tmp_path: Path) -> None:
    with mmstore.Cache(tmp_path / "cache") as cache:
        cache.set("k", np.arange(3))
        assert cache.get("k") is not None
    assert (tmp_path / "cache" / ".mmstore-cache-lock").stat().st_size == 0


def test_a_planted_last_counter_value_wraps_instead_of_breaking_puts(store: mmstore.Store, store_path: Path) -> None:
    store.put("x", np.arange(3))
    lock_file = store_path / ".x.lock"
    for planted in (1 << 63, (1 << 64) - 1):  # the last count's code, and an even count's
        fd = os.open(lock_file, os.O_WRONLY)
        os.pwrite(fd, planted.to_bytes(8, "little"), 0)
        os.close(fd)
        store.put("x", np.arange(planted % 7 + 1))
        np.testing.assert_array_equal(store.get("x"), np.arange(planted % 7 + 1))
        assert _count(_gray_code(lock_file)) % 2 == 0
    assert store.verify().ok


def test_a_fifo_lock_file_still_locks_without_a_counter(store_path: Path) -> None:
    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(3))
    lock_file = store_path / ".x.lock"
    lock_file.unlink()
    os.mkfifo(lock_file)
    (store_path / "x.0123456789abcdef.dat").write_bytes(b"")  # a dead writer's leftover: recovery locks x
    with mmstore.Store(store_path) as store:  # (opening for writing runs that recovery)
        store.put("x", np.arange(4))
        store.put("y", np.arange(5))
        assert store.get("x").tolist() == [0, 1, 2, 3] and store.get("x").tolist() == [0, 1, 2, 3]
    assert not (store_path / "x.0123456789abcdef.dat").exists()
    assert stat.S_ISFIFO(lock_file.stat().st_mode)


def test_a_release_that_fails_after_the_commit_keeps_the_commit(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import filelock

    store.put("x", np.arange(3))
    real_unlock = filelock.unlock_descriptor

    def failing_unlock(fd: int) -> None:
        real_unlock(fd)
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(filelock, "unlock_descriptor", failing_unlock)
    store.put("x", np.arange(6))  # committed: the error must not make put remove its data file
    store.put("x", np.arange(7))  # (the failed release closed the lock's descriptor: it reopens)
    monkeypatch.undo()
    np.testing.assert_array_equal(store.get("x"), np.arange(7))
    assert store.verify().ok


@pytest.mark.parametrize("pack_small", [False, True], ids=["files", "packed"])
@pytest.mark.parametrize("how", ["replaced", "deleted"])
def test_a_lock_file_replaced_or_deleted_behind_a_writer_is_locked_anew(
    store_path: Path, spawn, pack_small: bool, how: str
) -> None:
    # Outside the protocol (lock files are never unlinked), but a process keeps its lock
    # descriptor between puts: it must not go on locking the orphan, whose change counter
    # then vouches for a header another process has replaced since.
    with mmstore.Store(store_path, pack_small=pack_small) as store:
        store.put("x", np.full(4, 10.0))
        store.put("x", np.full(4, 20.0))
        lock = store_path / ".x.lock"
        if how == "replaced":
            os.replace(lock, store_path / "old-lock")
            lock.write_bytes(b"")
        else:
            lock.unlink()
        other = spawn.Process(target=workers.put_one, args=(str(store_path), "x", 3, 4))
        other.start()
        other.join(PROCESS_TIMEOUT)
        assert other.exitcode == 0
        with mmstore.Store(store_path, "r") as reader:
            held = reader.get("x")
        assert (held == workers.pattern(3, 4)).all()
        store.put("x", np.full(4, 40.0))
        assert store.info("x")["generation"] == 4  # not 3: a put after the other's
        assert (held == workers.pattern(3, 4)).all()  # committed bytes are never written again
        assert (store.get("x") == 40.0).all() and store.attrs("x") == {}
    assert len(list(store_path.glob("x.*.dat"))) == 1  # the other's data file was not leaked


def test_an_error_while_checking_the_lock_file_releases_the_flock(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between taking the flock and the change counter, each acquire checks that the lock
    # path still names the locked file: an interrupt (or EACCES) there left the flock
    # held, and every other writer timed out.
    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(2))
        real_stat = os.stat

        def interrupted(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if str(path).endswith(".x.lock"):
                raise KeyboardInterrupt
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(os, "stat", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.put("x", np.arange(3))
        monkeypatch.undo()
        with mmstore.Store(store_path, timeout=2) as other:  # another descriptor: a real flock conflict
            other.put("x", np.arange(4))
        store.put("x", np.arange(5))
        assert store.get("x").tolist() == [0, 1, 2, 3, 4]
