"""Growable datasets against the contract (DESIGN.md, README "Producers and followers"):
what tests/test_growable.py does not already pin down, found by a black-box audit."""

from __future__ import annotations

import os
import re
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmstore
from tests.conftest import PROCESS_TIMEOUT
from tests.workers import TICK, ticks

RECORD = np.dtype([("a", "<i4"), ("b", "<f4"), ("s", "S2")])
GOOD = (1, 0.5, b"ok")

# Records NumPy would store with a loss (1.5 as 1, b"abcdef" as b"ab", 1e300 as inf), and
# the field each loses in. Append and in-place edits must refuse every one of them alike.
LOSSY_RECORDS = [
    ((1.5, 0.5, b"ok"), "(field 'a') of dtype float64 in dataset 'r'"),
    ((1, 0.5, b"abcdef"), "(field 's') in dataset 'r': a string of 6 characters"),
    ((1, 1e300, b"ok"), "(field 'b') in dataset 'r': 1e+300 overflows"),
]


@pytest.mark.parametrize(("record", "message"), LOSSY_RECORDS)
def test_append_refuses_records_given_as_tuples_that_would_lose_a_field(
    store: mmstore.Store, record: tuple[Any, ...], message: str
) -> None:
    with store.create("r", RECORD, (0,), growable=True) as writer:
        writer.append(GOOD)
        for rows in (record, [GOOD, record]):  # one row, or one bad row in a block
            with pytest.raises(mmstore.InvalidArgumentError, match=re.escape(message)) as caught:
                writer.append(rows)
            assert str(caught.value).startswith("cannot append rows (field")
        assert len(writer) == 1
    assert store.get("r").tolist() == [GOOD]


@pytest.mark.parametrize(("record", "message"), [*LOSSY_RECORDS, ((2**40, 0.5, b"ok"), "out of bounds for int32")])
def test_record_edits_refuse_what_append_refuses_in_the_same_words(
    store: mmstore.Store, record: tuple[Any, ...], message: str
) -> None:
    with store.create("r", RECORD, (0,), growable=True) as writer:
        writer.append([GOOD, GOOD])
        for index, value in ((0, record), (-1, record), (slice(0, 2), [GOOD, record])):
            with pytest.raises(mmstore.InvalidArgumentError, match=re.escape(message)) as caught:
                writer[index] = value  # (the message append gives, but for its first words)
            assert str(caught.value).startswith(("cannot store values (field", "cannot convert values"))
    assert store.get("r").tolist() == [GOOD, GOOD]


def test_edits_of_one_field_or_spread_over_records_refuse_losses_too(store: mmstore.Store) -> None:
    with store.create("r", RECORD, (2,)) as writer:
        writer[:] = [GOOD, GOOD]
        refused: list[tuple[Any, Any, str]] = [
            ("a", 9.5, "field 'a'.*float64"),
            ("a", [1, 2.5], "field 'a'.*float64"),
            ("a", 2**40, "field 'a'.*does not fit"),
            ("s", b"abcdef", "field 's'.*6 characters"),
            ("b", np.array([1e300, 0.0]), "field 'b'.*overflows"),
            (0, 5.5, "field 'a'.*float64"),  # one number NumPy stores into every field
            (slice(None), 2**40, "field 'a'.*does not fit"),
        ]
        for index, value, message in refused:
            with pytest.raises(mmstore.InvalidArgumentError, match=message):
                writer[index] = value
        assert writer[:].tolist() == [GOOD, GOOD]
        # What loses nothing still goes in, as NumPy stores it.
        writer["a"] = np.int64(7)
        writer["s"] = [b"x", "y"]
        writer[1] = (3, 2**30, b"zz")  # (2**30 is exact in float32)
        writer[0] = 0  # a scalar spread over every field
    assert store.get("r").tolist() == [(0, 0.0, b"0"), (3, 2.0**30, b"zz")]


def test_appended_records_in_another_field_order_inside_a_list_are_refused(store: mmstore.Store) -> None:
    """NumPy converts records in a list by position: b's 6.5 would land in the int field a."""
    reordered = np.array([(6.5, 5)], [("b", "<f8"), ("a", "<i4")])[0]
    with store.create("r", np.dtype([("a", "<i4"), ("b", "<f8")]), (0,), growable=True) as writer:
        with pytest.raises(mmstore.InvalidArgumentError, match="match by field name"):
            writer.append([reordered])
        assert len(writer) == 0


def test_index_rules_of_in_place_edits(store: mmstore.Store) -> None:
    with store.create("g", np.int32, (0, 2), growable=True) as writer:
        writer.append([[1, 2], [3, 4], [5, 6]])
        writer.flush()
        writer.append([[7, 8]])  # written, not flushed: still a row of the writer's
        writer[-1] = [70, 80]
        writer[-4] = [10, 20]
        writer[1:3, 1] = [40, 60]
        for index in (4, -5, (0, 2)):
            with pytest.raises(IndexError):
                writer[index] = 0
            with pytest.raises(IndexError):
                writer[index]
        with pytest.raises(mmstore.InvalidArgumentError, match="'g'"):
            writer[0] = [1, 2, 3]
        with pytest.raises(mmstore.InvalidArgumentError, match="float64 in dataset 'g'"):
            writer[0:2] = np.full((2, 2), 0.5)
        assert writer[:].tolist() == [[10, 20], [3, 40], [5, 60], [70, 80]]
    assert store.get("g").tolist() == [[10, 20], [3, 40], [5, 60], [70, 80]]


def test_a_closed_writer_refuses_every_use_with_one_error(store: mmstore.Store) -> None:
    writer = store.create("g", np.int64, (0,), growable=True)
    writer.append([1, 2])
    writer.close()
    uses = [
        lambda: writer.append(3),
        lambda: writer.flush(),
        lambda: writer.flush(durable=True),
        lambda: writer.__setitem__(0, 5),
        lambda: writer[0],
        lambda: writer.array,
    ]
    for use in uses:
        with pytest.raises(mmstore.ClosedError, match="writer of dataset 'g' is closed"):
            use()
    writer.close()  # (a second close is no error)
    assert writer.closed and store.get("g").tolist() == [1, 2]


def test_open_writer_of_a_fixed_size_dataset_edits_but_does_not_append(store: mmstore.Store) -> None:
    store.put("fixed", np.arange(3, dtype=np.int16))
    with store.open_writer("fixed") as writer:
        assert not writer.growable and len(writer) == 3
        with pytest.raises(mmstore.InvalidArgumentError, match="'fixed' is not growable"):
            writer.append(np.int16(1))
        with pytest.raises(mmstore.InvalidArgumentError, match="does not fit"):
            writer[0] = 2**20
        writer[0] = 9
    assert store.get("fixed").tolist() == [9, 1, 2]
    assert store.verify().ok  # the edit dropped the checksum the put recorded


def test_a_second_open_writer_in_another_store_handle_times_out_naming_the_lock(store_path: Path) -> None:
    with (
        mmstore.Store(store_path) as first,
        first.create("g", np.int64, (0,), growable=True),
        mmstore.Store(store_path, timeout=0.05) as second,
    ):
        with pytest.raises(TimeoutError, match=r"writer lock of dataset 'g' \(.*\.g\.lock\)") as caught:
            second.open_writer("g")
        assert isinstance(caught.value, mmstore.LockTimeout)
        assert len(second.open_reader("g")) == 0  # readers take no lock


def _append_without_flush_then_wait_to_be_killed(path: str, report_fd: int) -> None:
    """Child of a fork: 3 rows flushed, 4 more appended (through the map and pwrite), none of them
    flushed; says so, then waits for SIGKILL."""
    store = mmstore.Store(path)
    writer = store.open_writer("ticks")
    writer.append(ticks(0, 3))
    writer.flush()
    writer.append(ticks(3, 1))
    writer.append(ticks(4, 5000))  # (large: written with pwrite, past the committed length)
    os.write(report_fd, b"x")
    while True:
        signal.pause()


def test_sigkill_between_append_and_flush_leaves_the_committed_rows(store_path: Path) -> None:
    with mmstore.Store(store_path) as store:
        store.create("ticks", TICK, (0,), growable=True).close()
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about fork() in a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_fd)
            _append_without_flush_then_wait_to_be_killed(str(store_path), write_fd)
        finally:
            os._exit(1)
    os.close(write_fd)
    try:
        assert os.read(read_fd, 1) == b"x", "the writer died before it appended"
        with mmstore.Store(store_path, "r") as reader_store:  # while the killed-to-be writer holds its rows
            assert len(reader_store.open_reader("ticks")) == 3
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(read_fd)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    with mmstore.Store(store_path) as store:  # (a writable open runs recovery)
        assert store.info("ticks")["shape"] == (3,)
        np.testing.assert_array_equal(store.get("ticks"), ticks(0, 3))
        assert store.verify().ok
        with store.open_writer("ticks") as writer:  # the lock died with its holder
            assert len(writer) == 3
            writer.append(ticks(3, 2))
        np.testing.assert_array_equal(store.get("ticks"), ticks(0, 5))


def follow_and_report(path: str, name: str, ready: Any, check: Any, checked: Any, results: Any) -> None:
    """In another process: report the committed length before and after the writer's
    unflushed appends (``check``), then wait for 6 rows and report them."""
    with mmstore.Store(path, "r") as store, store.open_reader(name) as reader:
        ready.set()
        assert check.wait(PROCESS_TIMEOUT)
        seen_unflushed = (reader.refresh(), len(store.get(name)))
        checked.set()
        woke = reader.wait(min_len=6, timeout=PROCESS_TIMEOUT)
        results.put((seen_unflushed, woke, reader.array.tolist()))


def test_a_reader_in_another_process_sees_rows_only_once_flushed(store_path: Path, spawn) -> None:
    dtype = np.dtype([("seq", "<i8"), ("value", "<f8")])
    with mmstore.Store(store_path) as store, store.create("g", dtype, (0,), growable=True) as writer:
        writer.append([(0, 0.0), (1, 0.5)])
        writer.flush()
        ready, check, checked, results = spawn.Event(), spawn.Event(), spawn.Event(), spawn.Queue()
        child = spawn.Process(target=follow_and_report, args=(str(store_path), "g", ready, check, checked, results))
        child.start()
        try:
            assert ready.wait(PROCESS_TIMEOUT)
            writer.append([(2, 1.0), (3, 1.5), (4, 2.0), (5, 2.5)])
            writer[0] = (0, -1.0)  # an in-place edit, made visible through the map at once
            check.set()
            assert checked.wait(PROCESS_TIMEOUT)
            writer.flush()
            seen_unflushed, woke, rows = results.get(timeout=PROCESS_TIMEOUT)
        finally:
            child.join(PROCESS_TIMEOUT)
    assert child.exitcode == 0
    assert seen_unflushed == (2, 2)
    assert woke is True
    assert rows == [(0, -1.0), (1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0), (5, 2.5)]
