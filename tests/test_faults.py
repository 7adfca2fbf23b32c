"""Fault injection: fail the Nth system call of an operation, for every N, and check the aftermath.

Every call the operation makes to os.open/write/pwrite/fsync/rename/replace/link/unlink,
posix_fallocate, mmap and the exchange-rename is counted; trial N makes the Nth one fail with
EIO (or ENOSPC). Afterwards the operation must have raised a clear error, the previously
committed state must be intact, and the next operation (on a fresh handle: after an fsync
error a handle refuses commits on purpose) must work. Trials go on until an operation runs
to completion without reaching its Nth call.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import mmstore
from mmstore import _durable

_OS_CALLS = ("open", "write", "pwrite", "fsync", "rename", "replace", "link", "unlink", "posix_fallocate")


class Injector:
    def __init__(self, fail_at: int, error: int) -> None:
        self.fail_at = fail_at
        self.error = error
        self.calls = 0
        self.fired = False

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self.fail_at:
                self.fired = True
                raise OSError(self.error, os.strerror(self.error))
            return real(*args, **kwargs)

        return call


@contextmanager
def failing(monkeypatch: pytest.MonkeyPatch, fail_at: int, error: int = errno.EIO) -> Iterator[Injector]:
    injector = Injector(fail_at, error)
    with monkeypatch.context() as patch:
        for name in _OS_CALLS:
            patch.setattr(os, name, injector.wrap(getattr(os, name)))
        patch.setattr(mmap, "mmap", injector.wrap(mmap.mmap))
        if _durable._renameat2 is not None:
            patch.setattr(_durable, "_renameat2", injector.wrap(_durable._renameat2))
        yield injector


def run_trials(operation: Callable[[int], None], check: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> int:
    """Fail call 1, 2, 3 ... of ``operation`` until it completes untouched; return the calls counted."""
    for fail_at in range(1, 500):
        completed = False
        with failing(monkeypatch, fail_at) as injector:
            try:
                operation(fail_at)
            except (mmstore.MmstoreError, OSError) as exc:
                assert injector.fired, f"failed without an injected fault: {exc!r}"
                assert str(exc), "errors say what went wrong"
            else:
                completed = not injector.fired
        check()  # after every failure: the committed state is intact and the next operation works
        if completed:
            return fail_at - 1
    raise AssertionError("the operation never completed")


def test_every_failing_call_of_a_durable_put(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(10), attrs={"v": 0})
    state = {"value": [list(range(10))]}

    def operation(trial: int) -> None:
        with mmstore.Store(store_path) as store:
            try:
                store.put("x", np.full(10, trial), attrs={"v": trial}, durable=True)
            except mmstore.FsyncError:
                # The commit may have become visible before durability failed: either is right.
                state["value"] = [*state["value"][-1:], [trial] * 10]
                raise
            state["value"] = [[trial] * 10]

    def check() -> None:
        with mmstore.Store(store_path) as store:
            got = store.get("x").tolist()
            assert got in state["value"]  # the old value, or the new one if it committed
            state["value"] = [got]
            assert store.verify().ok
            store.put("probe", np.arange(3))  # the next operation works
            assert [f for f in os.listdir(store_path) if f.endswith(".tmp")] == []

    calls = run_trials(operation, check, monkeypatch)
    assert calls >= 10  # the trials really walked the whole put


def test_every_failing_call_of_append_and_flush(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with mmstore.Store(store_path) as store, store.create("log", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(5))
    committed = {"rows": list(range(5))}

    def operation(trial: int) -> None:
        with mmstore.Store(store_path) as store:
            writer = store.open_writer("log")
            try:
                start = len(writer)
                writer.append(np.arange(start, start + 300_000))  # forces growth (posix_fallocate)
                writer.flush(durable=True)
                committed["rows"] = list(range(start + 300_000))
            finally:
                try:
                    writer.close()
                except (mmstore.MmstoreError, OSError):
                    pass

    def check() -> None:
        with mmstore.Store(store_path) as store:
            rows = store.get("log")
            # Flushed rows are all there; a failure mid-flush may or may not have published its batch.
            assert rows.tolist()[: len(committed["rows"])] == committed["rows"] or rows.tolist() == committed["rows"]
            assert rows.tolist() == list(range(len(rows)))
            committed["rows"] = rows.tolist()
            with store.open_writer("log") as writer:  # the next writer works
                assert len(writer) == len(rows)

    assert run_trials(operation, check, monkeypatch) >= 5


def test_every_failing_call_of_a_compact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_path, out = tmp_path / "s", tmp_path / "out.h5"
    with mmstore.Store(store_path) as store:
        store.put("a", np.arange(100.0))
        store.put("g/b", np.arange(10))
        mmstore.export_hdf5(store, out)
    before = out.read_bytes()

    def operation(trial: int) -> None:
        with mmstore.Store(store_path, "r") as store:
            mmstore.export_hdf5(store, out)

    def check() -> None:
        with h5py.File(out, "r") as h5:  # always a complete file
            assert h5["a"][...].tolist() == list(np.arange(100.0)) and h5["g/b"][-1] == 9
        assert not [name for name in os.listdir(tmp_path) if name.startswith(".out.h5")], "temp file left"

    assert run_trials(operation, check, monkeypatch) >= 3
    assert len(out.read_bytes()) == len(before)


def test_full_disk_during_append_is_store_full_error(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with mmstore.Store(store_path) as store, store.create("log", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(10))
        writer.flush()
        with failing(monkeypatch, 1, errno.ENOSPC), pytest.raises(mmstore.StoreFullError):
            writer.append(np.arange(1_000_000))  # needs more room: posix_fallocate fails
        assert store.get("log").tolist() == list(range(10))
        writer.append(np.arange(10, 20))  # and the writer goes on once there is room
    with mmstore.Store(store_path, "r") as store:
        assert store.get("log").tolist() == list(range(20))
