"""Growable datasets, writer handles, readers that follow them, verify and recover."""

from __future__ import annotations

import fcntl
import gc
import inspect
import os
import signal
import sys
import threading
import time
import warnings
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmstore
from tests import workers
from tests.conftest import PROCESS_TIMEOUT, collect_results, run_in_fork, store_files
from tests.workers import TICK, ticks


def test_create_append_flush_publishes(store: mmstore.Store) -> None:
    with store.create("ticks", TICK, (0,), growable=True) as writer:
        assert len(writer) == 0 and writer.shape == (0,)
        reader = store.open_reader("ticks")
        writer.append(ticks(0, 1)[0])  # one row
        writer.append(ticks(1, 9))  # many rows
        writer.append([(10, 5.0, 10 * 2654435761 + 12345)])  # anything convertible
        assert len(writer) == 11
        # Not flushed: readers see nothing yet.
        assert reader.refresh() == 0 and len(store.get("ticks")) == 0
        writer.flush()
        assert reader.refresh() == 11
        np.testing.assert_array_equal(reader.array, ticks(0, 11))
        np.testing.assert_array_equal(store.get("ticks"), ticks(0, 11))
        assert not reader.array.flags.writeable
        assert writer.committed_length == 11
    assert store.info("ticks")["shape"] == (11,)  # close records the committed length in the sidecar
    np.testing.assert_array_equal(store.get("ticks"), ticks(0, 11))


def test_append_checks_dtype_and_shape(store: mmstore.Store) -> None:
    with store.create("m", np.float32, (0, 3), growable=True) as writer:
        writer.append(np.ones(3, np.float32))
        writer.append(np.ones((2, 3), np.float64))  # same kind: cast
        with pytest.raises(ValueError, match="shape"):
            writer.append(np.ones(4, np.float32))
        with pytest.raises(ValueError, match="dtype"):
            writer.append(np.array(["a", "b", "c"]))
        with pytest.raises(ValueError):
            writer.append([[1, 2]])
        writer.append(np.empty((0, 3), np.float32))
        assert len(writer) == 3
    with store.create("s", TICK, (0,), growable=True) as writer, pytest.raises(ValueError, match="dtype"):
        writer.append(np.zeros(2, [("a", "<i4")]))


def test_append_and_edits_refuse_what_numpy_would_convert_with_loss(store: mmstore.Store) -> None:
    """No silent truncation or wrap-around: floats into integers, text into numbers and
    integers that do not fit are refused (InvalidArgumentError); integers that fit are
    taken whatever their type, and dates still parse from text."""
    with store.create("i", np.int64, (0,), growable=True) as writer:
        for bad in (np.array([2**63], np.uint64), [1.5], ["7"], [2**70], [1 + 2j]):
            with pytest.raises(mmstore.InvalidArgumentError):
                writer.append(bad)
        writer.append([1, 2])
        with pytest.raises(mmstore.InvalidArgumentError):
            writer[0] = 2.5
        writer[0] = np.int8(7)
        assert writer[:].tolist() == [7, 2]
    with store.create("u", np.uint8, (0,), growable=True) as writer:
        for bad in ([300], [-1], np.array([256])):
            with pytest.raises(mmstore.InvalidArgumentError, match="do not fit"):
                writer.append(bad)
        writer.append(np.arange(3))  # int64 values that fit
        with pytest.raises(mmstore.InvalidArgumentError, match="does not fit"):
            writer[1] = 300
    assert store.get("u").tolist() == [0, 1, 2]
    with store.create("d", "M8[s]", (0,), growable=True) as writer:
        writer.append(["2020-01-01", "2021-06-01T12:00:00"])
    assert store.get("d")[1] == np.datetime64("2021-06-01T12:00:00")


def test_conversions_numpy_makes_without_loss_still_work(store: mmstore.Store) -> None:
    """What the lossy-conversion checks must not refuse: record datasets edited by field or
    by a scalar spread over rows, truth values into booleans, and Python numbers of any
    size, Decimal, Fraction and None (NaN) into floats."""
    record = np.dtype([("a", "<i4"), ("b", "<f8")])
    with store.create("r", record, (3,)) as writer:
        writer[:] = 0
        writer["a"] = 7
        writer["b"] = [0.5, 1.5, 2.5]
    assert store.get("r").tolist() == [(7, 0.5), (7, 1.5), (7, 2.5)]
    with store.create("b", np.bool_, (0,), growable=True) as writer:
        writer.append([0, 1])
        writer[0] = 1
    assert store.get("b").tolist() == [True, True]
    with store.create("f", np.float64, (0,), growable=True) as writer:
        writer.append(2**64)
        writer.append([1, 2**70])
        writer.append(Decimal("1.5"))
        writer.append(Fraction(1, 2))
        writer.append([1.0, None])
        with pytest.raises(mmstore.InvalidArgumentError):
            writer.append(2**1100)  # (past float64)
    got = store.get("f")
    assert got[:5].tolist() == [2.0**64, 1.0, 2.0**70, 1.5, 0.5] and got[5] == 1.0 and np.isnan(got[6])


def test_records_in_another_field_order_are_refused_not_written_by_position(store: mmstore.Store) -> None:
    record = np.dtype([("a", "<i4"), ("b", "<f8")])
    reordered = np.array([(6.0, 5)], [("b", "<f8"), ("a", "<i4")])
    with store.create("r", record, (0,), growable=True) as writer:
        writer.append(np.array([(5, 6.0)], record)[0])  # a record of the same fields: fine
        for bad in (reordered, reordered[0]):
            with pytest.raises(mmstore.InvalidArgumentError):
                writer.append(bad)
            with pytest.raises(mmstore.InvalidArgumentError, match="match by field name"):
                writer[0] = bad
    assert store.get("r").tolist() == [(5, 6.0)]
    narrow = np.dtype([("a", "i1"), ("b", "<f8")])
    with store.create("n", narrow, (0,), growable=True) as writer:
        writer.append(np.array([(100, 1.0)], [("a", "<i8"), ("b", "<f8")]))  # a wider field whose values fit
        with pytest.raises(mmstore.InvalidArgumentError, match=r"field 'a'.* do not fit"):
            writer.append(np.array([(1000, 1.0)], [("a", "<i8"), ("b", "<f8")]))  # (was stored as -24)
    assert store.get("n").tolist() == [(100, 1.0)]


def test_growth_is_amortised_and_files_only_grow(store: mmstore.Store) -> None:
    sizes = []
    with store.create("g", np.int64, (0,), growable=True) as writer:
        path = store.info("g")["data_file"]
        for i in range(200_000):
            writer.append(np.int64(i))
            if i % 1000 == 0:
                sizes.append(os.path.getsize(path))
        writer.flush()
        assert len(set(sizes)) < 20, "capacity should grow geometrically, not per append"
        assert sizes == sorted(sizes)
        assert os.path.getsize(path) <= 4096 + 2 * 200_000 * 8 + (1 << 20)
    np.testing.assert_array_equal(store.get("g"), np.arange(200_000))


def test_in_place_edits_and_fixed_size_writers(store: mmstore.Store) -> None:
    with store.create("fixed", np.float32, (4, 2)) as writer:
        assert writer.shape == (4, 2)
        writer[1] = 7
        writer.array[3, 1] = 9
        with pytest.raises(ValueError, match="not growable"):
            writer.append(np.zeros(2, np.float32))
    got = store.get("fixed")
    assert got[1].tolist() == [7, 7] and got[3, 1] == 9 and got.sum() == 23
    with store.open_writer("fixed") as writer:
        writer[0, 0] = 1
    assert store.get("fixed")[0, 0] == 1


def test_create_refuses_existing_unless_exist_ok(store: mmstore.Store) -> None:
    store.put("x", np.arange(3))
    with pytest.raises(mmstore.DatasetExistsError):
        store.create("x", np.int64, (0,), growable=True)
    with store.create("x", np.int64, (0,), growable=True, exist_ok=True) as writer:
        writer.append(np.arange(5))
    assert store.get("x").tolist() == [0, 1, 2, 3, 4]
    assert store.info("x")["generation"] == 2
    with pytest.raises(ValueError, match="growable"):
        store.create("y", np.int64, (), growable=True)


def test_writers_are_exclusive_across_processes(store_path: Path, spawn) -> None:
    with mmstore.Store(store_path) as store:
        store.create("ticks", TICK, (0,), growable=True).close()
    opened, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=workers.hold_writer, args=(str(store_path), "ticks", opened, release))
    holder.start()
    try:
        assert opened.wait(PROCESS_TIMEOUT)
        with mmstore.Store(store_path, timeout=0.2) as store:
            with pytest.raises(mmstore.LockTimeout, match="ticks"):
                store.open_writer("ticks")
            with pytest.raises(mmstore.LockTimeout):
                store.put("ticks", np.zeros(1))
    finally:
        release.set()
        holder.join(PROCESS_TIMEOUT)
    assert holder.exitcode == 0
    with mmstore.Store(store_path) as store:
        np.testing.assert_array_equal(store.get("ticks"), ticks(0, 5))
        with store.open_writer("ticks") as writer:  # the lock is free again
            writer.append(ticks(5, 1))


def test_dropped_writer_publishes_and_releases_its_lock(store_path: Path, spawn) -> None:
    """A writer never closed (a create() whose result is not kept, a handle gone out of
    scope) releases the dataset's lock when collected, for this process and others, and
    publishes its appended rows, as close() would; with a ResourceWarning."""
    with mmstore.Store(store_path, timeout=10) as store:
        with pytest.warns(ResourceWarning, match="'t' was not closed"):
            store.create("t", TICK, (0,), growable=True)  # the result is dropped at once
        writer = store.open_writer("t")  # (the lock is free: no LockTimeout)
        writer.append(ticks(0, 3))
        with pytest.warns(ResourceWarning):
            del writer
        np.testing.assert_array_equal(store.get("t"), ticks(0, 3))
        results = spawn.Queue()
        child = spawn.Process(target=workers.open_writer_and_report, args=(str(store_path), "t", results))
        child.start()
        assert collect_results([child], results) == [3]
        with store.open_writer("t") as writer:
            assert len(writer) == 3


def test_collected_writer_takes_no_lock_held_by_its_own_thread(store: mmstore.Store) -> None:
    """A collection can run a writer's finalizer anywhere, even while this thread holds the
    store's or the lock module's internal guards: it must neither wait for them (a
    deadlock) nor lose the data file Store.flush() has to sync."""
    writer = store.create("t", np.int64, (0,), growable=True)
    store.flush()  # (the new dataset is durable: nothing is left to sync)
    writer.append(np.arange(4))
    data_path = store.info("t")["data_file"]
    assert data_path not in store._dirty[0]
    with store._dirty_guard, mmstore._locks._idle_guard, pytest.warns(ResourceWarning):
        del writer
    assert data_path in store._dirty[0]
    assert store.get("t").tolist() == [0, 1, 2, 3]
    with store.open_writer("t") as writer:
        assert len(writer) == 4


def test_close_reentered_from_a_handler_or_collector_does_not_deadlock(store: mmstore.Store) -> None:
    """A writer closed by a signal handler or the garbage collector can run while its own
    thread is inside the store's dirty-set guard or the lock module's idle guard."""
    store.put("x", np.arange(4.0))
    writer = store.open_writer("x")
    writer[0] = 9.0  # (an edit: close() records the data file for Store.flush())
    with store._dirty_guard, mmstore._locks._idle_guard:
        writer.close()
    assert store.get("x").tolist() == [9.0, 1.0, 2.0, 3.0]
    assert store.info("x")["data_file"] in store._dirty[0]


def test_an_interrupt_in_mark_dirty_leaves_its_guard_free(store: mmstore.Store) -> None:
    """A KeyboardInterrupt (or a signal handler's exception) at any line of _mark_dirty
    never leaves the store's dirty-set guard held (every later commit would hang)."""
    code = mmstore._store.Store._mark_dirty.__code__
    lines, first = inspect.getsourcelines(code)
    # (Not the with statement's own line events: a trace function can raise there, before
    # __exit__ is called, where no signal handler runs; they run after the call returns.)
    with_lines = {first + i for i, line in enumerate(lines) if line.strip().startswith("with ")}
    for target in range(1, 12):
        sys.settrace(_interrupt_at_line_event(code, target, with_lines))
        try:
            store.put("x", np.arange(3))
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        guard = store._dirty_guard
        taken: list[bool] = []
        other = threading.Thread(target=lambda guard=guard, taken=taken: taken.append(guard.acquire(timeout=10)))
        other.start()
        other.join(PROCESS_TIMEOUT)
        assert taken == [True], f"guard held after an interrupt at line event {target}"
        store._dirty_guard = type(guard)()  # (the other thread keeps the one it took)


def _interrupt_at_line_event(code: Any, target: int, skipped: set[int]) -> Any:
    """A trace function raising KeyboardInterrupt at the ``target``-th line event of ``code``."""
    seen = [0]

    def interrupt(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None
        if event == "line" and frame.f_lineno not in skipped:
            seen[0] += 1
            if seen[0] == target:
                raise KeyboardInterrupt
        return interrupt

    return interrupt


def test_edited_writer_dropped_or_killed_leaves_a_checksum_verify_accepts(store: mmstore.Store) -> None:
    with store.create("g", np.float64, (0, 3), growable=True) as writer:
        writer.append(np.ones((4, 3)))
        writer.flush(durable=True)  # the CRC covers the 4 rows
    writer = store.open_writer("g")
    writer[0] = 7.0
    with pytest.warns(ResourceWarning):
        del writer
    report = store.verify()
    assert report.ok, report
    assert store.get("g")[0].tolist() == [7.0, 7.0, 7.0]

    with store.open_writer("g") as writer:
        writer.flush(durable=True)  # CRC known again

    with warnings.catch_warnings():  # Python 3.12+ warns about fork() in a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child edits in place and is killed before closing
        try:
            child = mmstore.Store(store.path)
            edited = child.open_writer("g")
            edited[1] = 5.0
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert store.get("g")[1].tolist() == [5.0, 5.0, 5.0]  # the edit happened
    report = store.verify()
    assert report.ok, report


def test_a_store_collected_with_its_writer_leaves_the_lock_to_the_writer(store_path: Path) -> None:
    """In a cycle the store's finalizer may run first: it must not drop the flock of a lock
    that the writer (whose own finalizer publishes its rows) still holds."""
    store = mmstore.Store(store_path)
    writer = store.create("g", np.int64, (0,), growable=True)
    writer.append(np.arange(3))
    probe = os.open(store_path / ".g.lock", os.O_RDONLY)
    try:
        store.__del__()  # as the collector would, before the writer's finalizer
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        writer.close()
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released now
    finally:
        os.close(probe)
    with mmstore.Store(store_path) as reopened:
        assert reopened.get("g").tolist() == [0, 1, 2]


def test_forked_child_dropping_the_parents_writer_keeps_its_lock(store: mmstore.Store) -> None:
    writer = store.create("t", np.int64, (0,), growable=True)
    lock_path = os.path.join(store.path, ".t.lock")

    def child() -> int:
        nonlocal writer
        del writer  # the child's copy: closed at the fork, the parent's lock untouched
        gc.collect()
        fd = os.open(lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # still held by the parent
        finally:
            os.close(fd)
        return 2

    assert run_in_fork(child) == 0
    writer.append(np.arange(2))
    writer.close()
    assert store.get("t").tolist() == [0, 1]


def test_flush_syncs_rows_of_writers_closed_since(store: mmstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Store.flush() makes rows durable that a writer published and closed without a
    durable flush (it syncs open writers' files itself, and closed ones must not escape)."""
    synced: list[str] = []
    real_fsync = mmstore._durable.fsync

    def recording_fsync(fd: int, what: str) -> None:
        synced.append(what)
        real_fsync(fd, what)

    monkeypatch.setattr(mmstore._durable, "fsync", recording_fsync)
    store.create("t", np.int64, (0,), growable=True).close()
    store.flush()  # the new dataset is durable
    data_path = store.info("t")["data_file"]
    synced.clear()
    with store.open_writer("t") as writer:
        writer.append(np.arange(5))
    assert not any(data_path in what for what in synced)  # close() alone does not sync
    store.flush()
    assert any(data_path in what for what in synced)
    synced.clear()
    with store.open_writer("t") as writer:
        writer.append(np.arange(2))
        writer.flush(durable=True)  # already durable: nothing left for Store.flush()
    store.flush()
    assert not any(data_path in what for what in synced)


def test_writer_in_same_store_blocks_put(store_path: Path) -> None:
    with mmstore.Store(store_path, timeout=0.1) as store, store.create("t", np.int64, (0,), growable=True):
        with pytest.raises(mmstore.LockTimeout):
            store.put("t", np.zeros(2))
        with pytest.raises(mmstore.LockTimeout):
            store.open_writer("t")


def test_read_only_store_has_readers_not_writers(store_path: Path) -> None:
    with mmstore.Store(store_path) as store:
        store.create("t", np.int64, (0,), growable=True).close()
    with mmstore.Store(store_path, "r") as store:
        with pytest.raises(mmstore.ReadOnlyError):
            store.open_writer("t")
        with pytest.raises(mmstore.ReadOnlyError):
            store.create("u", np.int64, (0,), growable=True)
        assert len(store.open_reader("t")) == 0


def test_wait_times_out_and_sees_replacement(store: mmstore.Store) -> None:
    with store.create("t", np.int64, (0,), growable=True) as writer:
        reader = store.open_reader("t")
        assert reader.wait(1, timeout=0.01) is False
        assert reader.wait(timeout=0) is False
        writer.append(np.arange(3))
        writer.flush()
        assert reader.wait(timeout=0) is True
        assert reader.wait(3, timeout=0) is True and len(reader) == 3
    store.put("t", np.arange(10))
    assert reader.wait(100, timeout=5) is True  # a replacement ends the wait too
    assert reader.generation == 2 and reader.array.tolist() == list(range(10))


def test_wait_takes_min_len_as_design_names_it(store: mmstore.Store) -> None:
    with store.create("t", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(3))
        writer.flush()
        reader = store.open_reader("t")
        assert reader.wait(min_len=3, timeout=0.01) is True
        assert reader.wait(3, 0.01) is True
        assert reader.wait(min_length=3, timeout=0.01) is True  # (the older keyword)
        assert reader.wait(min_len=4, timeout=0.01) is False
        with pytest.raises(ValueError, match="disagree"):
            reader.wait(min_len=3, min_length=4, timeout=0.01)


def test_wait_wakes_on_flush_from_another_process(store_path: Path, spawn) -> None:
    with mmstore.Store(store_path) as store:
        writer = store.create("ticks", TICK, (0,), growable=True)
        waiting, results = spawn.Event(), spawn.Queue()
        child = spawn.Process(target=workers.wait_for_rows, args=(str(store_path), "ticks", 3, waiting, results))
        child.start()
        assert waiting.wait(PROCESS_TIMEOUT)
        writer.append(ticks(0, 2))
        writer.flush()
        writer.append(ticks(2, 2))
        writer.flush()
        woke, length, last = results.get(timeout=PROCESS_TIMEOUT)
        child.join(PROCESS_TIMEOUT)
        writer.close()
    assert woke is True and length >= 3 and last[-1] == length - 1


@pytest.mark.slow
def test_one_writer_four_followers_see_every_row_once_in_order(store_path: Path, spawn) -> None:
    total = 200_000
    with mmstore.Store(store_path) as store:
        writer = store.create("ticks", TICK, (0,), growable=True)
        ready = [spawn.Event() for _ in range(4)]
        results = spawn.Queue()
        followers = [
            spawn.Process(target=workers.follow_rows, args=(str(store_path), "ticks", total, event, results))
            for event in ready
        ]
        for process in followers:
            process.start()
        for event in ready:
            assert event.wait(PROCESS_TIMEOUT)
        rng = np.random.default_rng(0)
        position = 0
        while position < total:
            count = int(min(total - position, rng.choice([1, 3, 50, 1000, 5000])))
            writer.append(ticks(position, count))
            position += count
            if rng.random() < 0.7 or position == total:
                writer.flush()
        writer.close()
        seen = collect_results(followers, results)
    for rows, blocks, problems in seen:
        assert rows == total
        assert problems == 0
        assert blocks >= 1


def test_follow_from_start_and_idle_timeout(store: mmstore.Store) -> None:
    with store.create("t", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(5))
        writer.flush()
        reader = store.open_reader("t")
        blocks = list(reader.follow(start=2, idle_timeout=0.05))
        assert [b.tolist() for b in blocks] == [[2, 3, 4]]


# --- verify and recover ----------------------------------------------------------


def test_verify_clean_store(store: mmstore.Store) -> None:
    store.put("a", np.arange(10))
    with store.create("g", TICK, (0,), growable=True) as writer:
        writer.append(ticks(0, 1000))
        writer.flush(durable=True)
        writer.append(ticks(1000, 10))
    report = store.verify()
    assert report.ok and report.checked == 2 and not report.problems, str(report)


def test_verify_finds_checksum_mismatch_and_recover_quarantines(store: mmstore.Store, store_path: Path) -> None:
    store.put("good", np.arange(10))
    store.put("bad/one", np.arange(1000.0))
    path = store.info("bad/one")["data_file"]
    with open(path, "r+b") as handle:  # what a power loss can leave: garbage under a valid sidecar
        handle.seek(800)
        handle.write(b"\xff" * 8)
    report = store.verify()
    assert not report.ok and list(report.problems) == ["bad/one"]
    assert "checksum" in report.problems["bad/one"]
    files_before = {Path(p).name for p in store_files(store_path)}
    report = store.recover()
    assert "bad/one" in report.quarantined
    assert "bad/one" not in store and "good" in store
    quarantined = {Path(p).name for p in store_files(store_path / ".quarantine")}
    assert "one.json" in quarantined and Path(path).name in quarantined  # moved, never deleted
    assert files_before <= {Path(p).name for p in store_files(store_path)}
    assert store.verify().ok


def test_verify_growable_checksum(store: mmstore.Store) -> None:
    with store.create("g", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(5000))
    assert store.verify().ok
    path = store.info("g")["data_file"]
    with open(path, "r+b") as handle:
        handle.seek(4096 + 8 * 100)
        handle.write(b"\x01" * 8)
    report = store.verify()
    assert "g" in report.problems and "checksum" in report.problems["g"]


def test_verify_reports_corrupt_headers_without_hiding_others(store: mmstore.Store, store_path: Path) -> None:
    store.put("a", np.arange(3))
    store.put("b", np.arange(3))
    (store_path / "a.json").write_text("{")
    report = store.verify()
    assert list(report.problems) == ["a"] and report.checked == 2


def test_verify_counts_a_corrupt_datasets_files_as_its_problem_not_leftovers(
    store: mmstore.Store, store_path: Path
) -> None:
    store.put("a", np.arange(3))
    store.put("b", np.arange(3))
    kept = Path(store.info("a")["data_file"]).name
    (store_path / "a.json").write_text("{")
    (store_path / ".a.0123456789abcdef.tmp").write_text("{}")  # a temp sidecar of a: kept with it too
    dead = "b.0123456789abcdef.dat"  # an unreferenced data file of b that no writer holds: a leftover
    (store_path / dead).write_bytes(bytes(8))
    report = store.verify()
    assert list(report.problems) == ["a"] and report.leftovers == [dead]
    assert kept in report.problems["a"] and ".a.0123456789abcdef.tmp" in report.problems["a"]
    assert "1 leftover files" in str(report)
    with mmstore.Store(store_path) as reopened:  # a writable open removes the leftover only
        assert not (store_path / dead).exists() and (store_path / kept).exists()
        report = reopened.verify()
        assert report.leftovers == [] and "leftover" not in str(report) and kept in report.problems["a"]
        assert list(reopened.recover().quarantined) == ["a"]
    assert kept in {Path(p).name for p in store_files(store_path / ".quarantine")}  # moved with its sidecar


def test_writer_is_not_inherited_across_fork(store: mmstore.Store) -> None:
    writer = store.create("t", np.int64, (0,), growable=True)
    writer.append(np.arange(3))
    writer.flush()

    def child() -> int:
        try:
            writer.append(np.arange(2))
        except mmstore.ClosedError as exc:
            if "fork" not in str(exc):
                return 3
        else:
            return 1
        # A reader works in the child and sees the parent's committed rows.
        return 0 if store.open_reader("t").array.tolist() == [0, 1, 2] else 4

    assert run_in_fork(child) == 0
    # The parent's writer still holds the lock and works.
    writer.append(np.arange(3, 5))
    writer.close()
    assert store.get("t").tolist() == [0, 1, 2, 3, 4]


def test_followers_wait_on_inotify_here(store: mmstore.Store) -> None:
    with store.create("t", np.int64, (0,), growable=True):
        reader = store.open_reader("t")
        assert reader.wait(1, timeout=0.01) is False
        assert reader._waiter is not None and reader._waiter.uses_inotify  # Linux: no polling fallback


def test_an_in_place_edit_is_a_commit_and_an_empty_flush_is_not(store: mmstore.Store) -> None:
    with store.create("t", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(3))
        writer.flush()
        reader = store.open_reader("t")
        assert reader.wait(timeout=0) is False  # nothing new since the reader opened
        for durable in (False, True):
            writer.flush(durable=durable)  # nothing new: not a commit
            assert reader.wait(timeout=0) is False
            writer[0] = 100 + durable  # an in-place edit, then a flush: a commit
            writer.flush(durable=durable)
            assert reader.wait(timeout=0) is True and reader.array[0] == 100 + durable
            assert reader.wait(timeout=0) is False


def test_append_checks_record_dtypes(store: mmstore.Store) -> None:
    records = np.dtype([("seq", "<i8"), ("chk", "<u8")])
    with store.create("r", records, (0,), growable=True) as writer:
        for rows in (np.zeros(3, [("x", "<i8"), ("y", "<u8")]), 5, np.zeros(3, "f8")):
            with pytest.raises(mmstore.InvalidArgumentError):
                writer.append(rows)
        writer.append((1, 2))
        writer.append([(3, 4), (5, 6)])
        writer.append(np.zeros(2, records))
        writer.append(np.zeros(1, records)[0])
        assert len(writer) == 6
    assert store.get("r")["seq"].tolist() == [1, 3, 5, 0, 0, 0]


def test_get_maps_again_while_the_writer_keeps_growing_the_file(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = store.create("g", np.int64, (0,), growable=True, capacity=4)
    writer.append(np.arange(2))
    writer.flush()
    assert store.get("g").tolist() == [0, 1]  # mapped with room for 4 rows
    writer.append(np.arange(2, 10))  # grows the file past that map
    writer.flush()
    real_map_entry = mmstore.Store._map_entry
    growths = []

    def map_then_grow(self: mmstore.Store, location: Any, entry: Any) -> Any:
        result = real_map_entry(self, location, entry)
        if len(growths) < 3:  # the writer grows the file past the new map before the length is read
            growths.append(len(writer))
            writer.append(np.arange(len(writer), result[1].capacity + 5))
            writer.flush()
        return result

    monkeypatch.setattr(mmstore.Store, "_map_entry", map_then_grow)
    got = store.get("g")
    assert len(growths) == 3
    np.testing.assert_array_equal(got, np.arange(len(writer)))
    writer.close()


def test_a_writer_whose_close_fails_still_releases_its_lock(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    writer = store.create("g", np.int64, (0,), growable=True)
    writer.append(np.arange(3))
    data_fd = writer._fd
    real_close = os.close

    def failing_close(fd: int) -> None:
        real_close(fd)
        if fd == data_fd:
            raise OSError(errno.EIO, "Input/output error")  # (NFS can report a write error at close)

    monkeypatch.setattr(os, "close", failing_close)
    with pytest.raises(OSError):
        writer.close()
    monkeypatch.undo()
    with mmstore.Store(store.path, timeout=5) as other:
        other.put("g", np.arange(2))  # the lock was released: no LockTimeout
        assert other.get("g").tolist() == [0, 1]


def test_a_close_reentered_from_a_signal_handler_returns(store: mmstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = store.create("g", np.int64, (0,), growable=True)
    writer.append(np.arange(3))
    real_flush = mmstore.Writer.flush
    reentered = []

    def flush_then_reenter(self: mmstore.Writer) -> None:
        real_flush(self)
        if not reentered:  # as a SIGTERM handler closing the store would, mid-close
            reentered.append(True)
            store.close()

    monkeypatch.setattr(mmstore.Writer, "flush", flush_then_reenter)
    writer.close()  # must neither deadlock nor release the lock twice
    monkeypatch.undo()
    assert reentered and writer.closed and store.closed
    with mmstore.Store(store.path, timeout=5) as other:
        assert other.get("g").tolist() == [0, 1, 2]
        other.put("g", np.arange(2))  # the lock was released


def test_an_interrupt_while_a_writer_registers_releases_the_lock(store: mmstore.Store) -> None:
    import weakref

    store.create("t", np.int64, (3,)).close()

    class Interrupting(weakref.WeakSet):  # type: ignore[type-arg]
        def add(self, item: Any) -> None:
            raise KeyboardInterrupt  # Ctrl-C as open_writer registers its writer

    store._writers = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        store.open_writer("t")
    with mmstore.Store(store.path, timeout=5) as other:
        other.put("t", np.arange(2))  # no LockTimeout: the lock was released


def test_a_store_close_that_fails_on_one_writer_still_closes_the_others(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers = [store.create(name, np.int64, (0,), growable=True) for name in ("a", "b")]
    for writer in writers:  # (kept referenced: the store holds its writers weakly)
        writer.append(np.arange(2))
    real_write = mmstore.Store._write_sidecar_locked
    failures = []

    def full_once(self: mmstore.Store, *args: Any, **kwargs: Any) -> None:
        if not failures:
            failures.append(True)
            raise OSError(28, "No space left on device")  # the first writer's last sidecar write
        real_write(self, *args, **kwargs)

    monkeypatch.setattr(mmstore.Store, "_write_sidecar_locked", full_once)
    with pytest.raises(OSError):
        store.close()
    monkeypatch.undo()
    assert store.closed and all(writer.closed for writer in writers) and not store._entries
    with mmstore.Store(store.path, timeout=5) as other:  # both locks were released
        other.put("a", np.arange(3))
        other.put("b", np.arange(3))


def test_a_fork_while_the_store_closes_still_protects_its_open_writers(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = store.create("a", np.int64, (0,), growable=True)
    second = store.create("b", np.int64, (0,), growable=True)
    real_flush = mmstore.Writer.flush
    codes: list[int] = []

    def flush_then_fork(self: mmstore.Writer) -> None:
        real_flush(self)
        if not codes:  # a fork (a multiprocessing worker, say) while close() is under way
            other = second if self is first else first
            codes.append(run_in_fork(lambda: 0 if other.closed else 1))

    monkeypatch.setattr(mmstore.Writer, "flush", flush_then_fork)
    store.close()
    assert codes == [0]  # in the child, the writer still open in the parent is not usable


def test_append_racing_store_close_never_writes_through_a_reused_descriptor(
    store: mmstore.Store, tmp_path: Path
) -> None:
    writer = store.create("x", np.int64, (0,), growable=True, capacity=200_000)
    entered, go = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    class SlowRows:  # stands in for a block whose conversion takes a while
        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            entered.set()
            assert go.wait(PROCESS_TIMEOUT)
            return np.full(100_000, -1, np.int64)

    def append() -> None:
        try:
            writer.append(SlowRows())
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=append)
    thread.start()
    assert entered.wait(PROCESS_TIMEOUT)
    old_number = writer._fd
    store.close()  # another thread closes the store (and the writer) mid-append
    user_file = tmp_path / "precious.bin"
    user_file.write_bytes(b"precious user data\n" * 1000)
    user_fd = os.open(user_file, os.O_RDWR)
    try:
        if user_fd != old_number:
            os.dup2(user_fd, old_number)  # the closed number now names the user's file
        go.set()
        thread.join(PROCESS_TIMEOUT)
    finally:
        if user_fd != old_number:
            os.close(old_number)
        os.close(user_fd)
    assert len(outcome) == 1 and isinstance(outcome[0], mmstore.ClosedError), outcome
    assert user_file.read_bytes() == b"precious user data\n" * 1000
    assert writer._fd == -1


def test_store_flush_racing_a_writer_close_fsyncs_no_closed_descriptor(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = store.create("x", np.int64, (0,), growable=True)
    writer.append(np.arange(10))
    writer.flush()
    at_fsync, go = threading.Event(), threading.Event()
    real_fsync = mmstore._durable.fsync

    def paused(fd: int, what: str) -> None:
        if threading.current_thread().name == "flusher" and not at_fsync.is_set():
            at_fsync.set()
            assert go.wait(PROCESS_TIMEOUT)
        real_fsync(fd, what)

    monkeypatch.setattr(mmstore._durable, "fsync", paused)
    outcome: list[BaseException | None] = []

    def flush() -> None:
        try:
            store.flush()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=flush, name="flusher")
    thread.start()
    assert at_fsync.wait(PROCESS_TIMEOUT)  # Store.flush is about to fsync the writer's data file
    writer.close()  # its owner closes it as usual
    go.set()
    thread.join(PROCESS_TIMEOUT)
    assert outcome == [None]
    store.put("z", np.arange(3))  # the store is still usable (no fsync failure recorded)
    store.flush()
    np.testing.assert_array_equal(store.get("x"), np.arange(10))


class _StoreThenPause:
    """Stands in for a control-block array: after the ``target``-th store through any of
    them, reports on ``report_fd`` and waits to be SIGKILLed."""

    def __init__(self, array: np.ndarray, state: dict[str, int]) -> None:
        self.array, self.state = array, state

    def __getitem__(self, index: Any) -> Any:
        return self.array[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        self.array[index] = value
        self.state["stores"] += 1
        if self.state["stores"] == self.state["target"]:
            os.write(self.state["report_fd"], b"p")
            signal.pause()


@pytest.mark.parametrize("scenario", ["durable flush", "durable flush after a flush", "close"])
def test_sigkill_between_any_two_control_block_stores_leaves_a_dataset_verify_accepts(
    store: mmstore.Store, scenario: str
) -> None:
    for target in range(1, 50):
        with store.create("g", np.int64, (0,), growable=True, exist_ok=True, capacity=1000) as writer:
            writer.append(np.arange(100))
            writer.flush(durable=True)  # CRC known over the 100 rows
        read_fd, write_fd = os.pipe()
        with warnings.catch_warnings():  # Python 3.12+ warns about fork() in a threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child writes and is killed at the target store
            try:
                os.close(read_fd)
                child = mmstore.Store(store.path)
                edited = child.open_writer("g")
                edited.append(np.arange(100, 200))
                state = {"stores": 0, "target": target, "report_fd": write_fd}
                mapped = edited._mapped
                mapped.control = _StoreThenPause(mapped.control, state)  # type: ignore[assignment]
                mapped.control_u32 = _StoreThenPause(mapped.control_u32, state)  # type: ignore[assignment]
                if scenario == "durable flush":
                    edited.flush(durable=True)
                elif scenario == "close":
                    edited.close()
                else:
                    edited.flush()
                    edited.flush(durable=True)
                os.write(write_fd, b"d")
            finally:
                os._exit(0)
        os.close(write_fd)
        reported = os.read(read_fd, 1)
        os.close(read_fd)
        if reported == b"p":
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert reported in (b"p", b"d")
        assert store.verify().ok, (scenario, target, store.verify())
        committed = store.get("g")
        assert len(committed) in (100, 200)
        np.testing.assert_array_equal(committed, np.arange(len(committed)))
        with store.open_writer("g") as writer:  # the next writer takes the fields as they are
            writer.flush(durable=True)
        assert store.verify().ok, (scenario, target, store.verify())
        if reported == b"d":
            assert target > 2  # (the kills above landed inside the update)
            break
    else:
        raise AssertionError("the scenario never finished")
    assert store.recover().quarantined == {}


def test_refresh_racing_a_replacement_shows_only_the_new_generations_committed_rows(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = store.create("x", np.int64, (0,), growable=True)
    writer.append(np.arange(10))
    writer.flush()
    reader = store.open_reader("x")
    writer.append(np.arange(10, 300_000))
    writer.flush()  # the file grew past the reader's map: refresh() must map it again
    writer.close()
    real_map_entry = mmstore.Store._map_entry
    replacing: list[mmstore.Writer] = []

    def replaced_before_the_map(self: mmstore.Store, location: Any, entry: Any) -> Any:
        if not replacing:  # another writer replaces the dataset; its rows are not flushed
            replacing.append(store.create("x", np.int64, (0,), growable=True, exist_ok=True, capacity=1_000_000))
            replacing[0].append(np.full(500_000, -7, np.int64))
        return real_map_entry(self, location, entry)

    monkeypatch.setattr(mmstore.Store, "_map_entry", replaced_before_the_map)
    length = reader.refresh()
    monkeypatch.undo()
    assert replacing
    assert length == 0 and len(reader) == 0 and len(reader.array) == 0
    assert reader.generation == 2
    replacing[0].flush()
    assert reader.refresh() == 500_000 and (reader.array == -7).all()
    replacing[0].close()


def test_open_reader_racing_growth_maps_again(store: mmstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = store.create("x", np.int64, (0,), growable=True)
    writer.append(np.arange(10))
    writer.flush()
    real_map_data = mmstore.Store._map_data
    grown: list[bool] = []

    def grown_after_the_map(self: mmstore.Store, location: Any, entry: Any, directory_fd: Any) -> Any:
        mapped = real_map_data(self, location, entry, directory_fd)
        if not grown:  # the writer grows the file and flushes before the length is read
            grown.append(True)
            writer.append(np.arange(10, 300_000))
            writer.flush()
        return mapped

    monkeypatch.setattr(mmstore.Store, "_map_data", grown_after_the_map)
    reader = store.open_reader("x")
    monkeypatch.undo()
    assert grown
    assert len(reader) == 300_000
    np.testing.assert_array_equal(reader.array, np.arange(300_000))
    writer.close()


def test_follow_and_wait_tell_a_new_dataset_by_its_data_file_not_its_generation_number(
    store_path: Path,
) -> None:
    producer = mmstore.Store(store_path)
    with producer.create("ticks", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(1000))
        writer.flush()
    consumer = mmstore.Store(store_path, "r")
    reader = consumer.open_reader("ticks")
    follower = reader.follow(idle_timeout=0.2)
    assert len(next(follower)) == 1000
    del producer["ticks"]  # a day rollover: a new log, generation 1 again
    with producer.create("ticks", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(-1, -1501, -1))
        writer.flush()
    assert consumer.info("ticks")["generation"] == 1
    blocks = list(follower)
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(-1, -1501, -1))  # from its row 0

    waiting = consumer.open_reader("ticks")
    del producer["ticks"]
    with producer.create("ticks", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(10))
        writer.flush()
    assert waiting.wait(1501, timeout=PROCESS_TIMEOUT)  # replaced: returns at once
    assert len(waiting) == 10
    consumer.close()
    producer.close()


def test_verify_racing_growth_reports_a_growing_dataset_healthy(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmstore import _maps

    writer = store.create("x", np.int64, (0,), growable=True)
    writer.append(np.arange(10))
    writer.flush(durable=True)
    real_mapped = _maps._Mapped
    grown: list[int] = []

    class GrownAfterTheMap(real_mapped):  # type: ignore[misc,valid-type]
        def __init__(self, header: Any, path: str, writable: bool, fd: int | None = None) -> None:
            super().__init__(header, path, writable, fd)
            if not writable and len(grown) < 2:  # verify's maps: the writer grows the file and flushes
                grown.append(len(writer))
                writer.append(np.arange(len(writer), 10 * len(writer) + 300_000))
                writer.flush()

    monkeypatch.setattr(_maps, "_Mapped", GrownAfterTheMap)
    report = store.verify()
    monkeypatch.undo()
    assert len(grown) == 2
    assert report.ok, report
    writer.close()
    assert store.verify().ok


def _inotify_descriptors() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass  # (the descriptor listdir itself used)
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_closing_a_store_closes_its_readers(store_path: Path) -> None:
    """Store.close() closes the readers it opened: their inotify descriptors go at once (a
    wait() blocked in another thread wakes then, see the test below), and they refuse
    further use; arrays already taken stay valid."""
    with mmstore.Store(store_path) as producer, producer.create("t", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(3))
        writer.flush()
        consumer = mmstore.Store(store_path, "r")
        reader = consumer.open_reader("t")
        assert reader.wait(4, timeout=0.01) is False  # (makes its waiter)
        before = _inotify_descriptors()
        rows = reader.array
        consumer.close()
        assert _inotify_descriptors() == before - 1
        with pytest.raises(mmstore.ClosedError, match="reader"):
            reader.refresh()
        assert rows.tolist() == [0, 1, 2]
        with pytest.raises(mmstore.ClosedError):
            consumer.open_reader("t")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_readers_dropped_without_close_release_their_inotify_descriptors(store: mmstore.Store) -> None:
    with store.create("x", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(3))
    before = _inotify_descriptors()

    def wait_once() -> None:
        reader = store.open_reader("x")
        assert not reader.wait(min_len=10, timeout=0.001)  # nothing new: it watched, then timed out

    for _ in range(200):  # more than the default per-user limit of 128 instances
        wait_once()
    gc.collect()
    assert _inotify_descriptors() == before
    reader = store.open_reader("x")
    assert not reader.wait(min_len=10, timeout=0.001)
    assert reader._waiter is not None and reader._waiter.uses_inotify  # the limit is not exhausted
    reader.close()


def _flush_as_the_wait_begins(monkeypatch: pytest.MonkeyPatch, writer: mmstore.Writer, rows: Any) -> list[Any]:
    """Make the writer append ``rows`` and flush just before the reader first blocks (so
    its real wait runs, with the timeout it was given, and returns); return the
    timeouts the reader waited with."""
    from mmstore import _notify

    real_wait = _notify.Waiter.wait
    timeouts: list[Any] = []

    def flush_then_wait(self: Any, timeout: Any) -> None:
        if not timeouts:
            writer.append(rows)
            writer.flush()
        timeouts.append(timeout)
        real_wait(self, timeout)

    monkeypatch.setattr(_notify.Waiter, "wait", flush_then_wait)
    return timeouts


@pytest.mark.parametrize("timeout", [30 * 86400, 1e300, float("inf")])
def test_wait_and_follow_take_long_and_infinite_timeouts(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch, timeout: float
) -> None:
    with store.create("x", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(3))
        writer.flush()
        reader = store.open_reader("x")
        timeouts = _flush_as_the_wait_begins(monkeypatch, writer, np.arange(3, 10))
        assert reader.wait(10, timeout=timeout)
        assert timeouts and len(reader) == 10
        following = reader.follow(start=10, idle_timeout=timeout)
        monkeypatch.undo()
        timeouts = _flush_as_the_wait_begins(monkeypatch, writer, np.arange(10, 12))
        np.testing.assert_array_equal(next(following), [10, 11])
        assert timeouts
        reader.close()


def test_wait_and_follow_refuse_nan_and_non_numbers(store: mmstore.Store) -> None:
    with store.create("x", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(3))
    reader = store.open_reader("x")
    for bad in (float("nan"), "soon", [1]):
        with pytest.raises(mmstore.InvalidArgumentError, match="timeout"):
            reader.wait(10, timeout=bad)
        with pytest.raises(mmstore.InvalidArgumentError, match="idle_timeout"):
            reader.follow(idle_timeout=bad)  # refused when called, not at the first next()
    assert isinstance(mmstore.InvalidArgumentError("x"), ValueError)
    reader.close()


def _blocked_in(target: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` in a daemon thread; return once it is entering Waiter.wait."""
    from mmstore import _notify

    real_wait = _notify.Waiter.wait
    entering = threading.Event()

    def signalled_wait(self: Any, timeout: Any) -> None:
        entering.set()
        real_wait(self, timeout)

    monkeypatch.setattr(_notify.Waiter, "wait", signalled_wait)
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("returned", target()))
        except BaseException as exc:
            outcome.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)  # (daemon: a failure leaves it blocked)
    thread.start()
    assert entering.wait(PROCESS_TIMEOUT)
    # Then until the kernel shows it asleep in poll() (a state, not a guess at a duration).
    wchan = f"/proc/self/task/{thread.native_id}/wchan"
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while "poll" not in Path(wchan).read_text():
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.001)
    return thread, outcome


def _kernel_shows_poll_sleeps() -> bool:
    """True if /proc shows where a thread sleeps (a running one reads "0")."""
    return os.access(f"/proc/self/task/{threading.get_native_id()}/wchan", os.R_OK)


@pytest.mark.skipif(not _kernel_shows_poll_sleeps(), reason="needs /proc/self/task/*/wchan")
def test_closing_a_waiter_wakes_a_poll_without_timeout(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mmstore import _notify

    watched = tmp_path / "watched"
    watched.write_bytes(b"")
    waiter = _notify.Waiter([str(watched)], [str(tmp_path)])
    assert waiter.uses_inotify
    before = _inotify_descriptors()
    thread, outcome = _blocked_in(lambda: waiter.wait(None), monkeypatch)
    waiter.close()  # from another thread, while it polls without a timeout
    thread.join(PROCESS_TIMEOUT)
    assert outcome == [("returned", None)]
    assert _inotify_descriptors() == before - 1  # closed once no thread polls it


@pytest.mark.skipif(not _kernel_shows_poll_sleeps(), reason="needs /proc/self/task/*/wchan")
def test_closing_a_reader_or_its_store_wakes_a_wait_without_timeout(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = mmstore.Store(store_path)
    writer = producer.create("ticks", np.int64, (0,), growable=True)
    for close_store in (False, True):
        consumer = mmstore.Store(store_path, "r")
        reader = consumer.open_reader("ticks")
        thread, outcome = _blocked_in(reader.wait, monkeypatch)  # (no min_len: any new commit)
        if close_store:
            consumer.close()
        else:
            reader.close()
        thread.join(PROCESS_TIMEOUT)
        assert len(outcome) == 1 and isinstance(outcome[0][1], mmstore.ClosedError), outcome
        monkeypatch.undo()
        consumer.close()
    writer.close()
    producer.close()


@pytest.mark.parametrize(
    ("shape", "capacity", "message"),
    [
        ((0,), 1.5, "capacity must be a whole number"),
        ((0,), "x", "capacity must be a whole number"),
        ((0,), -5, "capacity -5 is negative"),
        ((0,), 2**62, "more than a file can hold"),
        ((2**62,), None, "more than a file can hold"),
        ((0, 2**40, 2**40), None, "more than a file can hold"),
    ],
)
def test_create_refuses_bad_capacities_and_sizes_with_invalid_argument(
    store: mmstore.Store, shape: tuple[int, ...], capacity: Any, message: str
) -> None:
    with pytest.raises(mmstore.InvalidArgumentError, match=message) as caught:
        store.create("g", np.int32, shape, growable=True, capacity=capacity)
    assert "'g'" in str(caught.value) and "\n" not in str(caught.value)
    assert "g" not in store
    if shape == (2**62,):
        with pytest.raises(mmstore.InvalidArgumentError, match="more than a file can hold"):
            store.create("fixed", np.int32, shape)
    with store.create("g", np.int32, (0,), growable=True, capacity=np.int64(10)) as writer:  # still works
        writer.append(np.arange(3))
    np.testing.assert_array_equal(store.get("g"), np.arange(3))


@pytest.mark.parametrize("flag", ["growable", "exist_ok"])
@pytest.mark.parametrize("value", ["no", "false", 0, 1, None])
def test_create_takes_only_booleans_as_flags(store: mmstore.Store, flag: str, value: Any) -> None:
    """A flag given as a string ("no" reads as true) or a number is refused, naming it."""
    with pytest.raises(mmstore.InvalidArgumentError, match=f"{flag} must be True or False"):
        store.create("g", np.int32, (0,), **{flag: value})
    assert "g" not in store
    with store.create("g", np.int32, (0,), **{flag: np.bool_(True)}):  # (NumPy's bool is a bool)
        pass
    assert "g" in store


def test_storing_a_row_of_the_wrong_shape_is_an_invalid_argument(store: mmstore.Store) -> None:
    with store.create("g", np.float64, (0, 2), growable=True) as writer:
        writer.append([[1, 2], [3, 4]])
        with pytest.raises(mmstore.InvalidArgumentError, match=r"'g'.*broadcast"):
            writer[0] = [1, 2, 3]
        writer[0] = [5, 6]
        writer[1] = 7  # a scalar still spreads over the row
    np.testing.assert_array_equal(store.get("g"), [[5, 6], [7, 7]])


@pytest.mark.parametrize(
    ("dtype", "value", "message"),
    [
        ("S4", b"abcdefgh", "8 characters"),
        ("S4", np.array([b"abcdefgh"]), "8 characters"),
        ("S4", [b"ab", b"abcde"], "5 characters"),
        ("U3", "hello", "5 characters"),
        ("U3", np.array(["ab", "hello"]), "5 characters"),
        ("f4", 1e300, "overflows"),
        ("f4", 10**300, "overflows"),
        ("f4", np.array([1.0, 1e300]), "overflows"),
        ("f4", [1.0, -1e300], "overflows"),
        ("f2", np.array([100_000], np.int64), "overflows"),
        ("c8", np.array([1e300 + 0j]), "overflows"),
        ([("a", "i4"), ("b", "f4")], np.array([(1, 1e300)], [("a", "i8"), ("b", "f8")]), "field 'b'"),
        ([("a", "i4"), ("s", "S2")], np.array([(1, b"abc")], [("a", "i4"), ("s", "S3")]), "field 's'"),
    ],
)
def test_append_and_setitem_refuse_text_cut_short_and_floats_that_overflow(
    store: mmstore.Store, dtype: Any, value: Any, message: str
) -> None:
    with store.create("d", dtype, (0,), growable=True) as writer:
        with pytest.raises(mmstore.InvalidArgumentError, match=message):
            writer.append(value)
        writer.append(np.zeros(1, dtype))
        with pytest.raises(mmstore.InvalidArgumentError, match=message):
            writer[0] = value if not isinstance(value, (list, np.ndarray)) else value[-1:]
        assert len(writer) == 1
    assert store.get("d")[0] == np.zeros(1, dtype)[0]


def test_text_and_narrower_float_conversions_without_loss_still_work(store: mmstore.Store) -> None:
    cases: list[tuple[Any, Any, Any]] = [
        ("S4", b"abcd", b"abcd"),
        ("S4", "ab", b"ab"),  # str into a bytes field (ASCII), as before
        ("S4", np.array([b"ab"], "S8"), b"ab"),  # a wider field whose strings fit
        ("U3", np.array(["hey"], "U10"), "hey"),
        ("U3", b"ab", "ab"),
        ("S4", 12, b"12"),  # numbers into text, as NumPy writes them
        ("f4", 1e30, np.float32(1e30)),
        ("f4", np.array([0.1]), np.float32(0.1)),
        ("f4", float("inf"), np.inf),
        ("f4", float("nan"), None),
        ("f4", 3.4028235e38, np.float32(3.4028235e38)),  # rounds to the largest float32
        ("f4", 7, 7.0),
        ("f8", 10**300, 1e300),
        ("f2", np.array([1000], np.int64), 1000.0),
        ("c8", 1 + 2j, 1 + 2j),
    ]
    for dtype, value, expected in cases:
        with store.create("d", dtype, (0,), growable=True, exist_ok=True) as writer:
            writer.append(value)
            writer.append(np.zeros(1, dtype))
            writer[1] = value if not isinstance(value, np.ndarray) else value[0]
        stored = store.get("d")
        if expected is None:
            assert np.isnan(stored).all()
        else:
            assert stored[0] == expected and stored[1] == expected, (dtype, value, stored)
